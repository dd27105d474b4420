"""Euler, Euler ancestral and Heun on the probability-flow ODE in sigma space (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 1), on the "trailing" sigma
grid of :func:`~ldm_inpaint.samplers.sigmas.trailing_schedule`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm_inpaint.denoiser import Denoiser
from ldm_inpaint.samplers.noise import check_eta, noise_like
from ldm_inpaint.samplers.sigmas import (
    ancestral_step,
    denoise,
    ode_derivative,
    start_point,
    trailing_schedule,
)


def euler_ancestral(
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
    """Euler ancestral ("Euler a"): each step ``sigma -> sigma_next`` is an Euler step of the ODE
    ``dx/dsigma = (x - D(x; sigma)) / sigma`` down to ``sigma_down``, then fresh noise ``sigma_up z`` brings
    the noise level back up to ``sigma_next`` (:func:`~ldm_inpaint.samplers.sigmas.ancestral_step`).

    ``eta`` scales the fresh noise: **1 is the standard Euler ancestral** (diffusers'
    ``EulerAncestralDiscreteScheduler``, k-diffusion's ``sample_euler_ancestral``); 0, the CLI default,
    injects none and is exactly :func:`euler`. For every ``eta`` this is DDIM with that ``eta`` on the same
    grid, ending at ``alpha_bar = 1``. ``z`` is drawn from ``generator`` once per step with ``sigma_up > 0``,
    in x's shape, as diffusers draws it (diffusers draws one more in the last step and multiplies it by 0).
    One denoiser call per step taken; ``callback(step_index, steps_taken)`` after each step.
    """
    check_eta("euler_ancestral", eta, stochastic=True)
    x, schedule = start_point(x, trailing_schedule(alphas_cumprod, steps), init, strength)
    for i, t in enumerate(schedule.timesteps):
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = ode_derivative(x, denoise(denoiser, x, sigma, t), sigma)
        x = x + (sigma_down - sigma) * d
        if sigma_up > 0:
            x = x + sigma_up * noise_like(x, generator)
        if callback is not None:
            callback(i, len(schedule.timesteps))
    return x


def euler(
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
    """Euler's method on ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, Algorithm 1 without
    its second-order correction; diffusers' ``EulerDiscreteScheduler``): ``x += (sigma_next - sigma) d``.

    With an eps model ``d = eps``: this is deterministic DDIM in sigma space (Song et al. 2021, eqs. 13-14).
    ``eta`` must be 0 and ``generator`` is unused; one denoiser call per step taken.
    """
    check_eta("euler", eta, stochastic=False)
    return euler_ancestral(
        denoiser, x, alphas_cumprod, steps, callback=callback, init=init, strength=strength
    )


def heun(
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
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, deterministic; diffusers'
    ``HeunDiscreteScheduler``): the Euler step to ``sigma_next`` is corrected with the average of the slopes
    at both ends, ``x += (sigma_next - sigma) (d + d') / 2``. The last step, to sigma 0, stays an Euler step
    (``d'`` would divide by 0), so there are ``2 steps_taken - 1`` denoiser calls.

    ``eta`` must be 0 and ``generator`` is unused; ``callback(step_index, steps_taken)`` after each step.
    """
    check_eta("heun", eta, stochastic=False)
    x, schedule = start_point(x, trailing_schedule(alphas_cumprod, steps), init, strength)
    for i, t in enumerate(schedule.timesteps):
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        d = ode_derivative(x, denoise(denoiser, x, sigma, t), sigma)
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_euler
        else:
            t_next = schedule.timesteps[i + 1]
            d_next = ode_derivative(x_euler, denoise(denoiser, x_euler, sigma_next, t_next), sigma_next)
            x = x + (sigma_next - sigma) * (d + d_next) / 2
        if callback is not None:
            callback(i, len(schedule.timesteps))
    return x
