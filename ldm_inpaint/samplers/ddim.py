"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) on the original LDM time grid."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm_inpaint.denoiser import Denoiser, timesteps_like
from ldm_inpaint.samplers.noise import check_eta, kept_steps, noise_like, starts_from_init
from ldm_inpaint.schedule import ddim_timesteps


def ddim_alphas(alphas_cumprod: Tensor, steps: int) -> list[tuple[int, float, float]]:
    """``(t, a_t, a_prev)`` for each step in sampling order (descending ``t``), as Python floats.

    ``a_t = alpha_bar_t`` on the :func:`~ldm_inpaint.schedule.ddim_timesteps` grid and ``a_prev`` that of the
    next lower grid timestep; for the lowest one the original uses ``alpha_bar_0``, not 1.
    """
    timesteps = ddim_timesteps(steps, len(alphas_cumprod))
    a_t = alphas_cumprod[timesteps].tolist()
    a_prev = [alphas_cumprod[0].item(), *a_t[:-1]]
    return list(zip(timesteps, a_t, a_prev, strict=True))[::-1]


def ddim_start(
    x: Tensor, alphas_cumprod: Tensor, steps: int, init: Tensor | None, strength: float
) -> tuple[Tensor, list[tuple[int, float, float]]]:
    """The start latent and the :func:`ddim_alphas` grid of a run of ``strength``, for DDIM and PLMS.

    ``strength == 1``: the unit noise ``x`` on the whole grid. Otherwise only the last
    :func:`~ldm_inpaint.samplers.noise.kept_steps` steps of the grid, started from the clean latent ``init``
    diffused to their first timestep with ``x`` as the noise, ``sqrt(a_t) init + sqrt(1 - a_t) x`` (Ho et al.
    2020, eq. 4), as diffusers' ``scheduler.add_noise`` in its img2img and inpainting pipelines.
    """
    schedule = ddim_alphas(alphas_cumprod, steps)
    if not starts_from_init(x, init, strength):
        return x, schedule
    schedule = schedule[len(schedule) - kept_steps(len(schedule), strength) :]
    a_t = schedule[0][1]
    return a_t**0.5 * init + (1.0 - a_t) ** 0.5 * x, schedule


def ddim_step(
    x: Tensor,
    eps: Tensor,
    a_t: float,
    a_prev: float,
    sigma_t: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One DDIM update x_t -> x_prev (Song et al. 2021, eq. 12):

    ``x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``,
    ``x_prev = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z``, ``z ~ N(0, I)``.

    ``z`` is drawn from ``generator`` (:func:`~ldm_inpaint.samplers.noise.noise_like`) only when
    ``sigma_t > 0``.
    """
    x0_pred = (x - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
    x_prev = a_prev**0.5 * x0_pred + (1.0 - a_prev - sigma_t**2) ** 0.5 * eps
    if sigma_t > 0:
        x_prev = x_prev + sigma_t * noise_like(x, generator)
    return x_prev


def ddim(
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
) -> Tensor:
    """Sample from the start noise ``x = x_T`` with DDIM, as the original ``DDIMSampler``.

    ``eta`` scales the noise of each step, ``sigma_t = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))``
    (Song et al. 2021, eq. 16): 0 is the deterministic DDIM, 1 the DDPM posterior variance. With ``strength
    < 1`` the run takes the end of the grid from the noised ``init`` (:func:`ddim_start`).
    ``callback(step_index, total_steps)`` runs after each step.
    """
    check_eta("ddim", eta, stochastic=True)
    x, schedule = ddim_start(x, alphas_cumprod, steps, init, strength)
    for i, (t, a_t, a_prev) in enumerate(schedule):
        sigma_t = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)) ** 0.5
        eps = denoiser(x, timesteps_like(x, t))
        x = ddim_step(x, eps, a_t, a_prev, sigma_t, generator)
        if callback is not None:
            callback(i, len(schedule))
    return x
