"""``ldm-serve``: the torch-free runtime behind an HTTP API (FastAPI + uvicorn), with a micro-batcher
that shares U-Net calls between concurrent requests, Prometheus metrics, back-pressure and graceful
shutdown; ``ray_app`` runs the same app as a Ray Serve deployment with N replicas.

Needs the ``serve`` extra (``pip install 'ldm-deploy[serve]'``; Ray Serve: the ``ray`` extra)::

    from ldm_deploy.serve.app import create_app
    from ldm_deploy.serve.config import ServeConfig
    app = create_app(ServeConfig(artifact="tiny-onnx"))   # any ASGI server runs it
"""
