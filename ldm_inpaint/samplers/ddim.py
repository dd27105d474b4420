"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) on the original LDM time grid."""

from __future__ import annotations

from torch import Tensor

from ldm_inpaint.denoiser import Denoiser, timesteps_like
from ldm_inpaint.parameterization import eps_to_x0
from ldm_inpaint.samplers.grid import Schedule
from ldm_inpaint.samplers.noise import NoiseSource, noise_like
from ldm_inpaint.samplers.progress import StepCallback, report


def ddim_step(
    x: Tensor,
    eps: Tensor,
    a_t: float,
    a_prev: float,
    sigma_t: float = 0.0,
    generator: NoiseSource = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM update x_t -> x_prev (Song et al. 2021, eq. 12), and the x0 it predicts:

    ``x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``,
    ``x_prev = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z``, ``z ~ N(0, I)``.

    ``z`` is drawn from ``generator`` (:func:`~ldm_inpaint.samplers.noise.noise_like`) only when
    ``sigma_t > 0``.
    """
    x0_pred = eps_to_x0(x, eps, a_t)
    x_prev = a_prev**0.5 * x0_pred + (1.0 - a_prev - sigma_t**2) ** 0.5 * eps
    if sigma_t > 0:
        x_prev = x_prev + sigma_t * noise_like(x, generator)
    return x_prev, x0_pred


def ddim(
    denoiser: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    generator: NoiseSource = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Sample from ``x``, the latent at the first level of ``schedule``, with DDIM, as the original
    ``DDIMSampler`` (on its grid, :func:`~ldm_inpaint.samplers.grid.ddim_grid`).

    ``eta`` scales the noise of each step, ``sigma_t = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))``
    (Song et al. 2021, eq. 16): 0 is the deterministic DDIM, 1 the DDPM posterior variance.
    """
    for i, t in enumerate(schedule.timesteps):
        a_t, a_prev = schedule.alpha_bars[i], schedule.alpha_bars[i + 1]
        sigma_t = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)) ** 0.5
        eps = denoiser(x, timesteps_like(x, t))
        x, x0_pred = ddim_step(x, eps, a_t, a_prev, sigma_t, generator)
        report(callback, schedule, i, x, x0_pred)
    return x
