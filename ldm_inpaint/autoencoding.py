"""The VAE step of the flow: images in [-1, 1] -> latents, and latents -> images.

Both run in overlapping tiles above a size (``models.tiling``), and both redo in float32 a half-precision
pass that overflowed (inf, then NaN), with a note for the user; neither returns a non-finite result. The
latent itself is :func:`~ldm_inpaint.conditioning.encode_latent`: the posterior mean times the scale factor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from ldm_inpaint.conditioning import encode_latent
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.models.autoencoder import AutoencoderKL
from ldm_inpaint.models.tiling import decode_tiled
from ldm_inpaint.runtime import fresh_large_blocks

# Above this latent side (1024 pixels for SD) the VAE runs in overlapping tiles unless told otherwise
# (``models.tiling``). Measured on CPU in float32: an untiled decode takes 3.8 GB on top of the weights at
# 1024x1024 and grows with the pixel count (about 15 GB at 2048x2048); in 512-pixel tiles it takes 1.0 GB at
# any size. Tiling is not free (tiles see only themselves, see ``models.tiling``), so it is left off below.
AUTO_TILING_LATENT_SIDE = 128
# On CPU the VAE takes at most this many pixels per call, splitting a batch of larger images: at 512 x 512 its
# full-resolution activations (128 channels, 134 MB per tensor in float32) are far beyond any cache, so a batch
# of them adds memory traffic and nothing else (measured, SD's VAE, 1 thread: 4 images in one call 8 % slower
# than one at a time, encoding and decoding alike). Small images still go together; GPUs take whole batches.
CPU_PIXELS_PER_CALL = 512 * 512


def use_tiling(latent_size: Sequence[int], tile: bool | None) -> bool:
    """``tile``, or for None (automatic): whether a side of the latent exceeds :data:`AUTO_TILING_LATENT_SIDE`."""
    return max(latent_size) > AUTO_TILING_LATENT_SIDE if tile is None else tile


def encode(
    vae: AutoencoderKL, image: Tensor, scale_factor: float, tile: bool | None, notes: list[str] | None = None
) -> Tensor:
    """The latent (b, 4, h/8, w/8) of ``image`` (b, 3, H, W), in the VAE's dtype. ``tile``: in overlapping
    tiles; None: automatic (:func:`use_tiling`)."""
    weight = _weight(vae)
    pixels = image.to(device=weight.device, dtype=weight.dtype)
    tiled = use_tiling([side // vae.downscale_factor for side in pixels.shape[-2:]], tile)
    run = partial(encode_latent, scale_factor=scale_factor, tile=tiled)
    return _run(vae, run, pixels, "encoding", notes, pixels.shape[-2] * pixels.shape[-1]).to(weight.dtype)


def decode(
    vae: AutoencoderKL,
    latents: Tensor,
    scale_factor: float,
    tile: bool | None,
    notes: list[str] | None = None,
) -> Tensor:
    """Latents -> float32 images in [-1, 1] (unclamped). ``tile``: in overlapping tiles; None: automatic."""
    weight = _weight(vae)
    if not torch.isfinite(latents).all():
        raise LdmInpaintError(
            f"the sampler produced non-finite latents (NaN/inf) in {weight.dtype}; "
            "in float16 the UNet can overflow: use bf16 or fp32"
        )
    z = (latents / scale_factor).to(device=weight.device, dtype=weight.dtype)
    run = decode_tiled if use_tiling(z.shape[-2:], tile) else AutoencoderKL.decode
    pixels = z.shape[-2] * z.shape[-1] * vae.downscale_factor**2
    return _run(vae, run, z, "decoding", notes, pixels).float()


def _weight(vae: AutoencoderKL) -> Tensor:
    """A weight of the VAE that packing leaves in place: its device and dtype are the VAE's."""
    return vae.decoder.norm_out.weight


def _run(
    vae: AutoencoderKL,
    run: Callable[[AutoencoderKL, Tensor], Tensor],
    x: Tensor,
    what: str,
    notes: list[str] | None,
    pixels_per_image: int,
) -> Tensor:
    """``run(vae, x)``, on CPU in parts of at most :data:`CPU_PIXELS_PER_CALL` pixels (each image's result
    is then the one a call of its own gives); a half-precision result that is not finite is computed again
    with a float32 copy of the VAE, and a note says so. Runs inside
    :func:`~ldm_inpaint.runtime.fresh_large_blocks` (a lean allocator mode for the VAE's large activations,
    when the process chose it)."""
    per_call = max(1, CPU_PIXELS_PER_CALL // pixels_per_image) if x.device.type == "cpu" else len(x)
    with fresh_large_blocks():
        out = torch.cat([_checked(vae, run, part, what, notes) for part in x.split(per_call)])
    if not torch.isfinite(out).all():
        raise LdmInpaintError(f"VAE {what} produced non-finite values (NaN/inf) in {out.dtype}")
    return out


def _checked(
    vae: AutoencoderKL,
    run: Callable[[AutoencoderKL, Tensor], Tensor],
    x: Tensor,
    what: str,
    notes: list[str] | None,
) -> Tensor:
    out = run(vae, x)
    if out.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(out).all():
        half = str(out.dtype).removeprefix("torch.")
        note = f"VAE {what} gave NaN/inf in {half} (overflow): redone in float32"
        if notes is not None and note not in notes:
            notes.append(note)
        out = run(vae.float32_copy(), x.float())
    return out
