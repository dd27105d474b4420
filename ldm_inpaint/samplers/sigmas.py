"""The noise-level ("sigma") view of the DDPM schedule that the Karras-style samplers work in.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM) write every
diffusion model as ``x = x_0 + sigma n``. The LDM latent of timestep ``t`` is the same point scaled,
``x_t = x / sqrt(sigma_t^2 + 1)`` with ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` (EDM Table 1, VP
column, ``s = 1 / sqrt(sigma^2 + 1)``). An eps model gives the denoiser ``D(x; sigma) = x - sigma eps(x /
sqrt(sigma^2 + 1), t(sigma))`` (Table 1's VP preconditioning: ``c_skip = 1``, ``c_out = -sigma``), and the
probability-flow ODE reads ``dx / dsigma = (x - D(x; sigma)) / sigma`` (EDM eqs. 1 and 3, ``sigma(t) = t``).

Everything the samplers share lives here, once: the sigma schedules, the sigma -> timestep map, the start
point (from pure noise, or from a noised clean latent part-way down the grid), the denoiser in sigma space and
the ancestral split of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm_inpaint.denoiser import Denoiser, timesteps_like
from ldm_inpaint.samplers.noise import kept_steps, starts_from_init


@dataclass(frozen=True)
class SigmaSchedule:
    """``sigmas``: the ``n + 1`` noise levels in sampling order, descending, the last one 0;
    ``timesteps``: the (maybe fractional) model timestep of each of the first ``n``."""

    sigmas: list[float]
    timesteps: list[float]


def model_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` for every training timestep, ascending, float64."""
    alpha_bar = alphas_cumprod.double().cpu()
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def sigma_to_timestep(sigma: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The fractional timestep of each noise level: ``log sigma`` interpolated linearly between the training
    timesteps, clamped to ``[0, T - 1]`` (k-diffusion's ``DiscreteSchedule.sigma_to_t``, diffusers'
    ``_sigma_to_t``). Exact at the training timesteps."""
    log_sigmas = model_sigmas(alphas_cumprod).log()
    log_sigma = sigma.double().cpu().log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
    return low + w.clamp(0.0, 1.0)


def trailing_schedule(alphas_cumprod: Tensor, steps: int) -> SigmaSchedule:
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
    return SigmaSchedule([*sigmas, 0.0], [float(t) for t in timesteps])


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """The ``N = steps`` noise levels of Karras et al. 2022, eq. 5, dense near ``sigma_min`` for ``rho > 1``:
    ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, ``i < N``."""
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return ((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).tolist()


def karras_schedule(alphas_cumprod: Tensor, steps: int, rho: float = 7.0) -> SigmaSchedule:
    """:func:`karras_sigmas` between the model's smallest and largest sigma, then sigma 0.

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
    return SigmaSchedule([*sigmas, 0.0], timesteps.tolist())


def start_latent(x_T: Tensor, schedule: SigmaSchedule) -> Tensor:
    """The unit-variance start noise as a point at the first noise level: ``x_T sqrt(sigma_max^2 + 1)``.

    This is DDIM's and DPM-Solver's reading of ``x_T`` (the latent at the first timestep is unit noise, so in
    sigma space it has the variance ``sigma^2 + 1`` of unit-variance data plus noise), hence one seed starts
    every sampler at the same point. diffusers' Euler and Heun schedulers use ``sigma_max`` instead for the
    "linspace" and "trailing" spacings, as k-diffusion does; the two differ by 0.2 % at SD's ``sigma_max``.
    """
    return x_T * (schedule.sigmas[0] ** 2 + 1.0) ** 0.5


def start_point(
    x_T: Tensor, schedule: SigmaSchedule, init: Tensor | None, strength: float
) -> tuple[Tensor, SigmaSchedule]:
    """The start point in sigma space and the part of ``schedule`` a run of ``strength`` takes.

    ``strength == 1``: :func:`start_latent` on the whole schedule. Otherwise the last
    :func:`~ldm_inpaint.samplers.noise.kept_steps` steps, started from the clean latent ``init`` at their
    first noise level with ``x_T`` as the noise, ``init + sigma_0 x_T`` (EDM's ``x = x_0 + sigma n``), as
    diffusers' ``scheduler.add_noise`` after ``set_begin_index`` in its img2img and inpainting pipelines.
    """
    if not starts_from_init(x_T, init, strength):
        return start_latent(x_T, schedule), schedule
    kept = kept_steps(len(schedule.timesteps), strength)
    schedule = SigmaSchedule(schedule.sigmas[-kept - 1 :], schedule.timesteps[-kept:])
    return init + schedule.sigmas[0] * x_T, schedule


def denoise(denoiser: Denoiser, x: Tensor, sigma: float, t: float) -> Tensor:
    """EDM's ``D(x; sigma) = x - sigma eps`` of an eps model fed the LDM latent ``x / sqrt(sigma^2 + 1)`` at
    timestep ``t`` (Table 1, VP preconditioning)."""
    eps = denoiser(x / (sigma**2 + 1.0) ** 0.5, timesteps_like(x, t))
    return x - sigma * eps


def ode_derivative(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """``dx / dsigma = (x - D(x; sigma)) / sigma``, the probability-flow ODE (EDM eqs. 1 and 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step ``sigma -> sigma_next`` into a deterministic step to ``sigma_down`` and fresh noise of
    scale ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_next^2``:
    ``sigma_up = min(sigma_next, eta sigma_next sqrt(sigma^2 - sigma_next^2) / sigma)``.

    This is DDIM's ``sigma_t`` (Song et al. 2021, eq. 16) in sigma space, so ``eta`` means what it means for
    DDIM: 1 is the DDPM posterior (Ho et al. 2020, eq. 7; k-diffusion's ``get_ancestral_step``), 0 the ODE.
    """
    sigma_up = min(sigma_next, eta * sigma_next * (sigma**2 - sigma_next**2) ** 0.5 / sigma)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _check_steps(steps: int, num_timesteps: int) -> None:
    if not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"the number of sampling steps must be between 1 and the model's {num_timesteps} training "
            f"timesteps, found {steps}"
        )
