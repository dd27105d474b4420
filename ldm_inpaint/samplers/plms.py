"""PLMS, the pseudo linear multi-step sampler (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models
on Manifolds"), in the variant of the original LDM ``PLMSSampler``."""

from __future__ import annotations

from torch import Tensor

from ldm_inpaint.denoiser import Denoiser, timesteps_like
from ldm_inpaint.samplers.ddim import ddim_step
from ldm_inpaint.samplers.grid import Schedule
from ldm_inpaint.samplers.noise import NoiseSource
from ldm_inpaint.samplers.progress import StepCallback, report


def plms(
    denoiser: Denoiser,
    x: Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    generator: NoiseSource = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Sample from ``x`` at the first level of ``schedule`` (the DDIM grid) with PLMS: a denoiser call a
    step, plus one.

    Each step is the deterministic DDIM update (the PNDM "transfer part") with eps replaced by a multistep
    estimate ``eps'`` built from the current eps and the last three:

    - first step, where the PNDM paper uses Runge-Kutta steps and the original a pseudo improved Euler step:
      ``eps' = (eps_t + eps(x_prev, t_next)) / 2`` with the provisional DDIM ``x_prev`` and the next (lower)
      grid timestep ``t_next`` (the same timestep when the grid has one step) -- a second denoiser call;
    - then Adams-Bashforth of order 2, 3, 4: ``(3 e - e1) / 2``, ``(23 e - 16 e1 + 5 e2) / 12``,
      ``(55 e - 59 e1 + 37 e2 - 9 e3) / 24`` with ``e1, e2, e3`` the eps of the previous steps.

    Deterministic: ``eta`` is 0 and ``generator`` unused (the common signature). On a cut grid (strength < 1)
    the first kept step is the pseudo improved Euler step.
    """
    old_eps: list[Tensor] = []
    for i, t in enumerate(schedule.timesteps):
        a_t, a_prev = schedule.alpha_bars[i], schedule.alpha_bars[i + 1]
        eps = denoiser(x, timesteps_like(x, t))
        if old_eps:
            eps_prime = _adams_bashforth(eps, old_eps)
        else:
            t_next = schedule.timesteps[min(i + 1, len(schedule) - 1)]
            x_provisional, _ = ddim_step(x, eps, a_t, a_prev)
            eps_next = denoiser(x_provisional, timesteps_like(x, t_next))
            eps_prime = (eps + eps_next) / 2
        x, x0_pred = ddim_step(x, eps_prime, a_t, a_prev)
        old_eps = [*old_eps[-2:], eps]
        report(callback, schedule, i, x, x0_pred)
    return x


def _adams_bashforth(eps: Tensor, old_eps: list[Tensor]) -> Tensor:
    """The Adams-Bashforth combination of order ``len(old_eps) + 1`` (at most 4); ``old_eps`` oldest first."""
    if len(old_eps) == 1:
        return (3 * eps - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
