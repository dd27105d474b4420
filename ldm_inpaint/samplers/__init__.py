"""Samplers: pure functions over a :data:`~ldm_inpaint.denoiser.Denoiser`, one common signature, one registry.

A new sampler is a new module with a function of the :class:`Sampler` signature and one entry in
:data:`SAMPLERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from ldm_inpaint.denoiser import Denoiser
from ldm_inpaint.samplers.ddim import ddim
from ldm_inpaint.samplers.dpm_solver import dpmpp_2m, dpmpp_2m_karras, dpmpp_2s_ancestral
from ldm_inpaint.samplers.euler_heun import euler, euler_ancestral, heun
from ldm_inpaint.samplers.plms import plms


class Sampler(Protocol):
    """``sampler(denoiser, x_T, alphas_cumprod, steps, *, eta, generator, callback) -> x_0``.

    ``alphas_cumprod`` is the float64 schedule of :func:`ldm_inpaint.schedule.alphas_cumprod`; ``eta`` scales
    the injected noise (samplers that have none require 0); ``generator`` draws that noise;
    ``callback(step_index, total_steps)`` runs after each step. Nothing given is mutated.
    """

    def __call__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        alphas_cumprod: Tensor,
        steps: int,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> Tensor: ...


SAMPLERS: dict[str, Sampler] = {
    "ddim": ddim,
    "plms": plms,
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_karras": dpmpp_2m_karras,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
}
# Samplers that inject no noise and therefore take only eta = 0. The others read eta as a noise scale: for
# ddim 1 is DDPM-like, for the ancestral ones 1 is the standard sampler, and 0 makes each deterministic.
NOISE_FREE: frozenset[str] = frozenset({"plms", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras"})

__all__ = [
    "NOISE_FREE",
    "SAMPLERS",
    "Sampler",
    "ddim",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2s_ancestral",
    "euler",
    "euler_ancestral",
    "heun",
    "plms",
]
