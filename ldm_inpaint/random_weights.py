"""Random weights in any key layout, scaled so that activations stay of order one.

Used by the parity tests and the benchmark, which have no real checkpoint: a zero-initialised or saturated
network would agree with anything and prove nothing, so every tensor gets a non-trivial value:

- matrices and conv kernels: N(0, 1 / fan_in), the variance-preserving scale for a linear map;
- norm weights (1-D ``weight``/``scale``/``gamma``): 1 + N(0, 0.1^2); biases and other 1-D tensors: N(0, 0.1^2);
- 0-D tensors (``logit_scale``): log(1 / 0.07), CLIP's initial value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from ldm_inpaint.checkpoint import to_file_layout
from ldm_inpaint.config import ModelConfig
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.schedule import ddpm_buffers


def random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """One random fp32 tensor of ``shape`` for the parameter called ``key`` (see the module docstring)."""
    if len(shape) == 0:
        return torch.tensor(math.log(1 / 0.07))
    if len(shape) == 1:
        noise = 0.1 * torch.randn(shape, generator=generator)
        is_norm_weight = key.endswith(("weight", "scale", "gamma"))
        return noise + 1.0 if is_norm_weight else noise
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def random_state_dict(shapes: Iterable[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, Tensor]:
    """A state dict with a random fp32 tensor for every ``(key, shape)``, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return {key: random_tensor(key, tuple(shape), generator) for key, shape in shapes}


def random_checkpoint(config: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """A random stand-in for a real checkpoint of ``config``: every weight in the original file layout
    (SD1 text encoder in transformers' names) plus the 12 DDPM schedule buffers real files carry."""
    with torch.device("meta"):
        model = LatentDiffusion(config)
    shapes = [(key, tuple(tensor.shape)) for key, tensor in model.state_dict().items()]
    weights = to_file_layout(random_state_dict(shapes, seed), config)
    return {**weights, **ddpm_buffers(config.schedule)}
