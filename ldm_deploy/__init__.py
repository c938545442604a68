"""ldm-deploy: export, compress, build and run latent diffusion models of the SD1.5 class."""

__version__ = "0.1.0"
