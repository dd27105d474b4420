"""The one model-specific wrapper between a UNet and the samplers: ``eps = denoiser(x_t, t)``.

Everything that differs between models lives here, so that samplers see only ``eps(x_t, t)``: the inpainting
concat conditioning, blended latent diffusion for models without it, classifier-free guidance (Ho & Salimans
2022) and the model's output parameterization (eps, or v of Salimans & Ho 2022). Compare k-diffusion's
``DiscreteEpsDDPMDenoiser`` and sgm's guiders.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldm_inpaint.conditioning import Blend, unet_input
from ldm_inpaint.parameterization import Parameterization, check_parameterization, v_to_eps

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
    parameterization: Parameterization,
    alphas_cumprod: Tensor,
    blend: Blend | None = None,
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
    - ``blend`` (for text-to-image models, which have no ``concat``): the known region of ``x`` is replaced
      by the original latent diffused to ``t`` before each call (:class:`Blend`); the UNet, guidance and the
      v -> eps conversion all see the blended ``x``.

    The UNet inputs are cast to ``context.dtype`` (the model's dtype); ``t`` is passed as given and the result
    is returned in the dtype of ``x``.
    """
    check_parameterization(parameterization)
    guided = guidance_scale != 1.0
    if guided and uncond_context is None:
        raise ValueError(f"guidance_scale {guidance_scale} needs an unconditional context, found None")
    model_dtype = context.dtype
    alphas_cumprod = alphas_cumprod.to(context.device)

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        if blend is not None:
            x = blend(x, _interpolate(alphas_cumprod, t))
        b = x.shape[0]
        x_in = unet_input(x, None if concat is None else _to_batch(concat, b, "concat")).to(model_dtype)
        cond = _to_batch(context, b, "context")
        if guided:
            uncond = _to_batch(uncond_context, b, "uncond_context")
            # (b, c, h, w) -> (2b, c, h, w): the unconditional half first, like the original
            out = unet(torch.cat([x_in, x_in]), torch.cat([t, t]), torch.cat([uncond, cond])).to(x.dtype)
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        else:
            out = unet(x_in, t, cond).to(x.dtype)
        if parameterization == "v":
            # (b,) -> (b, 1, 1, 1)
            alpha_bar = _interpolate(alphas_cumprod, t).to(x.dtype)[:, None, None, None]
            out = v_to_eps(out, x, alpha_bar)
        return out

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
