"""Torch-free runtime: numpy schedulers (DDIM, DPM-Solver++ 2M, Euler, Euler-ancestral) + classifier-free
guidance over an artifact's ONNX graphs.

Imports only numpy, onnxruntime, tokenizers and Pillow::

    from ldm_deploy.runtime import Pipeline
    pipe = Pipeline.load("tiny-onnx/")
    pipe("a small red circle on a blue background, top left", seed=0).images[0].save("out.png")
"""

from .backends import BACKENDS
from .components import Component
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .pipeline import GenerationOutput, Pipeline, PipelineObserver, StepInfo
from .scheduler import SCHEDULERS, DDIMScheduler, make_scheduler
from .tokenizer import ClipTokenizer

__all__ = ["Pipeline", "GenerationOutput", "PipelineObserver", "StepInfo", "Component", "BACKENDS",
           "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
           "SCHEDULERS", "make_scheduler", "ClipTokenizer"]
