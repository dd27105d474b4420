"""Samplers: pure functions over a :data:`~ldm_inpaint.denoiser.Denoiser` and a :class:`Schedule`, one common
signature, one registry.

A run is three steps: :func:`make_schedule` builds the sampler's grid and cuts it for ``strength``; the start
latent is the unit noise (or, on a cut grid, the clean latent noised to the first level); the sampler walks
the schedule. :func:`sample` does the last two. A new sampler is a function of the :class:`Sampler`
signature and one :class:`SamplerSpec` entry in :data:`SAMPLERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from ldm_inpaint.denoiser import Denoiser
from ldm_inpaint.samplers.ddim import ddim
from ldm_inpaint.samplers.dpm_solver import dpmpp_2m, dpmpp_2s_ancestral
from ldm_inpaint.samplers.euler_heun import euler, euler_ancestral, heun
from ldm_inpaint.samplers.grid import GRIDS, GridKind, Schedule, grid_length
from ldm_inpaint.samplers.noise import NoiseSource, check_eta, kept_steps
from ldm_inpaint.samplers.plms import plms
from ldm_inpaint.samplers.progress import StepCallback, StepInfo


class Sampler(Protocol):
    """``sampler(denoiser, x, schedule, *, eta, generator, callback) -> x_0``.

    ``x`` is the LDM latent at the schedule's first level (unit noise for a whole grid); ``eta`` scales the
    injected noise (0 for the deterministic samplers); ``generator`` draws that noise; ``callback(StepInfo)``
    runs after each step. Nothing given is mutated.
    """

    def __call__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        schedule: Schedule,
        *,
        eta: float = 0.0,
        generator: NoiseSource = None,
        callback: StepCallback | None = None,
    ) -> Tensor: ...


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler, the grid it walks and whether it injects noise (``stochastic``: it reads ``eta`` as the
    noise scale, 0 for none; the others take only ``eta = 0``)."""

    sample: Sampler
    grid: GridKind
    stochastic: bool


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(ddim, "ddim", stochastic=True),
    "plms": SamplerSpec(plms, "ddim", stochastic=False),
    "euler": SamplerSpec(euler, "trailing", stochastic=False),
    "euler_ancestral": SamplerSpec(euler_ancestral, "trailing", stochastic=True),
    "heun": SamplerSpec(heun, "trailing", stochastic=False),
    "dpmpp_2m": SamplerSpec(dpmpp_2m, "trailing", stochastic=False),
    "dpmpp_2m_karras": SamplerSpec(dpmpp_2m, "karras", stochastic=False),
    "dpmpp_2s_ancestral": SamplerSpec(dpmpp_2s_ancestral, "trailing", stochastic=True),
}


def _spec(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def make_schedule(name: str, alphas_cumprod: Tensor, steps: int, strength: float = 1.0) -> Schedule:
    """The grid of sampler ``name`` for ``steps`` over the float64 ``alphas_cumprod``, cut for ``strength``."""
    return GRIDS[_spec(name).grid](alphas_cumprod, steps).cut(strength)


def steps_taken(name: str, steps: int, strength: float = 1.0, num_timesteps: int = 1000) -> int:
    """``len(make_schedule(name, ..., steps, strength))`` without a schedule: checks options up front."""
    return kept_steps(grid_length(_spec(name).grid, steps, num_timesteps), strength)


def check_sampler_eta(name: str, eta: float) -> None:
    """The one rule for ``eta``: stochastic samplers take a noise scale >= 0, the others only 0."""
    check_eta(name, eta, stochastic=_spec(name).stochastic)


def sample(
    name: str,
    denoiser: Denoiser,
    noise: Tensor,
    schedule: Schedule,
    *,
    init: Tensor | None = None,
    eta: float = 0.0,
    generator: NoiseSource = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run sampler ``name`` over ``schedule`` from the unit ``noise``. On a cut schedule (strength < 1) the run
    starts from the clean latent ``init`` noised to the first level with ``noise`` (SDEdit, Meng et al. 2022;
    diffusers' img2img); on a whole one ``init`` is unused, as in diffusers' pipelines."""
    check_sampler_eta(name, eta)
    x = noise
    if schedule.partial:
        if init is None:
            raise ValueError(
                "a schedule cut for strength < 1 starts from a noised clean latent: pass init, found None"
            )
        x = schedule.noised(init, noise)
    return _spec(name).sample(denoiser, x, schedule, eta=eta, generator=generator, callback=callback)


__all__ = [
    "SAMPLERS",
    "Sampler",
    "SamplerSpec",
    "Schedule",
    "StepInfo",
    "check_sampler_eta",
    "make_schedule",
    "sample",
    "steps_taken",
]
