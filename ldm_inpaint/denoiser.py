"""The one model-specific wrapper between a UNet and the samplers: ``eps = denoiser(x_t, t)``.

Everything that differs between models lives here, so that samplers see only ``eps(x_t, t)``: the inpainting
concat conditioning, classifier-free guidance (Ho & Salimans 2022) and the model's output parameterization
(eps, or v of Salimans & Ho 2022). Compare k-diffusion's ``DiscreteEpsDDPMDenoiser`` and sgm's guiders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(x, t) -> eps``: x (b, 4, h, w) the noisy latent; t (b,) float timesteps, maybe fractional."""

UNet = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``unet(x_in, t, context) -> output``, e.g. the SD UNet: x_in (b, c, h, w), t (b,), context (b, 77, d)."""


def make_denoiser(
    unet: UNet,
    context: Tensor,
    uncond_context: Tensor | None,
    guidance_scale: float,
    concat: Tensor | None,
    parameterization: Literal["eps", "v"],
    alphas_cumprod: Tensor,
) -> Denoiser:
    """Wrap ``unet`` into a :data:`Denoiser` that returns the guided eps prediction.

    - ``concat`` (b, 5, h, w) = ``cat([mask, masked-image latent])`` for inpainting models (else None) is
      appended to ``x`` on the channel dim: the UNet input is ``cat([x, mask, masked latent], 1)``.
    - Classifier-free guidance, ``out = uncond + scale * (cond - uncond)``, runs both branches in ONE UNet
      call on the batch ``cat([uncond, cond])`` (the original's order); both halves get the same ``concat``.
      With ``guidance_scale == 1`` the unconditional branch is skipped and ``uncond_context`` may be None.
    - ``context`` and ``uncond_context`` are (b, 77, d) or (1, 77, d), broadcast to the batch of ``x``.
    - For ``parameterization == "v"`` guidance is applied to the v outputs, which are then turned into eps:
      ``eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) x_t`` (Salimans & Ho 2022, Sec. 4), with
      ``alpha_bar`` interpolated linearly between integer timesteps.

    The UNet inputs are cast to ``context.dtype`` (the model's dtype); ``t`` is passed as given and the result
    is returned in the dtype of ``x``.
    """
    if parameterization not in ("eps", "v"):
        raise ValueError(f"parameterization must be 'eps' or 'v', found {parameterization!r}")
    guided = guidance_scale != 1.0
    if guided and uncond_context is None:
        raise ValueError(f"guidance_scale {guidance_scale} needs an unconditional context, found None")
    model_dtype = context.dtype
    alphas_cumprod = alphas_cumprod.to(context.device)

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        x_in = x if concat is None else torch.cat([x, _to_batch(concat, b, "concat")], dim=1)
        x_in = x_in.to(model_dtype)
        cond = _to_batch(context, b, "context")
        if guided:
            uncond = _to_batch(uncond_context, b, "uncond_context")
            # (b, c, h, w) -> (2b, c, h, w): the unconditional half first, like the original
            out = unet(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([uncond, cond])).to(x.dtype)
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        else:
            out = unet(x_in, t, cond).to(x.dtype)
        if parameterization == "eps":
            return out
        # (b,) -> (b, 1, 1, 1)
        alpha_bar = _interpolate(alphas_cumprod, t).to(x.dtype)[:, None, None, None]
        return alpha_bar.sqrt() * out + (1.0 - alpha_bar).sqrt() * x

    return denoiser


def timesteps_like(x: Tensor, t: float) -> Tensor:
    """The ``t`` argument of a :data:`Denoiser`: ``t`` for each sample of ``x``, (b,) float32, x's device."""
    return torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)


class CountedDenoiser:
    """A :data:`Denoiser` that counts its calls. Each call of a :func:`make_denoiser` denoiser is exactly one
    UNet evaluation (guidance batches both branches into it): ``calls`` is the number of UNet evaluations."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.denoiser(x, t)


def _to_batch(tensor: Tensor, b: int, name: str) -> Tensor:
    """Broadcast a conditioning tensor of batch 1 to batch ``b``; a batch of ``b`` passes unchanged."""
    if tensor.shape[0] not in (1, b):
        raise ValueError(f"{name} must have batch size 1 or {b} (that of x), found {tuple(tensor.shape)}")
    return tensor.expand(b, *tensor.shape[1:])


def _interpolate(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """``alpha_bar`` at (maybe fractional) timesteps ``t``: linear between integers and exact at integers."""
    t = t.to(alphas_cumprod.dtype).clamp(0, len(alphas_cumprod) - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=len(alphas_cumprod) - 1)
    return torch.lerp(alphas_cumprod[low], alphas_cumprod[high], t - low)
