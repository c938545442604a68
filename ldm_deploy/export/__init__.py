"""Export SD-class pipelines to validated ONNX artifacts (needs the ``export`` extra)."""
