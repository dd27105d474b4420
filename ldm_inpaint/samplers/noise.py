"""The noise a sampler injects: drawing it, and the one rule for ``eta``, shared by every sampler."""

from __future__ import annotations

import torch
from torch import Tensor


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``z ~ N(0, I)`` in x's shape and dtype, drawn on the generator's device and moved to x's, as diffusers'
    ``randn_tensor`` draws it: a CPU generator gives the same noise for a model on any device."""
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def check_eta(sampler: str, eta: float, stochastic: bool) -> None:
    """Samplers that inject noise take ``eta >= 0`` (its scale; 0 injects none); the others only ``eta = 0``."""
    if stochastic and eta < 0:
        raise ValueError(
            f"{sampler} eta must be >= 0 (the scale of the injected noise, 0 for none), found {eta}"
        )
    if not stochastic and eta != 0:
        raise ValueError(f"{sampler} is deterministic: eta must be 0, found {eta}")
