"""The grids samplers walk: which noise levels, in which order, and the part of a grid a ``strength`` keeps.

A :class:`Schedule` is built once per run from the sampler's grid kind (:data:`GRIDS`), cut for ``strength``
once (:meth:`Schedule.cut`) and passed to the sampler, like k-diffusion's ``sample_euler(model, x, sigmas)``.
It names each level twice, as ``alpha_bar`` (the LDM latent ``x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar)
eps``, where DDIM and PLMS work) and as ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` (Karras et al. 2022's
``x = x_0 + sigma eps``, where Euler, Heun and DPM-Solver++ work), each computed from the grid's own primary
values so that no sampler sees a round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from ldm_inpaint.parameterization import noised
from ldm_inpaint.samplers.noise import kept_steps
from ldm_inpaint.samplers.sigmas import karras_sigmas, model_sigmas, sigma_to_timestep
from ldm_inpaint.schedule import ddim_timesteps

GridKind = Literal["ddim", "trailing", "karras"]


@dataclass(frozen=True)
class Schedule:
    """``n`` steps: ``timesteps`` (n) the model timestep of each step (maybe fractional); ``alpha_bars`` and
    ``sigmas`` (n + 1) the noise level before each step and, last, where the run ends (sigma 0 /
    alpha_bar 1 on the sigma grids; the original DDIM grid ends at ``alpha_bar_0``). ``alphas_cumprod`` is the
    model's whole float64 table, for fractional timesteps between the levels. ``partial``: the grid was cut
    for a strength below 1, so a run starts from a noised clean latent (:meth:`noised`), not from pure noise."""

    timesteps: tuple[float, ...]
    alpha_bars: tuple[float, ...]
    sigmas: tuple[float, ...]
    alphas_cumprod: Tensor
    partial: bool = False

    def __len__(self) -> int:
        return len(self.timesteps)

    def cut(self, strength: float) -> Schedule:
        """The last :func:`~ldm_inpaint.samplers.noise.kept_steps` steps (SDEdit, Meng et al. 2022; diffusers'
        ``get_timesteps``); the whole grid at strength 1."""
        kept = kept_steps(len(self), strength)
        if strength == 1:
            return self
        return replace(
            self,
            timesteps=self.timesteps[-kept:],
            alpha_bars=self.alpha_bars[-kept - 1 :],
            sigmas=self.sigmas[-kept - 1 :],
            partial=True,
        )

    def noised(self, x0: Tensor, noise: Tensor) -> Tensor:
        """``x0`` diffused to the first level with ``noise``, ``sqrt(a) x0 + sqrt(1 - a) noise`` (Ho et al. 2020,
        eq. 4; diffusers' ``scheduler.add_noise``): where a run of a cut grid starts."""
        if x0.shape != noise.shape:
            raise ValueError(
                f"init must have the shape of the noise, {tuple(noise.shape)}, found {tuple(x0.shape)}"
            )
        return noised(x0, noise, self.alpha_bars[0])

    def timestep_of(self, sigma: float) -> float:
        """The fractional model timestep of a noise level between the grid's (log-sigma interpolation)."""
        return sigma_to_timestep(torch.tensor(sigma, dtype=torch.float64), self.alphas_cumprod).item()


def _from_alpha_bars(timesteps: list[float], alpha_bars: list[float], alphas_cumprod: Tensor) -> Schedule:
    sigmas = [((1.0 - a) / a) ** 0.5 for a in alpha_bars]
    return Schedule(tuple(timesteps), tuple(alpha_bars), tuple(sigmas), alphas_cumprod)


def ddim_grid(alphas_cumprod: Tensor, steps: int) -> Schedule:
    """The original DDIM grid (:func:`~ldm_inpaint.schedule.ddim_timesteps`), descending; the level after the
    lowest timestep is ``alpha_bar_0``, as the original ``DDIMSampler`` uses, not 1."""
    timesteps = ddim_timesteps(steps, len(alphas_cumprod))[::-1]
    alpha_bars = alphas_cumprod[timesteps].tolist()
    return _from_alpha_bars(
        [float(t) for t in timesteps], [*alpha_bars, alphas_cumprod[0].item()], alphas_cumprod
    )


def trailing_grid(alphas_cumprod: Tensor, steps: int) -> Schedule:
    """``steps`` training timesteps ``T / steps`` apart, counting down from the last one, ``T - 1``, then
    sigma 0: ``t_i = round(T (steps - i) / steps) - 1`` (10 steps: 999, 899, ..., 99).

    This is the "trailing" spacing of Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Table 2), diffusers' ``timestep_spacing="trailing"``; it starts at the highest noise level,
    unlike the original's "leading" grid (901, ..., 1). Computed exactly: diffusers' float ``np.arange``
    rounds some ties the other way and yields one extra timestep, -1, for some counts (61, 103, 121, ...).
    """
    num_timesteps = len(alphas_cumprod)
    _check_steps(steps, num_timesteps)
    timesteps = [round(num_timesteps * (steps - i) / steps) - 1 for i in range(steps)]
    sigmas = model_sigmas(alphas_cumprod)[timesteps].tolist()
    alpha_bars = alphas_cumprod[timesteps].tolist()
    return Schedule(tuple(float(t) for t in timesteps), (*alpha_bars, 1.0), (*sigmas, 0.0), alphas_cumprod)


def karras_grid(alphas_cumprod: Tensor, steps: int, rho: float = 7.0) -> Schedule:
    """:func:`~ldm_inpaint.samplers.sigmas.karras_sigmas` between the model's smallest and largest sigma, then
    sigma 0.

    The model timesteps are those of the sigmas rounded to the nearest training timestep, as diffusers'
    ``DPMSolverMultistepScheduler(use_karras_sigmas=True)`` and k-diffusion's ``quantize=True`` do (the UNet
    has only seen integer timesteps); the update itself uses the exact sigmas. (A v model's output is turned
    into eps at the rounded timestep by the denoiser, where diffusers uses the exact sigma; the inpainting
    models are eps models.)
    """
    _check_steps(steps, len(alphas_cumprod))
    table = model_sigmas(alphas_cumprod)
    sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps, rho)
    timesteps = sigma_to_timestep(torch.tensor(sigmas, dtype=torch.float64), alphas_cumprod).round()
    alpha_bars = [1.0 / (1.0 + sigma**2) for sigma in sigmas]
    return Schedule(tuple(timesteps.tolist()), (*alpha_bars, 1.0), (*sigmas, 0.0), alphas_cumprod)


GRIDS: dict[GridKind, Callable[[Tensor, int], Schedule]] = {
    "ddim": ddim_grid,
    "trailing": trailing_grid,
    "karras": karras_grid,
}


def grid_length(kind: GridKind, steps: int, num_timesteps: int = 1000) -> int:
    """The number of steps on a grid of ``kind`` for ``steps`` asked for, without building it: the original
    DDIM grid has more for some counts (6 -> 7), the others exactly ``steps``."""
    return len(ddim_timesteps(steps, num_timesteps)) if kind == "ddim" else steps


def _check_steps(steps: int, num_timesteps: int) -> None:
    if not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"the number of sampling steps must be between 1 and the model's {num_timesteps} training "
            f"timesteps, found {steps}"
        )
