"""The parameterization math of a diffusion model, in one place for sampling and training.

Notation (Ho et al. 2020; Salimans & Ho 2022): ``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``. An
"eps" model predicts ``eps``; a "v" model predicts ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0``
(Salimans & Ho 2022, Sec. 4; SD 2's 768 px models). ``alpha_bar`` is a Python float or a tensor that
broadcasts against the latents, e.g. (b, 1, 1, 1).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Parameterization = Literal["eps", "v"]
AlphaBar = float | Tensor


def check_parameterization(parameterization: str) -> None:
    if parameterization not in ("eps", "v"):
        raise ValueError(f"parameterization must be 'eps' or 'v', found {parameterization!r}")


def noised(x0: Tensor, eps: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``, the forward process (Ho et al. 2020, eq. 4)."""
    return alpha_bar**0.5 * x0 + (1.0 - alpha_bar) ** 0.5 * eps


def eps_to_x0(x_t: Tensor, eps: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """``x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)`` (the prediction inside DDIM's step)."""
    return (x_t - (1.0 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def v_to_eps(v: Tensor, x_t: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """``eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t``."""
    return alpha_bar**0.5 * v + (1.0 - alpha_bar) ** 0.5 * x_t


def v_to_x0(v: Tensor, x_t: Tensor, alpha_bar: AlphaBar) -> Tensor:
    """``x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v``."""
    return alpha_bar**0.5 * x_t - (1.0 - alpha_bar) ** 0.5 * v


def training_target(
    parameterization: Parameterization, x0: Tensor, eps: Tensor, alpha_bar: AlphaBar
) -> Tensor:
    """What a model is trained to output for ``x_t = noised(x0, eps, alpha_bar)``: ``eps``, or
    ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0`` (the original ``DDPM.get_v``)."""
    check_parameterization(parameterization)
    if parameterization == "eps":
        return eps
    return alpha_bar**0.5 * eps - (1.0 - alpha_bar) ** 0.5 * x0
