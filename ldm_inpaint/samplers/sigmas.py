"""The noise-level ("sigma") view of the DDPM schedule that the Karras-style samplers work in.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM) write every
diffusion model as ``x = x_0 + sigma n``. The LDM latent of timestep ``t`` is the same point scaled,
``x_t = x / sqrt(sigma_t^2 + 1)`` with ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` (EDM Table 1, VP
column, ``s = 1 / sqrt(sigma^2 + 1)``). An eps model gives the denoiser ``D(x; sigma) = x - sigma eps(x /
sqrt(sigma^2 + 1), t(sigma))`` (Table 1's VP preconditioning: ``c_skip = 1``, ``c_out = -sigma``), and the
probability-flow ODE reads ``dx / dsigma = (x - D(x; sigma)) / sigma`` (EDM eqs. 1 and 3, ``sigma(t) = t``).

Everything the sigma samplers share lives here, once: the sigma tables, the sigma -> timestep map, the way
into and out of sigma space, the denoiser in sigma space and the ancestral split of a step (the grids
themselves are in :mod:`~ldm_inpaint.samplers.grid`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm_inpaint.denoiser import Denoiser, timesteps_like


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


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> list[float]:
    """The ``N = steps`` noise levels of Karras et al. 2022, eq. 5, dense near ``sigma_min`` for ``rho > 1``:
    ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, ``i < N``."""
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return ((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).tolist()


def to_sigma_space(x: Tensor, sigma: float) -> Tensor:
    """The LDM latent ``x_t`` at noise level ``sigma`` as a point of sigma space, ``x_t sqrt(sigma^2 + 1)``
    (EDM Table 1, VP column: ``x_t = s x`` with ``s = 1 / sqrt(sigma^2 + 1)``). The unit start noise becomes
    ``x_T sqrt(sigma_max^2 + 1)``: DDIM's and DPM-Solver's reading of ``x_T``, so one seed starts every sampler
    at the same point. diffusers' Euler and Heun schedulers use ``sigma_max`` instead for the "linspace" and
    "trailing" spacings, as k-diffusion does; the two differ by 0.2 % at SD's ``sigma_max``."""
    return x * (sigma**2 + 1.0) ** 0.5


def from_sigma_space(x: Tensor, sigma: float) -> Tensor:
    """The inverse of :func:`to_sigma_space`: the LDM latent of a sigma-space point."""
    return x / (sigma**2 + 1.0) ** 0.5


def denoise(denoiser: Denoiser, x: Tensor, sigma: float, t: float) -> Tensor:
    """EDM's ``D(x; sigma) = x - sigma eps`` of an eps model fed the LDM latent ``x / sqrt(sigma^2 + 1)`` at
    timestep ``t`` (Table 1, VP preconditioning)."""
    eps = denoiser(from_sigma_space(x, sigma), timesteps_like(x, t))
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
