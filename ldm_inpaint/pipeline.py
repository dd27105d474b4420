"""Inpainting from top to bottom: image + mask + prompt -> latents -> sampler over the UNet -> image.

Conditioning follows the original RunwayML / Stability AI inpainting scripts exactly:

1. image in [-1, 1]; mask in {0, 1} (white = repaint, binarized at 0.5);
2. the UNet's image conditioning, cat(mask at latent size, latent of the masked image) (``conditioning``);
3. text contexts for the prompt and the negative prompt, computed once per call;
4. the sampler's schedule, built once and cut for ``strength`` (``samplers``), walked over the denoiser
   (``denoiser``: guidance, the 9-channel concat, the parameterization);
5. start noise = ``np.random.RandomState(seed).randn(n, 4, h/8, w/8)`` as float32 (so seeds carry over from
   the original demos); stochastic DDIM noise from a torch generator seeded with the same seed (several
   pairs of one size run as one batch, :meth:`InpaintPipeline.inpaint_batch`, each from its own seed);
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
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL.Image import Image
from torch import Tensor

from ldm_inpaint import autoencoding, image_io, inpaint_run, masks
from ldm_inpaint.checkpoint import load_model
from ldm_inpaint.compile import compile_unet
from ldm_inpaint.config import ModelConfig
from ldm_inpaint.denoiser import CountedDenoiser, make_denoiser
from ldm_inpaint.errors import Cancelled, LdmInpaintError
from ldm_inpaint.inpaint_run import InpaintResult, per_sample
from ldm_inpaint.inpaint_run import image_tensor as _as_image_tensor  # noqa: F401 - the tests' name for it
from ldm_inpaint.lora.merge import AppliedLoRA, LoRASet, LoRASource
from ldm_inpaint.memo import Memo, digest
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.models.packing import can_pack
from ldm_inpaint.options import MAX_SEED, InpaintOptions, OptionError
from ldm_inpaint.samplers import StepCallback, make_schedule, sample
from ldm_inpaint.schedule import alphas_cumprod
from ldm_inpaint.tokenizer import Tokens, chunk_count, tokenize_prompts


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
        vae: str | Path | None = None,
    ) -> InpaintPipeline:
        """Load a checkpoint or model folder, with ``vae`` in place of its own VAE if given
        (:func:`~ldm_inpaint.checkpoint.load_model`). ``pack``: pre-pack the convolution
        weights for oneDNN (default: when the device is the CPU and the dtype float32 or bfloat16, unless
        compiling, see :mod:`ldm_inpaint.models.packing`); ``compile``, ``loras``: see
        :class:`InpaintPipeline`."""
        pack = can_pack(device, dtype) and not compile if pack is None else pack
        loaded = load_model(path, config, use_ema=use_ema, dtype=dtype, device=device, pack=pack, vae=vae)
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
        options = self._options(options, changes, has_image=image is not None, has_mask=mask is not None)
        return self._serialized([(image, mask)], [options.seed], options, start_latent, callback)

    def inpaint_batch(
        self,
        pairs: Sequence[tuple[Image | Tensor, Image | Tensor]],
        seeds: Sequence[int],
        options: InpaintOptions | None = None,
        *,
        callback: StepCallback | None = None,
        **changes: object,
    ) -> InpaintResult:
        """Inpaint several (image, mask) pairs of one size in one sampler loop, each UNet call taking them all.

        Pair i is run as ``self(image_i, mask_i, options, seed=seeds[i])`` runs it: its noise comes from
        ``seeds[i]`` alone, its conditioning from its own pair; only the batch the kernels see differs, which
        on the CPU moves results by float rounding (equal batches give equal bits). ``result.images`` holds
        ``n_samples`` rows per pair, pair after pair; ``options.seed`` is unused. Not with ``crop_to_mask``,
        whose boxes differ in size from pair to pair.
        """
        options = self._options(options, changes, has_image=True, has_mask=True)
        missing = sum(image is None or mask is None for image, mask in pairs)
        if not pairs or missing or len(pairs) != len(seeds) or options.crop_to_mask is not None:
            raise OptionError(
                f"expected (image, mask) pairs with one seed each and no crop-to-mask, found {len(pairs)} "
                f"pairs ({missing} without image or mask), {len(seeds)} seeds, crop-to-mask {options.crop_to_mask}"
            )
        if not all(isinstance(seed, int) and 0 <= seed <= MAX_SEED for seed in seeds):
            raise OptionError(f"seeds: expected integers 0..{MAX_SEED}, found {list(seeds)}")
        return self._serialized(list(pairs), list(seeds), options, None, callback)

    def _options(
        self, options: InpaintOptions | None, changes: dict[str, object], has_image: bool, has_mask: bool
    ) -> InpaintOptions:
        """``options`` with ``changes``, validated, with a concrete seed."""
        try:
            options = replace(options or InpaintOptions(), **changes)
        except TypeError as error:
            raise OptionError(f"{error}; options are the fields of InpaintOptions") from None
        options.validate(has_image=has_image, has_mask=has_mask, timesteps=self.config.schedule.timesteps)
        return options.with_seed()

    def _serialized(self, *run: object) -> InpaintResult:
        """:meth:`_run` under the lock; ``Cancelled`` raised again once the sampler's tensors are gone."""
        with self.lock:
            try:
                return self._run(*run)
            except Cancelled as cancelled:
                reason = str(cancelled)
        # Raised here, after the sampler's frames (and the tensors they held) are gone.
        raise Cancelled(reason)

    def _run(
        self,
        pairs: list[tuple[Image | Tensor | None, Image | Tensor | None]],
        seeds: list[int],
        options: InpaintOptions,
        start_latent: Tensor | None,
        callback: StepCallback | None,
    ) -> InpaintResult:
        """One run of the pairs (one pair, or several of one size), seeded ``seeds``."""
        notes: list[str] = []
        image, mask, size = inpaint_run.input_tensors(
            pairs, options, self.native_side, self.max_pixels, notes
        )
        inpaint = partial(
            self._inpaint,
            seeds=seeds,
            options=options,
            start_latent=start_latent,
            callback=callback,
            notes=notes,
        )
        if options.crop_to_mask is not None:
            return inpaint_run.inpaint_box(inpaint, image, mask, options, self.native_size)
        if size is not None:
            image = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
            mask = None if mask is None else F.interpolate(mask, size=size, mode="nearest")
        result = inpaint(image, mask)
        if options.paste_back:
            alpha = per_sample(masks.blur(mask, options.mask_blur), options.n_samples)
            result.images = masks.composite(per_sample(image, options.n_samples), result.images, alpha)
        return result

    def _inpaint(
        self,
        image: Tensor,
        mask: Tensor | None,
        *,
        seeds: list[int],
        options: InpaintOptions,
        start_latent: Tensor | None,
        callback: StepCallback | None,
        notes: list[str],
    ) -> InpaintResult:
        """One run on (b, 3, H, W) images and (b, 1, H, W) masks (None: repaint everything) of the final
        size, image i seeded ``seeds[i]``. An empty mask gives its image back unchanged."""
        n_samples = options.n_samples
        image, out_size = image_io.pad_to_multiple(image, self.size_multiple)
        latent_size = (image.shape[-2] // self.latent_factor, image.shape[-1] // self.latent_factor)
        if mask is not None:
            mask, _ = image_io.pad_to_multiple(mask, self.size_multiple)
        empty = torch.zeros(len(image), dtype=torch.bool) if mask is None else ~mask.flatten(1).any(dim=1)
        if empty.all():
            notes.append("the mask is empty (nothing to repaint): returning the input image")
            return InpaintResult(*self._given(image, out_size, options, notes), 0, 0, options, notes)
        device = self.model.device
        x_T, generators = inpaint_run.item_noise(seeds, n_samples, latent_size, device)
        if start_latent is not None:
            x_T = start_latent.float().to(device)
        expected_shape = (len(seeds) * n_samples, 4, *latent_size)
        if tuple(x_T.shape) != expected_shape:
            raise LdmInpaintError(f"start latent must have shape {expected_shape}, found {tuple(x_T.shape)}")

        encode = partial(self._latent, tile=options.tiling, notes=notes)
        image_latent, concat, blend = inpaint_run.image_conditioning(
            encode, self.config.is_inpainting, image, mask, x_T, options
        )
        prompts = [options.prompt] * len(x_T)
        # Long prompts: every context (prompt and negative) gets the same number of 75-token windows.
        chunks = None
        if options.long_prompts:
            chunks = max(chunk_count(text) for text in (options.prompt, options.negative_prompt))
        context = self._context(prompts, chunks, notes)
        uncond_context = None
        if options.guidance_scale != 1.0:
            uncond_context = self._context([options.negative_prompt] * len(x_T), chunks, notes)
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
            generator=generators,
            callback=callback,
        )
        if blend is not None:
            latents = blend.finish(latents)
        images = image_io.crop(self.decode(latents, options.tiling, notes), out_size)
        images, latents = images.cpu(), latents.float().cpu()
        if empty.any():
            notes.append(
                f"{int(empty.sum())} of {len(empty)} masks are empty: their images come back as given"
            )
            given = self._given(image, out_size, options, notes)
            images, latents = inpaint_run.with_given((images, latents), given, empty, n_samples)
        return InpaintResult(images, latents, len(schedule), denoiser.calls, options, notes)

    def _given(
        self, image: Tensor, size: tuple[int, int], options: InpaintOptions, notes: list[str]
    ) -> tuple[Tensor, Tensor]:
        """What empty masks give: the (padded) images cropped to ``size`` and their latents, n rows each."""
        n, latents = options.n_samples, self._latent(image, options.tiling, notes).float().cpu()
        return per_sample(image_io.crop(image, size), n), per_sample(latents, n)
