"""ldm-inpaint: Stable Diffusion 1.5 / 2 inpainting, from scratch, exact to the original checkpoints."""

__version__ = "0.1.0"
