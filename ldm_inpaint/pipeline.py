"""Inpainting from top to bottom: image + mask + prompt -> latents -> sampler over the UNet -> image.

Conditioning follows the original RunwayML / Stability AI inpainting scripts exactly:

1. image in [-1, 1]; mask in {0, 1} (white = repaint, binarized at 0.5);
2. the UNet's image conditioning, cat(mask at latent size, latent of the masked image) (``conditioning``);
3. text contexts for the prompt and the negative prompt, computed once per call;
4. the sampler's schedule, built once and cut for ``strength`` (``samplers``), walked over the denoiser
   (``denoiser``: guidance, the 9-channel concat, the parameterization);
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
samplers encode each prompt and image once. One pipeline may serve many threads: calls are serialized by its
lock, and no call leaves process-wide state changed. Messages for the user come back on the result
(``result.notes``), not through ``warnings``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL.Image import Image
from torch import Tensor

from ldm_inpaint import autoencoding, image_io, masks
from ldm_inpaint.checkpoint import load_model
from ldm_inpaint.compile import compile_unet
from ldm_inpaint.conditioning import Blend, binarize_mask, inpainting_concat
from ldm_inpaint.config import ModelConfig
from ldm_inpaint.denoiser import CountedDenoiser, make_denoiser
from ldm_inpaint.errors import Cancelled, LdmInpaintError
from ldm_inpaint.lora.merge import AppliedLoRA, LoRASet, LoRASource
from ldm_inpaint.memo import Memo, digest
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.models.packing import can_pack
from ldm_inpaint.options import InpaintOptions, OptionError
from ldm_inpaint.samplers import StepCallback, make_schedule, sample
from ldm_inpaint.samplers.noise import sample_generators, start_noise
from ldm_inpaint.schedule import alphas_cumprod
from ldm_inpaint.tokenizer import Tokens, chunk_count, tokenize_prompts


@dataclass
class InpaintResult:
    """Images (n, 3, H, W) in [-1, 1] at the input size, the final latents (n, 4, h/8, w/8) before decoding,
    the sampler steps taken, the UNet evaluations made (guidance batches both branches into one), the options
    the run used (its seed drawn when -1 was asked for) and the messages for the user."""

    images: Tensor
    latents: Tensor
    steps_taken: int
    unet_evaluations: int
    options: InpaintOptions
    notes: list[str] = field(default_factory=list)

    def to_pil(self) -> list[Image]:
        return image_io.tensor_to_pil(self.images)


def _height_width(image: Image | Tensor) -> tuple[int, int]:
    return (image.height, image.width) if isinstance(image, Image) else tuple(image.shape[-2:])


def _as_image_tensor(image: Image | Tensor) -> Tensor:
    return image_io.image_to_tensor(image) if isinstance(image, Image) else image.float()


def _as_mask_tensor(mask: Image | Tensor, notes: list[str]) -> Tensor:
    """The binary mask; a note says how many pixels were soft (neither black nor white) before binarizing."""
    if isinstance(mask, Image):
        soft = image_io.soft_pixels(mask)
        binary = image_io.mask_to_tensor(mask)
    else:
        soft = int(((mask > 0) & (mask < 1)).sum())
        binary = binarize_mask(mask)
    if soft:
        total = binary.numel()
        notes.append(f"the mask has {soft} of {total} pixels neither black nor white: binarized at 0.5")
    return binary


class InpaintPipeline:
    """A loaded model plus its noise schedule; call it to inpaint (or to repaint or generate images).

    Text contexts and VAE encodings are memoized across calls (:data:`~ldm_inpaint.memo.MEMO_SIZE` of each,
    keyed by the prompts or the pixels): call :meth:`clear_memo` after changing the weights in place. Calls
    are serialized by :attr:`lock`, so threads may share one pipeline.
    """

    def __init__(
        self, model: LatentDiffusion, *, compile: bool = False, loras: Sequence[LoRASource] = ()
    ) -> None:
        """``compile``: run the UNet through :func:`~ldm_inpaint.compile.compile_unet` (the first call
        compiles it, which takes minutes; it pays off over many images of one size). ``loras``: LoRA files
        (or ``(file, weight)``) merged into the weights first, see :meth:`set_loras`."""
        self.model = model
        self.config: ModelConfig = model.config
        self.alphas_cumprod = alphas_cumprod(self.config.schedule)
        self.lock = threading.RLock()
        # Calls whose working image would be larger are refused before anything is allocated.
        self.max_pixels = image_io.DEFAULT_MAX_PIXELS
        self._contexts: Memo[tuple[Tensor, tuple[str, ...]]] = Memo()
        self._latents: Memo[Tensor] = Memo()
        self._loras = LoRASet(model)
        self._loras.set(loras)
        self.compiled = compile
        self.unet = compile_unet(model.model.diffusion_model) if compile else model.model.diffusion_model

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
        loras: Sequence[LoRASource] = (),
    ) -> InpaintPipeline:
        """Load a checkpoint (:func:`~ldm_inpaint.checkpoint.load_model`). ``pack``: pre-pack the convolution
        weights for oneDNN (default: when the device is the CPU and the dtype float32 or bfloat16, unless
        compiling, see :mod:`ldm_inpaint.models.packing`); ``compile``, ``loras``: see
        :class:`InpaintPipeline`."""
        pack = can_pack(device, dtype) and not compile if pack is None else pack
        loaded = load_model(path, config, use_ema=use_ema, dtype=dtype, device=device, pack=pack)
        return cls(loaded.model, compile=compile, loras=loras)

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

    def native_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) with the longer side at the model's training size (512 for SD) and the aspect ratio kept,
        both multiples of :attr:`size_multiple`."""
        scale = self.native_side / max(height, width)
        step = self.size_multiple
        return tuple(max(step, round(side * scale / step) * step) for side in (height, width))

    @property
    def loras(self) -> list[AppliedLoRA]:
        """The LoRA files merged into the weights now, with their weights and module counts."""
        return self._loras.applied

    def set_loras(self, loras: Sequence[LoRASource]) -> None:
        """Merge LoRA files into the weights (:func:`~ldm_inpaint.lora.merge.apply_loras`: kohya /
        AUTOMATIC1111 or diffusers files; each a path, at weight 1, or ``(path, weight)``), replacing those set
        before; ``()`` restores the original weights bit for bit. Memoized text contexts are dropped when a
        text-encoder LoRA comes or goes. A compiled pipeline takes its LoRAs at construction only."""
        if self.compiled:
            raise LdmInpaintError(
                "a compiled pipeline does not see weights changed after compiling; build a new one with loras="
            )
        with self.lock:
            if self._loras.set(loras):
                self._contexts.clear()

    def clear_memo(self) -> None:
        """Forget the memoized text contexts and image latents (needed only if the weights change)."""
        with self.lock:
            self._contexts.clear()
            self._latents.clear()

    def encode_image(self, image: Tensor, tile: bool | None = None, notes: list[str] | None = None) -> Tensor:
        """:func:`~ldm_inpaint.autoencoding.encode` with this model's VAE: (b, 4, h/8, w/8) in its dtype."""
        return autoencoding.encode(self.model.first_stage_model, image, self.config.scale_factor, tile, notes)

    def decode(self, z: Tensor, tile: bool | None = None, notes: list[str] | None = None) -> Tensor:
        """:func:`~ldm_inpaint.autoencoding.decode` with this model's VAE: float32 images in [-1, 1] (unclamped)."""
        return autoencoding.decode(self.model.first_stage_model, z, self.config.scale_factor, tile, notes)

    def tokenize(self, prompts: Sequence[str], chunks: int | None = None) -> Tokens:
        """Token ids (b, 77), or (b, chunks, 77) in 75-token windows (long prompts), for the text encoder."""
        params = self.config.text_encoder
        return tokenize_prompts(list(prompts), params.pad_token, params.context_length, chunks)

    def encode_tokens(self, ids: Tensor) -> Tensor:
        """CLIP contexts (b, 77, width) of token ids (b, 77); (b, chunks * 77, width) of (b, chunks, 77)."""
        return self.model.cond_stage_model(ids.to(self.model.device))

    def encode_prompts(self, prompts: Sequence[str], chunks: int | None = None) -> Tensor:
        """CLIP contexts (n, 77, width) for a list of prompts; (n, chunks * 77, width) with ``chunks``."""
        return self.encode_tokens(self.tokenize(prompts, chunks).ids)

    def _memo_key(self) -> tuple[torch.dtype, torch.device]:
        return self.model.dtype, self.model.device

    def _context(self, prompts: list[str], chunks: int | None, notes: list[str]) -> Tensor:
        """:meth:`encode_prompts`, memoized by the prompts and the window count; a note per cut prompt."""

        def compute() -> tuple[Tensor, tuple[str, ...]]:
            tokens = self.tokenize(prompts, chunks)
            cut = [
                f"prompt cut to {self.config.text_encoder.context_length} tokens, {count} token(s) dropped "
                f"(use long prompts to keep them): {prompt[:60]!r}..."
                for prompt, count in dict(zip(prompts, tokens.truncated, strict=True)).items()
                if count
            ]
            return self.encode_tokens(tokens.ids), tuple(cut)

        context, cut = self._contexts.get((*self._memo_key(), tuple(prompts), chunks), compute)
        notes.extend(note for note in cut if note not in notes)
        return context

    def _latent(self, image: Tensor, tile: bool | None, notes: list[str]) -> Tensor:
        """:meth:`encode_image`, memoized by the pixels and whether the encoding is tiled."""
        latent_size = [side // self.latent_factor for side in image.shape[-2:]]
        key = (*self._memo_key(), digest(image), autoencoding.use_tiling(latent_size, tile))
        return self._latents.get(key, lambda: self.encode_image(image, tile, notes))

    def __call__(
        self,
        image: Image | Tensor | None = None,
        mask: Image | Tensor | None = None,
        options: InpaintOptions | None = None,
        *,
        start_latent: Tensor | None = None,
        callback: StepCallback | None = None,
        **changes: object,
    ) -> InpaintResult:
        """Inpaint ``image`` where ``mask`` is white, as ``options`` say (:class:`~ldm_inpaint.options.
        InpaintOptions`; keyword ``changes`` replace single fields: ``pipe(image, mask, prompt="a cat")``).
        Images and masks are PIL images or tensors ((1, 3, H, W) in [-1, 1] and (1, 1, H, W) in [0, 1]).

        - ``image`` and ``mask``: inpainting. Inpainting (9-channel) models as the original scripts;
          text-to-image (4-channel) models by blended latent diffusion (see the module docstring).
        - ``image`` without ``mask``: image-to-image, the whole image repainted; it needs ``strength < 1``
          to keep anything of the image (at strength 1 the image only sets the size: text-to-image).
        - neither: text-to-image at ``height`` x ``width``, by default :attr:`native_side` square.
        - ``start_latent`` (n, 4, h/8, w/8) replaces the seeded start noise.
        - ``callback(StepInfo)`` runs after every sampler step (:class:`~ldm_inpaint.samplers.StepInfo`);
          raising :class:`~ldm_inpaint.errors.Cancelled` from it stops the call, which raises
          ``Cancelled`` once it has let go of its tensors.

        The options' meaning is in :class:`~ldm_inpaint.options.InpaintOptions`; a seed of -1 draws a fresh
        one, which ``result.options.seed`` records.
        """
        try:
            options = replace(options or InpaintOptions(), **changes)
        except TypeError as error:
            raise OptionError(f"{error}; options are the fields of InpaintOptions") from None
        options.validate(
            has_image=image is not None, has_mask=mask is not None, timesteps=self.config.schedule.timesteps
        )
        options = options.with_seed()
        with self.lock:
            try:
                return self._run(image, mask, options, start_latent, callback)
            except Cancelled as cancelled:
                reason = str(cancelled)
        # Raised here, after the sampler's frames (and the tensors they held) are gone.
        raise Cancelled(reason)

    def _run(
        self,
        image: Image | Tensor | None,
        mask: Image | Tensor | None,
        options: InpaintOptions,
        start_latent: Tensor | None,
        callback: StepCallback | None,
    ) -> InpaintResult:
        notes: list[str] = []
        size = (options.height, options.width)
        given = (self.native_side, self.native_side) if image is None else _height_width(image)
        height, width = size[0] or given[0], size[1] or given[1]
        image_io.check_pixels(width, height, self.max_pixels, "the image to work on")
        if image is None:
            # text-to-image: a mid-gray (0) stand-in, never encoded as a start; an inpainting model sees it
            # fully masked
            image, size = torch.zeros(1, 3, height, width), (None, None)
        image = _as_image_tensor(image)
        if mask is not None:
            mask = masks.grow(_as_mask_tensor(mask, notes), options.mask_grow)
            if image.shape[-2:] != mask.shape[-2:]:
                raise LdmInpaintError(
                    f"image is {tuple(image.shape[-2:])} (h, w) but mask is {tuple(mask.shape[-2:])}; "
                    "resize the mask"
                )
        inpaint = partial(
            self._inpaint, options=options, start_latent=start_latent, callback=callback, notes=notes
        )
        if options.crop_to_mask is not None:
            return self._inpaint_box(inpaint, image, mask, options)
        if size != (None, None):
            size = (size[0] or image.shape[-2], size[1] or image.shape[-1])
            image = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
            mask = None if mask is None else F.interpolate(mask, size=size, mode="nearest")
        result = inpaint(image, mask)
        if options.paste_back:
            result.images = masks.composite(image, result.images, masks.blur(mask, options.mask_blur))
        return result

    def _inpaint_box(
        self,
        inpaint: Callable[[Tensor, Tensor], InpaintResult],
        image: Tensor,
        mask: Tensor,
        options: InpaintOptions,
    ) -> InpaintResult:
        """Inpaint the padded box around the mask at the native size and composite it into the full image."""
        box = masks.bounding_box(mask, options.crop_to_mask)
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
        alpha = masks.blur(box_mask, options.mask_blur)
        images[..., top:bottom, left:right] = masks.composite(box_image, painted, alpha)
        return replace(result, images=images)

    def _image_conditioning(
        self, image: Tensor, mask: Tensor | None, x_T: Tensor, options: InpaintOptions, notes: list[str]
    ) -> tuple[Tensor | None, Tensor | None, Blend | None]:
        """What a run takes from the (padded) image and mask (None: repaint everything), for a start noise
        ``x_T`` (n, 4, h, w) on the model's device:

        - the full image's latent (n, 4, h, w), float32: the start of a strength < 1 run and the known region
          of a blended one (else None);
        - an inpainting model's ``concat`` = cat(mask, masked-image latent) (n, 5, h, w) (else None);
        - a text-to-image model's :class:`~ldm_inpaint.conditioning.Blend` when there is a mask (else None).
        """
        latent_size = tuple(x_T.shape[-2:])
        encode = partial(self._latent, tile=options.tiling, notes=notes)
        needs_image_latent = options.strength < 1 or (mask is not None and not self.config.is_inpainting)
        image_latent = encode(image).float().expand_as(x_T) if needs_image_latent else None
        if self.config.is_inpainting:
            repaint = torch.ones_like(image[:, :1]) if mask is None else mask
            concat = inpainting_concat(encode, image, repaint, latent_size, options.mask_mode)
            return image_latent, concat.expand(len(x_T), -1, -1, -1), None
        if mask is None:
            return image_latent, None, None
        keep = 1 - masks.to_latent(mask, latent_size, options.mask_mode).to(x_T.device)
        return image_latent, None, Blend(known=image_latent, keep=keep, noise=x_T)

    def _inpaint(
        self,
        image: Tensor,
        mask: Tensor | None,
        *,
        options: InpaintOptions,
        start_latent: Tensor | None,
        callback: StepCallback | None,
        notes: list[str],
    ) -> InpaintResult:
        """One run on a (1, 3, H, W) image and a (1, 1, H, W) mask (None: repaint everything) of the final
        size."""
        n_samples = options.n_samples
        image, out_size = image_io.pad_to_multiple(image, self.size_multiple)
        latent_size = (image.shape[-2] // self.latent_factor, image.shape[-1] // self.latent_factor)
        if mask is not None:
            mask, _ = image_io.pad_to_multiple(mask, self.size_multiple)
            if not mask.any():
                notes.append("the mask is empty (nothing to repaint): returning the input image")
                latent = self._latent(image, options.tiling, notes).float().cpu()
                images = image_io.crop(image, out_size).expand(n_samples, -1, -1, -1).clone()
                latents = latent.expand(n_samples, -1, -1, -1).clone()
                return InpaintResult(images, latents, 0, 0, options, notes)
        device = self.model.device
        x_T = (
            start_noise(options.seed, n_samples, latent_size)
            if start_latent is None
            else start_latent.float()
        )
        expected_shape = (n_samples, 4, *latent_size)
        if tuple(x_T.shape) != expected_shape:
            raise LdmInpaintError(f"start latent must have shape {expected_shape}, found {tuple(x_T.shape)}")
        x_T = x_T.to(device)

        image_latent, concat, blend = self._image_conditioning(image, mask, x_T, options, notes)
        prompts = [options.prompt] * n_samples
        # Long prompts: every context (prompt and negative) gets the same number of 75-token windows.
        chunks = None
        if options.long_prompts:
            chunks = max(chunk_count(text) for text in (options.prompt, options.negative_prompt))
        context = self._context(prompts, chunks, notes)
        uncond_context = None
        if options.guidance_scale != 1.0:
            uncond_context = self._context([options.negative_prompt] * n_samples, chunks, notes)
        denoiser = CountedDenoiser(
            make_denoiser(
                self.unet,
                context=context,
                uncond_context=uncond_context,
                guidance_scale=options.guidance_scale,
                concat=concat,
                parameterization=self.config.parameterization,
                alphas_cumprod=self.alphas_cumprod,
                blend=blend,
            )
        )
        schedule = make_schedule(options.sampler, self.alphas_cumprod, options.steps, options.strength)
        latents = sample(
            options.sampler,
            denoiser,
            x_T,
            schedule,
            init=image_latent,
            eta=options.eta,
            generator=sample_generators(options.seed, n_samples, device),
            callback=callback,
        )
        if blend is not None:
            latents = blend.finish(latents)
        images = image_io.crop(self.decode(latents, options.tiling, notes), out_size)
        return InpaintResult(
            images.cpu(), latents.float().cpu(), len(schedule), denoiser.calls, options, notes
        )
