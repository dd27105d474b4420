"""What the UNet is conditioned on besides text, built one way for inference, training and evaluation.

An inpainting (9-channel) UNet sees ``cat(x_t, mask, masked-image latent)`` (the original
``LatentInpaintDiffusion`` with ``concat_keys = ("mask", "masked_image")``):

1. the mask in {0, 1}, white = repaint, binarized at 0.5 (:func:`binarize_mask`);
2. the masked image ``image * (mask < 0.5)`` (:func:`mask_image`), image in [-1, 1];
3. its VAE posterior **mean** times the scale factor (:func:`encode_latent`; the original draws a sample, the
   mean makes runs deterministic);
4. the mask resized to latent size (:func:`~ldm_inpaint.masks.to_latent`, nearest as the original).

A text-to-image (4-channel) UNet inpaints by blended latent diffusion (:class:`Blend`). Nothing here turns
autograd off: the trainer builds its inputs with these functions under its own ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm_inpaint.masks import MaskMode, to_latent
from ldm_inpaint.models.autoencoder import AutoencoderKL
from ldm_inpaint.models.tiling import encode_tiled
from ldm_inpaint.parameterization import noised


def binarize_mask(mask: Tensor) -> Tensor:
    """A mask with values in [0, 1] as {0, 1} floats, 1 (repaint) from 0.5 up."""
    return (mask.float() >= 0.5).float()


def mask_image(image: Tensor, mask: Tensor) -> Tensor:
    """The masked image the inpainting UNet sees: ``image * (mask < 0.5)``, repainted pixels set to 0
    (mid-gray in [-1, 1])."""
    return image * (mask < 0.5)


def encode_latent(vae: AutoencoderKL, image: Tensor, scale_factor: float, tile: bool = False) -> Tensor:
    """The latent of ``image`` (b, 3, H, W) in [-1, 1]: the VAE posterior mean times ``scale_factor``, in
    overlapping tiles with ``tile`` (:mod:`~ldm_inpaint.models.tiling`)."""
    mean = encode_tiled(vae, image) if tile else vae.encode(image).mean
    return mean * scale_factor


def inpainting_concat(
    encode: Callable[[Tensor], Tensor],
    image: Tensor,
    mask: Tensor,
    latent_size: tuple[int, int],
    mask_mode: MaskMode = "nearest",
) -> Tensor:
    """``cat(mask at latent size, latent of the masked image)`` (b, 5, h, w) for a binary ``mask``
    (b, 1, H, W); ``encode`` maps pixels to latents (:func:`encode_latent`, or a memoized form of it). The
    UNet input is ``cat(x_t, this)`` (:func:`unet_input`)."""
    masked_latent = encode(mask_image(image, mask))
    mask_latent = to_latent(mask, latent_size, mask_mode).to(masked_latent)
    return torch.cat([mask_latent, masked_latent], dim=1)


def unet_input(x: Tensor, concat: Tensor | None) -> Tensor:
    """``cat(x, concat)`` on the channel dim (an inpainting UNet), or ``x`` (a text-to-image UNet)."""
    return x if concat is None else torch.cat([x, concat], dim=1)


@dataclass(frozen=True)
class Blend:
    """Blended latent diffusion (Avrahami et al. 2023, "Blended Latent Diffusion", Algorithm 1): inpainting
    with a text-to-image (4-channel) model by keeping the known region on the forward-diffusion path of the
    original latent.

    ``known`` (1 or b, 4, h, w) is the clean latent x0 of the original image, ``keep`` (1 or b, 1, h, w) is 1
    where it is kept (the mask's 0 at latent size) and 0 where the model repaints, ``noise`` (b, 4, h, w) the
    run's start noise. Before each UNet call at timestep ``t`` the known region of ``x_t`` is replaced by x0
    diffused to ``t`` with that noise (Ho et al. 2020, eq. 4):

    ``x_t <- keep (sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise) + (1 - keep) x_t``.

    Every sampler update is elementwise in ``x_t``, so the repainted region evolves exactly as with the
    paper's (and diffusers') "blend after each step"; the sampler's own state in the known region is never
    read back, and :meth:`finish` sets the final latent there to x0. One difference with diffusers remains:
    at strength 1 its first UNet call sees pure noise everywhere, here the known region is x0 diffused to the
    first timestep already, as in the paper's Algorithm 1. ``alpha_bar_t`` is that of the timestep the
    sampler passes, interpolated linearly between integers; where a sigma sampler rounds its timestep (the
    Karras grid) or passes a fractional one (DPM++ 2S a midpoints, log-sigma interpolation), the known region
    sits at a slightly different noise level from the repainted one: a small mismatch, not an error.
    """

    known: Tensor
    keep: Tensor
    noise: Tensor

    def __call__(self, x: Tensor, alpha_bar: Tensor) -> Tensor:
        """``x`` (b, 4, h, w) with its known region replaced; ``alpha_bar`` (b,) of each sample's timestep."""
        # (b,) -> (b, 1, 1, 1)
        alpha_bar = alpha_bar.to(x.dtype)[:, None, None, None]
        diffused = noised(self.known.to(x), self.noise.to(x), alpha_bar)
        return torch.where(self.keep.to(x.device) > 0.5, diffused, x)

    def finish(self, latents: Tensor) -> Tensor:
        """The sampler's final latents with the known region set to x0 exactly."""
        return torch.where(self.keep > 0.5, self.known, latents)
