"""One sampler run the way the pipeline makes it: the sampler's schedule, cut for strength, then the sampler."""

from __future__ import annotations

from torch import Tensor

from ldm_inpaint.denoiser import Denoiser
from ldm_inpaint.samplers import make_schedule, sample


def run_sampler(
    name: str,
    denoiser: Denoiser,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    strength: float = 1.0,
    init: Tensor | None = None,
    **kwargs: object,
) -> Tensor:
    schedule = make_schedule(name, alphas_cumprod, steps, strength)
    return sample(name, denoiser, x_T, schedule, init=init, **kwargs)
