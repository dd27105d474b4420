"""Euler, Euler ancestral and Heun on the probability-flow ODE in sigma space (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", Algorithm 1), on the "trailing" sigma
grid of :func:`~ldm_inpaint.samplers.grid.trailing_grid`. ``x`` comes in and goes out as the LDM latent
(:func:`~ldm_inpaint.samplers.sigmas.to_sigma_space`); at sigma 0 the two coincide."""

from __future__ import annotations

from torch import Tensor

from ldm_inpaint.denoiser import Denoiser
from ldm_inpaint.samplers.grid import Schedule
from ldm_inpaint.samplers.noise import NoiseSource, noise_like
from ldm_inpaint.samplers.progress import StepCallback, report
from ldm_inpaint.samplers.sigmas import (
    ancestral_step,
    denoise,
    from_sigma_space,
    ode_derivative,
    to_sigma_space,
)


def euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    generator: NoiseSource = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler ancestral ("Euler a"): each step ``sigma -> sigma_next`` is an Euler step of the ODE
    ``dx/dsigma = (x - D(x; sigma)) / sigma`` down to ``sigma_down``, then fresh noise ``sigma_up z`` brings
    the noise level back up to ``sigma_next`` (:func:`~ldm_inpaint.samplers.sigmas.ancestral_step`).

    ``eta`` scales the fresh noise: **1 is the standard Euler ancestral** (diffusers'
    ``EulerAncestralDiscreteScheduler``, k-diffusion's ``sample_euler_ancestral``); 0, the CLI default,
    injects none and is exactly :func:`euler`. For every ``eta`` this is DDIM with that ``eta`` on the same
    grid, ending at ``alpha_bar = 1``. ``z`` is drawn from ``generator`` once per step with ``sigma_up > 0``,
    in x's shape, as diffusers draws it (diffusers draws one more in the last step and multiplies it by 0).
    One denoiser call per step.
    """
    x = to_sigma_space(x, schedule.sigmas[0])
    for i, t in enumerate(schedule.timesteps):
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        denoised = denoise(denoiser, x, sigma, t)
        x = x + (sigma_down - sigma) * ode_derivative(x, denoised, sigma)
        if sigma_up > 0:
            x = x + sigma_up * noise_like(x, generator)
        report(callback, schedule, i, from_sigma_space(x, sigma_next), denoised)
    return x


def euler(
    denoiser: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    generator: NoiseSource = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler's method on ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, Algorithm 1 without
    its second-order correction; diffusers' ``EulerDiscreteScheduler``): ``x += (sigma_next - sigma) d``.

    With an eps model ``d = eps``: this is deterministic DDIM in sigma space (Song et al. 2021, eqs. 13-14).
    Deterministic: ``eta`` is 0 and ``generator`` unused; one denoiser call per step.
    """
    return euler_ancestral(denoiser, x, schedule, callback=callback)


def heun(
    denoiser: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    generator: NoiseSource = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, deterministic; diffusers'
    ``HeunDiscreteScheduler``): the Euler step to ``sigma_next`` is corrected with the average of the slopes
    at both ends, ``x += (sigma_next - sigma) (d + d') / 2``. The last step, to sigma 0, stays an Euler step
    (``d'`` would divide by 0), so there are ``2 len(schedule) - 1`` denoiser calls.

    Deterministic: ``eta`` is 0 and ``generator`` unused.
    """
    x = to_sigma_space(x, schedule.sigmas[0])
    for i, t in enumerate(schedule.timesteps):
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        denoised = denoise(denoiser, x, sigma, t)
        d = ode_derivative(x, denoised, sigma)
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_euler
        else:
            t_next = schedule.timesteps[i + 1]
            d_next = ode_derivative(x_euler, denoise(denoiser, x_euler, sigma_next, t_next), sigma_next)
            x = x + (sigma_next - sigma) * (d + d_next) / 2
        report(callback, schedule, i, from_sigma_space(x, sigma_next), denoised)
    return x
