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
from ldm_inpaint.schedule import ddim_timesteps


class Sampler(Protocol):
    """``sampler(denoiser, x_T, alphas_cumprod, steps, *, eta, generator, callback, init, strength) -> x_0``.

    ``x_T`` is unit-variance start noise; ``alphas_cumprod`` is the float64 schedule of
    :func:`ldm_inpaint.schedule.alphas_cumprod`; ``eta`` scales the injected noise (samplers that have none
    require 0); ``generator`` draws that noise; ``callback(step_index, total_steps)`` runs after each step
    taken. ``strength`` in (0, 1]: below 1 the sampler takes only the last
    :func:`~ldm_inpaint.samplers.noise.kept_steps` steps of its grid, from the clean latent ``init``
    (x's shape) noised to their first level with ``x_T`` as the noise (SDEdit, Meng et al. 2022; diffusers'
    img2img); at 1 it starts from ``x_T`` on the whole grid and ``init`` is unused. Nothing given is mutated.
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
        init: Tensor | None = None,
        strength: float = 1.0,
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
# Samplers on the original DDIM grid, which has more steps than asked for some counts (6 -> 7); the others
# take exactly the steps asked for.
ORIGINAL_GRID: frozenset[str] = frozenset({"ddim", "plms"})


def grid_steps(sampler: str, steps: int, num_timesteps: int = 1000) -> int:
    """The number of steps on ``sampler``'s grid for ``steps`` asked for: what a run of strength 1 takes and
    what ``strength`` is a fraction of (:func:`~ldm_inpaint.samplers.noise.kept_steps`)."""
    return len(ddim_timesteps(steps, num_timesteps)) if sampler in ORIGINAL_GRID else steps


__all__ = [
    "NOISE_FREE",
    "ORIGINAL_GRID",
    "SAMPLERS",
    "Sampler",
    "ddim",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2s_ancestral",
    "euler",
    "euler_ancestral",
    "grid_steps",
    "heun",
    "plms",
]
