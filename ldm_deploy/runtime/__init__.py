"""Torch-free runtime: DDIM + classifier-free guidance over an artifact's ONNX graphs.

Imports only numpy, onnxruntime, tokenizers and Pillow::

    from ldm_deploy.runtime import Pipeline
    pipe = Pipeline.load("tiny-onnx/")
    pipe("a small red circle on a blue background, top left", seed=0).images[0].save("out.png")
"""

from .backends import BACKENDS
from .components import Component
from .pipeline import GenerationOutput, Pipeline, PipelineObserver, StepInfo
from .scheduler import DDIMScheduler
from .tokenizer import ClipTokenizer

__all__ = ["Pipeline", "GenerationOutput", "PipelineObserver", "StepInfo", "Component", "BACKENDS",
           "DDIMScheduler", "ClipTokenizer"]
