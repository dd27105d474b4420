"""The DDPM noise schedule of the original LDM code and the DDIM timestep grid; pure functions.

Notation (Ho et al. 2020): ``beta_t`` the per-step noise variance, ``alpha_bar_t = prod_{s<=t} (1 - beta_s)``,
so that ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``. Indices are the model's timesteps
``0 .. T-1``. Everything is computed in float64, as the original ``DDPM.register_schedule`` does before it
stores float32 copies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm_inpaint.config import ScheduleParams


def linear_betas(params: ScheduleParams) -> Tensor:
    """LDM's "linear" schedule (diffusers: ``scaled_linear``): ``sqrt(beta_t)`` linear in ``t``, float64."""
    sqrt_betas = torch.linspace(
        params.linear_start**0.5, params.linear_end**0.5, params.timesteps, dtype=torch.float64
    )
    return sqrt_betas**2


def alphas_cumprod(params: ScheduleParams) -> Tensor:
    """``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` for ``t = 0 .. T-1``, float64."""
    return torch.cumprod(1.0 - linear_betas(params), dim=0)


def ddpm_buffers(params: ScheduleParams) -> dict[str, Tensor]:
    """The 12 float32 buffers that the original ``DDPM.register_schedule`` stores in every checkpoint.

    They include the posterior ``q(x_{t-1} | x_t, x_0)`` of Ho et al. 2020, eqs. 6-7, with the original's
    ``v_posterior = 0`` (the variance is ``beta_tilde_t``) and its log clipped at 1e-20 because
    ``beta_tilde_0 = 0``.
    """
    betas = linear_betas(params)
    alpha_bar = alphas_cumprod(params)
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alpha_bar,
        "alphas_cumprod_prev": alpha_bar_prev,
        "sqrt_alphas_cumprod": alpha_bar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alpha_bar).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alpha_bar).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alpha_bar).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alpha_bar - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar),
        "posterior_mean_coef2": (1.0 - alpha_bar_prev) * (1.0 - betas).sqrt() / (1.0 - alpha_bar),
    }
    return {name: value.float() for name, value in buffers.items()}


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """The original DDIM "uniform" grid, ascending: every ``c = T // steps``-th timestep, shifted by one.

    This is ``make_ddim_timesteps`` of the original code (Song et al. 2021, Sec. 4.2, stride ``c``). It
    yields more timesteps than ``steps`` when ``steps`` does not divide ``T`` (6 -> 7, 45 -> 46), as here.
    When ``c`` divides ``T - 1`` (steps 3, 9, 27, 36, 37, 101-111, ..., all ``steps > T / 2``) the original
    grid ends at timestep ``T`` (3 -> [1, 334, 667, 1000]), indexes past the schedule and crashes; that step
    is dropped here. ``len(result)`` is the number of steps taken.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"the number of sampling steps must be between 1 and the model's {num_timesteps} training "
            f"timesteps, found {steps}"
        )
    stride = num_timesteps // steps
    return [t + 1 for t in range(0, num_timesteps, stride) if t + 1 < num_timesteps]
