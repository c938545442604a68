"""Interoperability with other tools' formats (Hugging Face Optimum's ONNX layout)."""
