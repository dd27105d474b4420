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

The same flow serves three more tasks, none of which the original inpainting scripts have:

- ``strength < 1`` (SDEdit, Meng et al. 2022; diffusers' img2img): the sampler takes only the end of its
  grid, starting from the full image's latent (posterior mean x scale factor) noised to that level;
- text-to-image models (4-channel UNet, no mask input) inpaint by **blended latent diffusion** (Avrahami et
  al. 2023, :class:`~ldm_inpaint.denoiser.Blend`): the known region is held on the original latent's
  forward-diffusion path and set to that latent at the end;
- no mask: image-to-image (the whole image repainted from its noised latent); no image: text-to-image. An
  inpainting model gets a full mask there, and the latent of the all-masked (mid-gray) image as its
  masked-image input, as in its training, where a quarter of the masks cover everything.

The constant work of a call (text contexts, VAE encodings) is memoized on the pipeline, so runs over seeds or
samplers encode each prompt and image once.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL.Image import Image
from torch import Tensor, nn

from ldm_inpaint import image_io, masks
from ldm_inpaint.checkpoint import load_model
from ldm_inpaint.config import ModelConfig
from ldm_inpaint.denoiser import Blend, CountedDenoiser, UNet, make_denoiser
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.masks import MaskMode
from ldm_inpaint.models.autoencoder import AutoencoderKL
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.models.packing import can_pack
from ldm_inpaint.models.tiling import decode_tiled, encode_tiled
from ldm_inpaint.runtime import fresh_large_blocks
from ldm_inpaint.samplers import NOISE_FREE, SAMPLERS, grid_steps
from ldm_inpaint.samplers.noise import kept_steps
from ldm_inpaint.schedule import alphas_cumprod
from ldm_inpaint.tokenizer import chunk_count

# Above this latent side (1024 pixels for SD) the VAE runs in overlapping tiles unless told otherwise
# (``models.tiling``). Measured on CPU in float32: an untiled decode takes 3.8 GB on top of the weights at
# 1024x1024 and grows with the pixel count (about 15 GB at 2048x2048); in 512-pixel tiles it takes 1.0 GB at
# any size. Tiling is not free (tiles see only themselves, see ``models.tiling``), so it is left off below.
AUTO_TILING_LATENT_SIDE = 128
# Entries of each memo (text contexts, image latents): enough for an ablation over a few prompts and images.
MEMO_SIZE = 8


@dataclass
class InpaintResult:
    """Images (n, 3, H, W) in [-1, 1] at the input size, the final latents (n, 4, h/8, w/8) before decoding,
    the sampler steps taken and the UNet evaluations made (guidance batches both branches into one)."""

    images: Tensor
    latents: Tensor
    steps_taken: int
    unet_evaluations: int

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
    """A float32 twin of ``vae`` with plain convolutions and the same attention slicing (the same weights,
    upcast exactly: about 330 MB for SD's VAE)."""
    with torch.device("meta"):
        twin = AutoencoderKL(vae.params)
    twin.load_state_dict({key: value.float() for key, value in vae.state_dict().items()}, assign=True)
    slices = {
        name: module.attention_slice
        for name, module in vae.named_modules()
        if hasattr(module, "attention_slice")
    }
    for name, module in twin.named_modules():
        if name in slices:
            module.attention_slice = slices[name]
    return twin.eval()


class _Memo:
    """A small least-recently-used map for the constant work that calls share (text contexts, latents)."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self.size = size
        self.entries: OrderedDict[Hashable, Tensor] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], Tensor]) -> Tensor:
        """The value stored under ``key``, or ``compute()``, stored (the oldest entry goes when full)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = self.entries[key] = compute()
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


def _digest(x: Tensor) -> tuple[tuple[int, ...], torch.dtype, str]:
    """A key for a tensor's contents: its shape, dtype and a hash of its bytes."""
    data = x.detach().cpu().contiguous().flatten().view(torch.uint8).numpy()
    return tuple(x.shape), x.dtype, hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def compile_unet(unet: nn.Module) -> UNet:
    """``torch.compile(unet)``; on CPU, with inductor's weight freezing for this UNet's calls only: its weights
    become constants of the compiled graph, pre-packed for oneDNN, with elementwise work fused into the
    convolutions (bfloat16 at 256 px on the README's benchmark machine: 0.43-0.46 s a step against 0.53-0.63 s
    eager; float32: 1.52-1.54 against 1.72-1.93 s). The frozen constants are a second copy of the UNet's
    weights (float32 at 256 px: peak 10.1 GB against 5.1 GB eager), and the compiled graph does not see weights
    changed after its first call: build a new pipeline to run edited weights."""
    compiled = torch.compile(unet)
    if next(unet.parameters()).device.type != "cpu":
        return compiled
    from torch._inductor import config as inductor_config

    def frozen(*args: Tensor, **kwargs: Tensor) -> Tensor:
        with inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return frozen


def check_options(
    sampler: str,
    steps: int,
    guidance_scale: float,
    eta: float,
    n_samples: int = 1,
    timesteps: int = 1000,
    strength: float = 1.0,
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
    try:
        kept_steps(grid_steps(sampler, steps, timesteps), strength)
    except ValueError as error:
        raise LdmInpaintError(str(error)) from None


def check_controls(
    mask_grow: int, mask_blur: float, paste_back: bool, crop_to_mask: int | None, has_mask: bool = True
) -> None:
    """Reject inconsistent inpainting controls before any work is done; ``has_mask``: whether a mask is given
    (the controls act on one)."""
    if mask_grow < 0 or mask_blur < 0 or (crop_to_mask is not None and crop_to_mask < 0):
        raise LdmInpaintError(
            f"mask grow, mask blur and crop padding must be >= 0, found {mask_grow}, {mask_blur}, {crop_to_mask}"
        )
    if mask_blur and not (paste_back or crop_to_mask is not None):
        raise LdmInpaintError(
            "mask blur softens the paste-back composite: use it with paste-back or crop-to-mask"
        )
    if not has_mask and (mask_grow or paste_back or crop_to_mask is not None):
        raise LdmInpaintError(
            "mask grow, paste-back and crop-to-mask act on a mask; without one (image-to-image, "
            f"text-to-image) leave them off, found mask grow {mask_grow}, paste-back {paste_back}, "
            f"crop-to-mask {crop_to_mask}"
        )


class InpaintPipeline:
    """A loaded model plus its noise schedule; call it to inpaint (or to repaint or generate images).

    Text contexts and VAE encodings are memoized across calls (:data:`MEMO_SIZE` of each, keyed by the
    prompts or the pixels): call :meth:`clear_memo` after changing the weights in place.
    """

    def __init__(self, model: LatentDiffusion, *, compile: bool = False) -> None:
        """``compile``: run the UNet through :func:`compile_unet` (the first call compiles it, which takes
        minutes; it pays off over many images of one size)."""
        self.model = model
        self.unet = compile_unet(model.model.diffusion_model) if compile else model.model.diffusion_model
        self.config: ModelConfig = model.config
        self.alphas_cumprod = alphas_cumprod(self.config.schedule)
        self._contexts = _Memo()
        self._latents = _Memo()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        config: str | Path | ModelConfig | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        use_ema: bool = False,
        pack: bool | None = None,
        compile: bool = False,
    ) -> InpaintPipeline:
        """Load a checkpoint (:func:`~ldm_inpaint.checkpoint.load_model`). ``pack``: pre-pack the convolution
        weights for oneDNN (default: when the device is the CPU and the dtype float32 or bfloat16, unless
        compiling, see :mod:`ldm_inpaint.models.packing`); ``compile``: see :class:`InpaintPipeline`."""
        pack = can_pack(device, dtype) and not compile if pack is None else pack
        loaded = load_model(path, config, use_ema=use_ema, dtype=dtype, device=device, pack=pack)
        return cls(loaded.model, compile=compile)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE downsamplings), 8 for SD."""
        return 2 ** (len(self.config.autoencoder.ch_mult) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (64 for SD): the VAE's factor times the UNet's, whose skip
        connections need latent sides divisible by 2 ** (number of UNet downsamplings)."""
        return self.latent_factor * 2 ** (len(self.config.unet.channel_mult) - 1)

    @property
    def native_side(self) -> int:
        """The side the model was trained at, in pixels (512 for SD, 768 for SD2-v): the default size of
        text-to-image."""
        return self.config.image_size * self.latent_factor

    def clear_memo(self) -> None:
        """Forget the memoized text contexts and image latents (needed only if the weights change)."""
        self._contexts, self._latents = _Memo(), _Memo()

    def encode_prompts(self, prompts: Sequence[str], chunks: int | None = None) -> Tensor:
        """CLIP contexts (n, 77, width) for a list of prompts; (n, chunks * 77, width) with ``chunks``."""
        return self.model.cond_stage_model(list(prompts), chunks)

    def encode_image(self, image: Tensor, tile: bool | None = None) -> Tensor:
        """The image's VAE posterior mean times the scale factor, (b, 4, h/8, w/8), in the model's dtype.
        ``tile``: encode in overlapping tiles (``models.tiling``); None: when a side of the latent exceeds
        :data:`AUTO_TILING_LATENT_SIDE`."""
        pixels = image.to(device=self.model.device, dtype=self.model.dtype)
        latent_size = [side // self.latent_factor for side in pixels.shape[-2:]]
        if _use_tiling(latent_size, tile):
            mean = self._run_vae(encode_tiled, pixels, "encoding")
        else:
            mean = self._run_vae(lambda vae, x: vae.encode(x).mean, pixels, "encoding")
        return (mean * self.config.scale_factor).to(self.model.dtype)

    def encode_masked_image(self, image: Tensor, mask: Tensor, tile: bool | None = None) -> Tensor:
        """:meth:`encode_image` of the masked image ``image * (mask < 0.5)``, the inpainting UNet's input."""
        return self.encode_image(image * (mask < 0.5), tile)

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
        non-finite result. Runs inside :func:`~ldm_inpaint.runtime.fresh_large_blocks` (a lean allocator
        mode for the VAE's large activations, when the process chose it)."""
        vae = self.model.first_stage_model
        with fresh_large_blocks():
            out = run(vae, x)
            if out.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(out).all():
                half = str(out.dtype).removeprefix("torch.")
                warnings.warn(
                    f"VAE {what} gave NaN/inf in {half} (overflow): redone in float32", stacklevel=3
                )
                out = run(_float32_copy(vae), x.float())
        if not torch.isfinite(out).all():
            raise LdmInpaintError(f"VAE {what} produced non-finite values (NaN/inf) in {out.dtype}")
        return out

    def _memo_key(self) -> tuple[torch.dtype, torch.device]:
        return self.model.dtype, self.model.device

    def _context(self, prompts: list[str], chunks: int | None) -> Tensor:
        """:meth:`encode_prompts`, memoized by the prompts and the window count."""
        key = (*self._memo_key(), tuple(prompts), chunks)
        return self._contexts.get(key, lambda: self.encode_prompts(prompts, chunks))

    def _latent(self, image: Tensor, tile: bool | None) -> Tensor:
        """:meth:`encode_image`, memoized by the pixels and whether the encoding is tiled."""
        latent_size = [side // self.latent_factor for side in image.shape[-2:]]
        key = (*self._memo_key(), _digest(image), _use_tiling(latent_size, tile))
        return self._latents.get(key, lambda: self.encode_image(image, tile))

    @torch.inference_mode()
    def __call__(
        self,
        image: Image | Tensor | None = None,
        mask: Image | Tensor | None = None,
        prompt: str | Sequence[str] = "",
        *,
        negative_prompt: str = "",
        sampler: str = "ddim",
        steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        strength: float = 1.0,
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

        - ``image`` and ``mask``: inpainting. Inpainting (9-channel) models as the original scripts;
          text-to-image (4-channel) models by blended latent diffusion (see the module docstring).
        - ``image`` without ``mask``: image-to-image, the whole image repainted; it needs ``strength < 1``
          to keep anything of the image (at strength 1 the image only sets the size: text-to-image).
        - neither: text-to-image at ``height`` x ``width``, by default :attr:`native_side` square.
        - ``strength`` in (0, 1]: below 1 the sampler takes only the last ``int(strength x grid steps)``
          steps of its grid, from the full image's latent noised to their first level (diffusers' img2img
          and inpainting ``strength``); 1 starts from pure noise, as the original.
        - ``height`` / ``width`` resize the input first; sides that are not multiples of
          :attr:`size_multiple` (64 for SD) are edge-padded and the result cropped back.
        - ``long_prompts`` encodes text beyond 75 tokens in extra 77-token windows instead of truncating it
          (the original truncates).
        - ``vae_tiling`` runs the VAE in overlapping tiles (True), in one piece (False) or in tiles above
          :data:`AUTO_TILING_LATENT_SIDE` (None).
        - ``start_latent`` (n, 4, h/8, w/8) replaces the seeded start noise.

        Inpainting controls, all off by default (a plain run is the original's); all but ``mask_mode`` need a
        mask:

        - ``mask_grow`` dilates the mask by that many pixels; ``mask_mode`` "max" marks a latent cell for
          repainting when any of its pixels is (the original: "nearest");
        - ``paste_back`` composites the original pixels outside the mask over the result, with the mask
          blurred by ``mask_blur`` pixels (Gaussian sigma) as alpha, so the unmasked region is kept exactly;
        - ``crop_to_mask`` inpaints only the box around the mask grown by that many pixels, resized to the
          model's native size (512 for SD), and pastes it back into the full image (always composited).
        """
        check_options(
            sampler, steps, guidance_scale, eta, n_samples, self.config.schedule.timesteps, strength
        )
        check_controls(mask_grow, mask_blur, paste_back, crop_to_mask, has_mask=mask is not None)
        prompts = [prompt] * n_samples if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n_samples:
            raise LdmInpaintError(f"expected 1 or {n_samples} prompts (one per sample), found {len(prompts)}")
        if image is None:
            image = self._blank(mask, strength, height, width)
            height = width = None
        image = _as_image_tensor(image)
        if mask is not None:
            mask = masks.grow(_as_mask_tensor(mask), mask_grow)
            if image.shape[-2:] != mask.shape[-2:]:
                raise LdmInpaintError(
                    f"image is {tuple(image.shape[-2:])} (h, w) but mask is {tuple(mask.shape[-2:])}; "
                    "resize the mask"
                )
        inpaint = partial(
            self._inpaint,
            prompts=prompts,
            negative_prompt=negative_prompt,
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
            eta=eta,
            strength=strength,
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
            mask = None if mask is None else F.interpolate(mask, size=size, mode="nearest")
        result = inpaint(image, mask)
        if paste_back:
            result.images = _composite(image, result.images, masks.blur(mask, mask_blur))
        return result

    def _blank(
        self, mask: Image | Tensor | None, strength: float, height: int | None, width: int | None
    ) -> Tensor:
        """Text-to-image's stand-in image: mid-gray (0) at ``height`` x ``width`` (default native), never
        encoded as a start; an inpainting model sees it fully masked."""
        if mask is not None:
            raise LdmInpaintError(
                "a mask needs an image to inpaint: pass the image, or no mask for text-to-image"
            )
        if strength != 1:
            raise LdmInpaintError(
                f"strength {strength} < 1 starts from a noised image: pass one "
                "(text-to-image takes strength 1)"
            )
        return torch.zeros(1, 3, height or self.native_side, width or self.native_side)

    def native_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) with the longer side at the model's training size (512 for SD) and the aspect ratio kept,
        both multiples of :attr:`size_multiple`."""
        scale = self.native_side / max(height, width)
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
        return InpaintResult(
            images=images,
            latents=result.latents,
            steps_taken=result.steps_taken,
            unet_evaluations=result.unet_evaluations,
        )

    def _image_conditioning(
        self,
        image: Tensor,
        mask: Tensor | None,
        x_T: Tensor,
        strength: float,
        vae_tiling: bool | None,
        mask_mode: MaskMode,
    ) -> tuple[Tensor | None, Tensor | None, Blend | None]:
        """What a run takes from the (padded) image and mask (None: repaint everything), for a start noise
        ``x_T`` (n, 4, h, w) on the model's device:

        - the full image's latent (n, 4, h, w), float32: the start of a strength < 1 run and the known region
          of a blended one (else None);
        - an inpainting model's ``concat`` = cat(mask, masked-image latent) (n, 5, h, w) (else None);
        - a text-to-image model's :class:`~ldm_inpaint.denoiser.Blend` when there is a mask (else None).
        """
        device, dtype = self.model.device, self.model.dtype
        latent_size = x_T.shape[-2:]
        needs_image_latent = strength < 1 or (mask is not None and not self.config.is_inpainting)
        image_latent = self._latent(image, vae_tiling).float().expand_as(x_T) if needs_image_latent else None
        if self.config.is_inpainting:
            repaint = torch.ones_like(image[:, :1]) if mask is None else mask
            mask_latent = masks.to_latent(repaint, latent_size, mask_mode).to(device=device, dtype=dtype)
            masked_latent = self._latent(image * (repaint < 0.5), vae_tiling)
            concat = torch.cat([mask_latent, masked_latent], dim=1).expand(len(x_T), -1, -1, -1)
            return image_latent, concat, None
        if mask is None:
            return image_latent, None, None
        keep = 1 - masks.to_latent(mask, latent_size, mask_mode).to(device)
        return image_latent, None, Blend(known=image_latent, keep=keep, noise=x_T)

    def _inpaint(
        self,
        image: Tensor,
        mask: Tensor | None,
        *,
        prompts: list[str],
        negative_prompt: str,
        sampler: str,
        steps: int,
        guidance_scale: float,
        eta: float,
        strength: float,
        seed: int,
        start_latent: Tensor | None,
        long_prompts: bool,
        vae_tiling: bool | None,
        mask_mode: MaskMode,
        callback: Callable[[int, int], None] | None,
    ) -> InpaintResult:
        """One run on a (1, 3, H, W) image and a (1, 1, H, W) mask (None: repaint everything) of the final
        size."""
        n_samples = len(prompts)
        image, out_size = image_io.pad_to_multiple(image, self.size_multiple)
        latent_size = (image.shape[-2] // self.latent_factor, image.shape[-1] // self.latent_factor)
        if mask is not None:
            mask, _ = image_io.pad_to_multiple(mask, self.size_multiple)
            if not mask.any():
                warnings.warn(
                    "the mask is empty (nothing to repaint): returning the input image", stacklevel=3
                )
                latent = self._latent(image, vae_tiling).float().cpu()
                return InpaintResult(
                    images=image_io.crop(image, out_size).expand(n_samples, -1, -1, -1).clone(),
                    latents=latent.expand(n_samples, -1, -1, -1).clone(),
                    steps_taken=0,
                    unet_evaluations=0,
                )
        device = self.model.device
        x_T = start_noise(seed, n_samples, latent_size) if start_latent is None else start_latent.float()
        expected_shape = (n_samples, 4, *latent_size)
        if tuple(x_T.shape) != expected_shape:
            raise LdmInpaintError(f"start latent must have shape {expected_shape}, found {tuple(x_T.shape)}")
        x_T = x_T.to(device)

        image_latent, concat, blend = self._image_conditioning(
            image, mask, x_T, strength, vae_tiling, mask_mode
        )
        # Long prompts: every context (prompt and negative) gets the same number of 75-token windows.
        chunks = max(chunk_count(text) for text in [*prompts, negative_prompt]) if long_prompts else None
        context = self._context(prompts, chunks)
        uncond_context = None
        if guidance_scale != 1.0:
            uncond_context = self._context([negative_prompt] * n_samples, chunks)
        denoiser = CountedDenoiser(
            make_denoiser(
                self.unet,
                context=context,
                uncond_context=uncond_context,
                guidance_scale=guidance_scale,
                concat=concat,
                parameterization=self.config.parameterization,
                alphas_cumprod=self.alphas_cumprod,
                blend=blend,
            )
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
            x_T,
            self.alphas_cumprod,
            steps,
            eta=eta,
            generator=generator,
            callback=on_step,
            init=image_latent if strength < 1 else None,
            strength=strength,
        )
        if blend is not None:
            latents = torch.where(blend.keep > 0.5, blend.known, latents)
        images = image_io.crop(self.decode(latents, vae_tiling), out_size)
        return InpaintResult(
            images=images.cpu(),
            latents=latents.float().cpu(),
            steps_taken=steps_taken,
            unet_evaluations=denoiser.calls,
        )
