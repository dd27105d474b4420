"""Inpainting from top to bottom: image + mask + prompt -> latents -> sampler over the UNet -> image.

Conditioning follows the original RunwayML / Stability AI inpainting scripts exactly:

1. image in [-1, 1]; mask in {0, 1} (white = repaint, binarized at 0.5);
2. masked image = image * (mask < 0.5), encoded by the VAE — the posterior **mean** (the original draws a
   sample; the mean makes runs deterministic) — times the scale factor;
3. mask resized to latent size with nearest;
4. UNet input = cat(noisy latent, mask, masked-image latent); text contexts for the prompt and the negative
   prompt, computed once per call;
5. start noise = ``np.random.RandomState(seed).randn(n, 4, h/8, w/8)`` as float32 (so seeds carry over from
   the original demos); stochastic DDIM noise from a torch generator seeded with the same seed;
6. the sampler's final latent / scale factor -> VAE decoder -> image, cropped back to the input size
   (inputs are edge-padded to multiples of 64, as the SD2 demo does: the UNet halves the latent three times).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL.Image import Image
from torch import Tensor

from ldm_inpaint import image_io, masks
from ldm_inpaint.checkpoint import load_model
from ldm_inpaint.config import ModelConfig
from ldm_inpaint.denoiser import make_denoiser
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.masks import MaskMode
from ldm_inpaint.models.autoencoder import AutoencoderKL
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.models.tiling import decode_tiled, encode_tiled
from ldm_inpaint.samplers import NOISE_FREE, SAMPLERS
from ldm_inpaint.schedule import alphas_cumprod
from ldm_inpaint.tokenizer import chunk_count

# Above this latent side (1024 pixels for SD) the VAE runs in overlapping tiles unless told otherwise
# (``models.tiling``). Measured on CPU in float32: an untiled decode takes 3.8 GB on top of the weights at
# 1024x1024 and grows with the pixel count (about 15 GB at 2048x2048); in 512-pixel tiles it takes 1.0 GB at
# any size. Tiling is not free (tiles see only themselves, see ``models.tiling``), so it is left off below.
AUTO_TILING_LATENT_SIDE = 128


@dataclass
class InpaintResult:
    """Images (n, 3, H, W) in [-1, 1] at the input size, and the final latents (n, 4, h/8, w/8) before decoding."""

    images: Tensor
    latents: Tensor
    steps_taken: int

    def to_pil(self) -> list[Image]:
        return image_io.tensor_to_pil(self.images)


def start_noise(seed: int, n: int, latent_size: tuple[int, int], channels: int = 4) -> Tensor:
    """The original demos' start code: ``np.random.RandomState(seed).randn(n, 4, h, w)`` as float32."""
    noise = np.random.RandomState(seed).randn(n, channels, *latent_size)
    return torch.from_numpy(noise.astype(np.float32))


def _as_image_tensor(image: Image | Tensor) -> Tensor:
    return image_io.image_to_tensor(image) if isinstance(image, Image) else image.float()


def _as_mask_tensor(mask: Image | Tensor) -> Tensor:
    if isinstance(mask, Image):
        return image_io.mask_to_tensor(mask)
    return (mask.float() >= 0.5).float()


def _composite(original: Tensor, painted: Tensor, alpha: Tensor) -> Tensor:
    """``painted`` where ``alpha`` is 1, ``original`` where it is 0, blended in between."""
    return original * (1 - alpha) + painted * alpha


def _use_tiling(latent_size: Sequence[int], tile: bool | None) -> bool:
    return max(latent_size) > AUTO_TILING_LATENT_SIDE if tile is None else tile


def _float32_copy(vae: AutoencoderKL) -> AutoencoderKL:
    """A float32 twin of ``vae`` (the same weights, upcast exactly: about 330 MB for SD's VAE)."""
    return copy.deepcopy(vae).float()


def check_options(
    sampler: str, steps: int, guidance_scale: float, eta: float, n_samples: int = 1, timesteps: int = 1000
) -> None:
    """Reject bad sampling options before any work is done (the CLI calls this before loading weights)."""
    if sampler not in SAMPLERS:
        raise LdmInpaintError(f"unknown sampler {sampler!r}; available: {sorted(SAMPLERS)}")
    if not 1 <= steps <= timesteps:
        raise LdmInpaintError(f"steps must be in 1..{timesteps} (the training timesteps), found {steps}")
    if sampler in NOISE_FREE and eta != 0:
        raise LdmInpaintError(f"the {sampler} sampler injects no noise and needs eta 0, found eta {eta}")
    if not guidance_scale >= 0:
        raise LdmInpaintError(f"guidance scale must be >= 0, found {guidance_scale}")
    if not 0 <= eta <= 1:
        raise LdmInpaintError(f"eta must be in [0, 1], found {eta}")
    if n_samples < 1:
        raise LdmInpaintError(f"number of samples must be >= 1, found {n_samples}")


def check_controls(mask_grow: int, mask_blur: float, paste_back: bool, crop_to_mask: int | None) -> None:
    """Reject inconsistent inpainting controls before any work is done."""
    if mask_grow < 0 or mask_blur < 0 or (crop_to_mask is not None and crop_to_mask < 0):
        raise LdmInpaintError(
            f"mask grow, mask blur and crop padding must be >= 0, found {mask_grow}, {mask_blur}, {crop_to_mask}"
        )
    if mask_blur and not (paste_back or crop_to_mask is not None):
        raise LdmInpaintError(
            "mask blur softens the paste-back composite: use it with paste-back or crop-to-mask"
        )


class InpaintPipeline:
    """A loaded model plus its noise schedule; call it to inpaint."""

    def __init__(self, model: LatentDiffusion) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.alphas_cumprod = alphas_cumprod(self.config.schedule)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: str | Path | ModelConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        use_ema: bool = False,
    ) -> InpaintPipeline:
        loaded = load_model(path, config, use_ema=use_ema, dtype=dtype, device=device)
        return cls(loaded.model)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE downsamplings), 8 for SD."""
        return 2 ** (len(self.config.autoencoder.ch_mult) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (64 for SD): the VAE's factor times the UNet's, whose skip
        connections need latent sides divisible by 2 ** (number of UNet downsamplings)."""
        return self.latent_factor * 2 ** (len(self.config.unet.channel_mult) - 1)

    def encode_prompts(self, prompts: Sequence[str], chunks: int | None = None) -> Tensor:
        """CLIP contexts (n, 77, width) for a list of prompts; (n, chunks * 77, width) with ``chunks``."""
        return self.model.cond_stage_model(list(prompts), chunks)

    def encode_masked_image(self, image: Tensor, mask: Tensor, tile: bool | None = None) -> Tensor:
        """The masked image's VAE posterior mean times the scale factor, (b, 4, h/8, w/8), in the model's
        dtype. ``tile``: encode in overlapping tiles (``models.tiling``); None: when a side of the latent
        exceeds :data:`AUTO_TILING_LATENT_SIDE`."""
        masked_image = (image * (mask < 0.5)).to(device=self.model.device, dtype=self.model.dtype)
        latent_size = [side // self.latent_factor for side in masked_image.shape[-2:]]
        if _use_tiling(latent_size, tile):
            mean = self._run_vae(encode_tiled, masked_image, "encoding")
        else:
            mean = self._run_vae(lambda vae, x: vae.encode(x).mean, masked_image, "encoding")
        return (mean * self.config.scale_factor).to(self.model.dtype)

    def decode(self, latents: Tensor, tile: bool | None = None) -> Tensor:
        """Latents -> float32 images in [-1, 1] (unclamped). ``tile``: decode in overlapping tiles
        (``models.tiling``); None: when a side of the latent exceeds :data:`AUTO_TILING_LATENT_SIDE`."""
        if not torch.isfinite(latents).all():
            raise LdmInpaintError(
                f"the sampler produced non-finite latents (NaN/inf) in {self.model.dtype}; "
                "in float16 the UNet can overflow: use bf16 or fp32"
            )
        z = (latents / self.config.scale_factor).to(device=self.model.device, dtype=self.model.dtype)
        run = decode_tiled if _use_tiling(z.shape[-2:], tile) else AutoencoderKL.decode
        return self._run_vae(run, z, "decoding").float()

    def _run_vae(self, run: Callable[[AutoencoderKL, Tensor], Tensor], x: Tensor, what: str) -> Tensor:
        """``run(vae, x)``. Half precision can overflow in the VAE (inf, then NaN): if the result is not
        finite, it is computed again with a float32 copy of the VAE, with one warning. Never returns a
        non-finite result."""
        vae = self.model.first_stage_model
        out = run(vae, x)
        if out.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(out).all():
            half = str(out.dtype).removeprefix("torch.")
            warnings.warn(f"VAE {what} gave NaN/inf in {half} (overflow): redone in float32", stacklevel=3)
            out = run(_float32_copy(vae), x.float())
        if not torch.isfinite(out).all():
            raise LdmInpaintError(f"VAE {what} produced non-finite values (NaN/inf) in {out.dtype}")
        return out

    @torch.inference_mode()
    def __call__(
        self,
        image: Image | Tensor,
        mask: Image | Tensor,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str = "",
        sampler: str = "ddim",
        steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        seed: int = 0,
        n_samples: int = 1,
        height: int | None = None,
        width: int | None = None,
        start_latent: Tensor | None = None,
        long_prompts: bool = False,
        vae_tiling: bool | None = None,
        mask_grow: int = 0,
        mask_blur: float = 0.0,
        mask_mode: MaskMode = "nearest",
        paste_back: bool = False,
        crop_to_mask: int | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> InpaintResult:
        """Inpaint ``image`` where ``mask`` is white. ``prompt`` is one string or one per sample; images and
        masks are PIL images or tensors ((1, 3, H, W) in [-1, 1] and (1, 1, H, W) in [0, 1]).

        - ``height`` / ``width`` resize the input first; sides that are not multiples of
          :attr:`size_multiple` (64 for SD) are edge-padded and the result cropped back.
        - ``long_prompts`` encodes text beyond 75 tokens in extra 77-token windows instead of truncating it
          (the original truncates).
        - ``vae_tiling`` runs the VAE in overlapping tiles (True), in one piece (False) or in tiles above
          :data:`AUTO_TILING_LATENT_SIDE` (None).

        Inpainting controls, all off by default (a plain run is the original's):

        - ``mask_grow`` dilates the mask by that many pixels; ``mask_mode`` "max" marks a latent cell for
          repainting when any of its pixels is (the original: "nearest");
        - ``paste_back`` composites the original pixels outside the mask over the result, with the mask
          blurred by ``mask_blur`` pixels (Gaussian sigma) as alpha, so the unmasked region is kept exactly;
        - ``crop_to_mask`` inpaints only the box around the mask grown by that many pixels, resized to the
          model's native size (512 for SD), and pastes it back into the full image (always composited).
        """
        check_options(sampler, steps, guidance_scale, eta, n_samples, self.config.schedule.timesteps)
        if not self.config.is_inpainting:
            raise LdmInpaintError(
                f"config {self.config.name!r} is a text-to-image model (4-channel UNet); the inpainting pipeline "
                "needs an inpainting checkpoint (9-channel UNet)"
            )
        check_controls(mask_grow, mask_blur, paste_back, crop_to_mask)
        prompts = [prompt] * n_samples if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n_samples:
            raise LdmInpaintError(f"expected 1 or {n_samples} prompts (one per sample), found {len(prompts)}")
        image, mask = _as_image_tensor(image), _as_mask_tensor(mask)
        if image.shape[-2:] != mask.shape[-2:]:
            raise LdmInpaintError(
                f"image is {tuple(image.shape[-2:])} (h, w) but mask is {tuple(mask.shape[-2:])}; resize the mask"
            )
        mask = masks.grow(mask, mask_grow)
        inpaint = partial(
            self._inpaint,
            prompts=prompts,
            negative_prompt=negative_prompt,
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
            eta=eta,
            seed=seed,
            start_latent=start_latent,
            long_prompts=long_prompts,
            vae_tiling=vae_tiling,
            mask_mode=mask_mode,
            callback=callback,
        )
        if crop_to_mask is not None:
            return self._inpaint_box(inpaint, image, mask, crop_to_mask, mask_blur)
        if height is not None or width is not None:
            size = (height or image.shape[-2], width or image.shape[-1])
            image = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
            mask = F.interpolate(mask, size=size, mode="nearest")
        result = inpaint(image, mask)
        if paste_back:
            result.images = _composite(image, result.images, masks.blur(mask, mask_blur))
        return result

    def native_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) with the longer side at the model's training size (512 for SD) and the aspect ratio kept,
        both multiples of :attr:`size_multiple`."""
        native = self.config.image_size * self.latent_factor
        scale = native / max(height, width)
        step = self.size_multiple
        return tuple(max(step, round(side * scale / step) * step) for side in (height, width))

    def _inpaint_box(
        self,
        inpaint: Callable[[Tensor, Tensor], InpaintResult],
        image: Tensor,
        mask: Tensor,
        padding: int,
        blur: float,
    ) -> InpaintResult:
        """Inpaint the padded box around the mask at the native size and composite it into the full image."""
        box = masks.bounding_box(mask, padding)
        if box is None:
            return inpaint(image, mask)
        top, left, bottom, right = box
        box_image, box_mask = image[..., top:bottom, left:right], mask[..., top:bottom, left:right]
        size = self.native_size(bottom - top, right - left)
        result = inpaint(
            F.interpolate(box_image, size=size, mode="bicubic", antialias=True, align_corners=False),
            F.interpolate(box_mask, size=size, mode="nearest"),
        )
        # (n, 3, native h, native w) -> (n, 3, box h, box w)
        painted = F.interpolate(result.images, size=box_image.shape[-2:], mode="bicubic", antialias=True)
        images = image.expand(len(painted), -1, -1, -1).clone()
        images[..., top:bottom, left:right] = _composite(box_image, painted, masks.blur(box_mask, blur))
        return InpaintResult(images=images, latents=result.latents, steps_taken=result.steps_taken)

    def _inpaint(
        self,
        image: Tensor,
        mask: Tensor,
        *,
        prompts: list[str],
        negative_prompt: str,
        sampler: str,
        steps: int,
        guidance_scale: float,
        eta: float,
        seed: int,
        start_latent: Tensor | None,
        long_prompts: bool,
        vae_tiling: bool | None,
        mask_mode: MaskMode,
        callback: Callable[[int, int], None] | None,
    ) -> InpaintResult:
        """The original inpainting run on (1, 3, H, W) / (1, 1, H, W) tensors of the final size."""
        n_samples = len(prompts)
        image, out_size = image_io.pad_to_multiple(image, self.size_multiple)
        mask, _ = image_io.pad_to_multiple(mask, self.size_multiple)
        latent_size = (image.shape[-2] // self.latent_factor, image.shape[-1] // self.latent_factor)

        device, dtype = self.model.device, self.model.dtype
        if not mask.any():
            warnings.warn("the mask is empty (nothing to repaint): returning the input image", stacklevel=3)
            latent = self.encode_masked_image(image, mask, vae_tiling).float().cpu()
            return InpaintResult(
                images=image_io.crop(image, out_size).expand(n_samples, -1, -1, -1).clone(),
                latents=latent.expand(n_samples, -1, -1, -1).clone(),
                steps_taken=0,
            )
        masked_latent = self.encode_masked_image(image, mask, vae_tiling)
        mask_latent = masks.to_latent(mask, latent_size, mask_mode).to(device=device, dtype=dtype)
        concat = torch.cat([mask_latent, masked_latent], dim=1).expand(n_samples, -1, -1, -1)
        # Long prompts: every context (prompt and negative) gets the same number of 75-token windows.
        chunks = max(chunk_count(text) for text in [*prompts, negative_prompt]) if long_prompts else None
        context = self.encode_prompts(prompts, chunks)
        uncond_context = None
        if guidance_scale != 1.0:
            uncond_context = self.encode_prompts([negative_prompt] * n_samples, chunks)

        x_T = start_noise(seed, n_samples, latent_size) if start_latent is None else start_latent.float()
        expected_shape = (n_samples, 4, *latent_size)
        if tuple(x_T.shape) != expected_shape:
            raise LdmInpaintError(f"start latent must have shape {expected_shape}, found {tuple(x_T.shape)}")
        denoiser = make_denoiser(
            self.model.model.diffusion_model,
            context=context,
            uncond_context=uncond_context,
            guidance_scale=guidance_scale,
            concat=concat,
            parameterization=self.config.parameterization,
            alphas_cumprod=self.alphas_cumprod,
        )
        generator = torch.Generator(device=device).manual_seed(seed)
        steps_taken = 0

        def on_step(index: int, total: int) -> None:
            nonlocal steps_taken
            steps_taken = total
            if callback is not None:
                callback(index, total)

        latents = SAMPLERS[sampler](
            denoiser,
            x_T.to(device),
            self.alphas_cumprod,
            steps,
            eta=eta,
            generator=generator,
            callback=on_step,
        )
        images = image_io.crop(self.decode(latents, vae_tiling), out_size)
        return InpaintResult(images=images.cpu(), latents=latents.float().cpu(), steps_taken=steps_taken)
