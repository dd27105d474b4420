"""What a sampler reports after each step: :class:`StepInfo`, passed to the caller's ``callback``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from ldm_inpaint.samplers.grid import Schedule


@dataclass(frozen=True)
class StepInfo:
    """One finished step: ``index`` of ``total`` steps taken at model ``timestep`` and noise level ``sigma``
    (``sqrt((1 - alpha_bar) / alpha_bar)``); ``latent`` the LDM latent after the step and ``x0_pred`` the clean
    latent the step predicted, both (b, 4, h, w) in the sampler's dtype. Tensors are the sampler's own: copy
    them to keep them past the callback."""

    index: int
    total: int
    timestep: float
    sigma: float
    latent: Tensor
    x0_pred: Tensor


StepCallback = Callable[[StepInfo], None]
"""``callback(info)`` after each step; raising :class:`~ldm_inpaint.errors.Cancelled` stops the run."""


def report(
    callback: StepCallback | None, schedule: Schedule, index: int, latent: Tensor, x0_pred: Tensor
) -> None:
    """Call ``callback`` (if any) with the :class:`StepInfo` of step ``index`` of ``schedule``."""
    if callback is not None:
        timestep, sigma = schedule.timesteps[index], schedule.sigmas[index]
        callback(StepInfo(index, len(schedule), timestep, sigma, latent, x0_pred))
