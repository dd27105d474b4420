"""Mask operations of the inpainting controls, on (b, 1, H, W) tensors with 1 = repaint.

All are off by default, so a plain run conditions the model exactly like the original scripts (binary mask,
nearest resize to latent size, no compositing).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

MaskMode = Literal["nearest", "max"]


def grow(mask: Tensor, pixels: int) -> Tensor:
    """Dilate a binary mask by ``pixels`` (a square structuring element, as a max filter)."""
    if pixels <= 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * pixels + 1, stride=1, padding=pixels)


def blur(mask: Tensor, pixels: float) -> Tensor:
    """Gaussian blur with standard deviation ``pixels`` (kernel radius 3 sigma, edges replicated); values stay
    in [0, 1]. Used as the soft alpha of paste-back compositing."""
    if pixels <= 0:
        return mask
    radius = max(1, math.ceil(3 * pixels))
    offsets = torch.arange(-radius, radius + 1, dtype=mask.dtype, device=mask.device)
    kernel = torch.exp(-0.5 * (offsets / pixels) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(mask, (radius, radius, radius, radius), mode="replicate")
    # Separable: rows, then columns.
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))


def to_latent(mask: Tensor, size: tuple[int, int], mode: MaskMode = "nearest") -> Tensor:
    """The mask at latent size: ``nearest`` (the original: one pixel per latent cell decides) or ``max`` (a
    cell is repainted if any of its pixels is, so thin strokes are never lost)."""
    if mode == "nearest":
        return F.interpolate(mask, size=size, mode="nearest")
    if mode == "max":
        return F.adaptive_max_pool2d(mask, size)
    raise ValueError(f"mask mode must be 'nearest' or 'max', found {mode!r}")


def _span(low: int, high: int, limit: int, padding: int, min_size: int) -> tuple[int, int]:
    """[low, high) grown by ``padding``, widened to ``min_size`` around its centre, kept inside [0, limit)."""
    low, high = max(0, low - padding), min(limit, high + padding)
    size = min(max(high - low, min_size), limit)
    low = min(max(0, (low + high) // 2 - size // 2), limit - size)
    return low, low + size


def bounding_box(mask: Tensor, padding: int, min_size: int = 0) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of the repaint region of a (1, 1, H, W) mask, grown by ``padding`` pixels
    on every side, at least ``min_size`` per side where the image allows, clipped to the image; None if the
    mask is empty."""
    rows = torch.nonzero(mask[0, 0].amax(dim=1)).flatten().tolist()
    cols = torch.nonzero(mask[0, 0].amax(dim=0)).flatten().tolist()
    if not rows:
        return None
    height, width = mask.shape[-2:]
    top, bottom = _span(rows[0], rows[-1] + 1, height, padding, min_size)
    left, right = _span(cols[0], cols[-1] + 1, width, padding, min_size)
    return top, left, bottom, right


def composite(original: Tensor, painted: Tensor, alpha: Tensor) -> Tensor:
    """``painted`` where ``alpha`` is 1, ``original`` where it is 0, blended in between (paste-back)."""
    return original * (1 - alpha) + painted * alpha
