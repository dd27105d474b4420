"""The pieces of one inpainting run that :mod:`ldm_inpaint.pipeline` puts together, and its result.

- A call's images and masks (PIL images or tensors) as one batch of tensors (:func:`input_tensors`).
- Each item's start noise and injected-noise generators, from its own seed only (:func:`item_noise`): an item
  of a batch starts from what a call of its own with that seed starts from.
- What the UNet or the blend takes from the padded images and masks (:func:`image_conditioning`).
- Crop-to-mask: the box around the mask, inpainted at the model's native size (:func:`inpaint_box`).
- What a run gives back (:class:`InpaintResult`).

A batch holds its items one after another; with ``n`` samples per item, each item's ``n`` rows are
consecutive (:func:`per_sample`). One item is the single-image call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL.Image import Image
from torch import Tensor

from ldm_inpaint import image_io, masks
from ldm_inpaint.conditioning import Blend, binarize_mask, inpainting_concat
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.options import InpaintOptions
from ldm_inpaint.samplers.noise import sample_generators, start_noise


@dataclass
class InpaintResult:
    """Images (n, 3, H, W) in [-1, 1] at the input size, the final latents (n, 4, h/8, w/8) before decoding,
    the sampler steps taken, the UNet evaluations made (guidance batches both branches into one), the options
    the run used (its seed drawn when -1 was asked for) and the messages for the user. For a batch of b pairs
    n is b x ``n_samples``, pair after pair."""

    images: Tensor
    latents: Tensor
    steps_taken: int
    unet_evaluations: int
    options: InpaintOptions
    notes: list[str] = field(default_factory=list)

    def to_pil(self) -> list[Image]:
        return image_io.tensor_to_pil(self.images)


def height_width(image: Image | Tensor) -> tuple[int, int]:
    return (image.height, image.width) if isinstance(image, Image) else tuple(image.shape[-2:])


def image_tensor(image: Image | Tensor) -> Tensor:
    """The image as (1, 3, H, W) float32 in [-1, 1] (a tensor is taken as it is, as float32)."""
    return image_io.image_to_tensor(image) if isinstance(image, Image) else image.float()


def mask_tensor(mask: Image | Tensor, notes: list[str]) -> Tensor:
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


def stack(tensors: Sequence[Tensor], what: str) -> Tensor:
    """The items' (1, c, H, W) tensors as one (b, c, H, W) batch; LdmInpaintError unless they share a size."""
    sizes = sorted({tuple(tensor.shape[-2:]) for tensor in tensors})
    if len(sizes) > 1:
        raise LdmInpaintError(
            f"the {what}s of one batch must share one size, found {len(sizes)} sizes (h, w): {sizes}; "
            "batch pairs of one size together"
        )
    return torch.cat(list(tensors))


def input_tensors(
    pairs: Sequence[tuple[Image | Tensor | None, Image | Tensor | None]],
    options: InpaintOptions,
    native_side: int,
    max_pixels: int,
    notes: list[str],
) -> tuple[Tensor, Tensor | None, tuple[int, int] | None]:
    """The pairs' images (b, 3, H, W) in [-1, 1] and masks (b, 1, H, W) in {0, 1}, grown by
    ``options.mask_grow`` (None: no masks), and the size (h, w) to resize both to (None: keep theirs). No
    image (text-to-image): a mid-gray (0) stand-in at the asked size, else ``native_side`` square, which is
    never encoded as a start (an inpainting model sees it fully masked)."""
    first_image, first_mask = pairs[0]
    asked = (options.height, options.width)
    given = (native_side, native_side) if first_image is None else height_width(first_image)
    height, width = asked[0] or given[0], asked[1] or given[1]
    image_io.check_pixels(width, height, max_pixels, "the image to work on")
    if first_image is None:
        return torch.zeros(1, 3, height, width), None, None
    image = stack([image_tensor(image) for image, _ in pairs], "image")
    mask = None
    if first_mask is not None:
        mask = masks.grow(stack([mask_tensor(mask, notes) for _, mask in pairs], "mask"), options.mask_grow)
        if image.shape[-2:] != mask.shape[-2:]:
            raise LdmInpaintError(
                f"image is {tuple(image.shape[-2:])} (h, w) but mask is {tuple(mask.shape[-2:])}; "
                "resize the mask"
            )
    return image, mask, None if asked == (None, None) else (height, width)


def per_sample(x: Tensor, n: int) -> Tensor:
    """(b, ...) per item -> (b * n, ...) per sample: each item's row repeated for its ``n`` samples."""
    return x.repeat_interleave(n, dim=0)


def with_given(
    results: tuple[Tensor, Tensor], given: tuple[Tensor, Tensor], empty: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    """A run's images and latents with the ``n`` rows of each pair whose mask is ``empty`` (b,) replaced by
    ``given`` (what that pair gives on its own: its image, unchanged)."""
    rows = per_sample(empty, n)[:, None, None, None]  # (b,) -> (b * n, 1, 1, 1)
    images, latents = (torch.where(rows, kept, result) for kept, result in zip(given, results, strict=True))
    return images, latents


def item_noise(
    seeds: Sequence[int], n: int, latent_size: tuple[int, int], device: torch.device
) -> tuple[Tensor, list[torch.Generator]]:
    """The start noise (b * n, 4, h, w) and one generator per sample of items seeded ``seeds``: item i's rows
    are :func:`~ldm_inpaint.samplers.noise.start_noise` and :func:`~ldm_inpaint.samplers.noise.
    sample_generators` of ``seeds[i]``, whatever the other items."""
    noise = torch.cat([start_noise(seed, n, latent_size) for seed in seeds])
    generators = [generator for seed in seeds for generator in sample_generators(seed, n, device)]
    return noise.to(device), generators


def image_conditioning(
    encode: Callable[[Tensor], Tensor],
    is_inpainting: bool,
    image: Tensor,
    mask: Tensor | None,
    x_T: Tensor,
    options: InpaintOptions,
) -> tuple[Tensor | None, Tensor | None, Blend | None]:
    """What a run takes from the padded images (b, 3, H, W) and masks (b, 1, H, W) (None: repaint
    everything), for a start noise ``x_T`` (b * n, 4, h, w) on the model's device; ``encode`` maps pixels to
    latents (the pipeline's memoized VAE encoder):

    - the full images' latent (b * n, 4, h, w), float32: the start of a strength < 1 run and the known region
      of a blended one (else None);
    - an inpainting model's ``concat`` = cat(mask, masked-image latent) (b * n, 5, h, w) (else None);
    - a text-to-image model's :class:`~ldm_inpaint.conditioning.Blend` when there is a mask (else None).
    """
    n = len(x_T) // len(image)
    latent_size = tuple(x_T.shape[-2:])
    needs_image_latent = options.strength < 1 or (mask is not None and not is_inpainting)
    image_latent = per_sample(encode(image).float(), n) if needs_image_latent else None
    if is_inpainting:
        repaint = torch.ones_like(image[:, :1]) if mask is None else mask
        concat = inpainting_concat(encode, image, repaint, latent_size, options.mask_mode)
        return image_latent, per_sample(concat, n), None
    if mask is None:
        return image_latent, None, None
    keep = 1 - masks.to_latent(per_sample(mask, n), latent_size, options.mask_mode).to(x_T.device)
    return image_latent, None, Blend(known=image_latent, keep=keep, noise=x_T)


def inpaint_box(
    inpaint: Callable[[Tensor, Tensor], InpaintResult],
    image: Tensor,
    mask: Tensor,
    options: InpaintOptions,
    native_size: Callable[[int, int], tuple[int, int]],
) -> InpaintResult:
    """Inpaint the box around the mask (grown by ``options.crop_to_mask``) of a (1, 3, H, W) image at the
    size ``native_size(box h, box w)`` and composite it into the full image."""
    box = masks.bounding_box(mask, options.crop_to_mask)
    if box is None:
        return inpaint(image, mask)
    top, left, bottom, right = box
    box_image, box_mask = image[..., top:bottom, left:right], mask[..., top:bottom, left:right]
    size = native_size(bottom - top, right - left)
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
