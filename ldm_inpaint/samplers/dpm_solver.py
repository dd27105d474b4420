"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models") in sigma space, where its half-log-SNR is ``lambda = -log sigma`` and ``h = lambda_next - lambda``.

Its first-order step (DPM-Solver++1) in sigma space, ``x_next = (sigma_next / sigma) x - expm1(-h) D``, is
exact for a constant data prediction ``D = D(x; sigma)`` and is DDIM; the samplers here improve on ``D``.
``x`` comes in and goes out as the LDM latent (:func:`~ldm_inpaint.samplers.sigmas.to_sigma_space`).
"""

from __future__ import annotations

import math

from torch import Tensor

from ldm_inpaint.denoiser import Denoiser
from ldm_inpaint.samplers.grid import Schedule
from ldm_inpaint.samplers.noise import NoiseSource, noise_like
from ldm_inpaint.samplers.progress import StepCallback, report
from ldm_inpaint.samplers.sigmas import ancestral_step, denoise, from_sigma_space, to_sigma_space


def dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    generator: NoiseSource = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; diffusers' ``DPMSolverMultistepScheduler(algorithm_type=
    "dpmsolver++", solver_order=2)``, with ``use_karras_sigmas=True`` on the Karras grid): the first-order
    step with ``D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}``, ``r = h_{i-1} / h_i``, a linear extrapolation of the
    data prediction from the previous step. The first step (no history) and the last one (to sigma 0, where
    the first-order step returns ``D`` itself) are first order, as in diffusers and k-diffusion.
    Deterministic: ``eta`` is 0 and ``generator`` unused; one denoiser call per step.
    """
    x = to_sigma_space(x, schedule.sigmas[0])
    denoised_prev, h_prev = None, None
    for i, t in enumerate(schedule.timesteps):
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        denoised = denoise(denoiser, x, sigma, t)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            data_pred = denoised
            if denoised_prev is not None:
                r = h_prev / h
                data_pred = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * denoised_prev
            x = (sigma_next / sigma) * x - math.expm1(-h) * data_pred
            h_prev = h
        denoised_prev = denoised
        report(callback, schedule, i, from_sigma_space(x, sigma_next), denoised)
    return x


def dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    generator: NoiseSource = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2S) ancestral ("DPM++ 2S a", k-diffusion's ``sample_dpmpp_2s_ancestral``) on the
    "trailing" grid: each step ``sigma -> sigma_next`` is split
    (:func:`~ldm_inpaint.samplers.sigmas.ancestral_step`) into a deterministic DPM-Solver++(2S) step to
    ``sigma_down`` (Lu et al. 2022, Algorithm 1 with ``r_1 = 1/2``: a first-order step to the log-SNR
    midpoint ``sigma_mid = sqrt(sigma sigma_down)``, whose data prediction then drives the first-order step
    to ``sigma_down``) and fresh noise ``sigma_up z``.

    ``eta`` scales the fresh noise: **1 is the standard DPM++ 2S a**; 0, the CLI default, is the
    deterministic DPM-Solver++(2S). The midpoint's model timestep is fractional
    (:func:`~ldm_inpaint.samplers.sigmas.sigma_to_timestep`); at ``eta = 1``, ``sigma_down = sigma_next^2 /
    sigma`` and the midpoint is ``sigma_next`` itself. ``z`` is drawn from ``generator`` once per step with
    ``sigma_up > 0``, in x's shape. diffusers has no such scheduler. ``2 steps_taken - 1`` denoiser calls: the
    last step, to sigma 0, returns the data prediction.
    """
    x = to_sigma_space(x, schedule.sigmas[0])
    for i, t in enumerate(schedule.timesteps):
        sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        denoised = denoise(denoiser, x, sigma, t)
        if sigma_down == 0:
            x = denoised
        else:
            sigma_mid = (sigma * sigma_down) ** 0.5
            t_mid = schedule.timestep_of(sigma_mid)
            h = math.log(sigma / sigma_down)
            x_mid = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoise(denoiser, x_mid, sigma_mid, t_mid)
        if sigma_up > 0:
            x = x + sigma_up * noise_like(x, generator)
        report(callback, schedule, i, from_sigma_space(x, sigma_next), denoised)
    return x
