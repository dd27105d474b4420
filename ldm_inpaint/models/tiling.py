"""Tiled VAE encoding and decoding, for images whose activations do not fit in memory in one piece.

The input is cut into overlapping tiles on a regular grid; each tile goes through the VAE on its own and the
outputs are blended with feathered weights: along each axis a tile's weight rises linearly over the
``overlap`` at a side it shares with a neighbour (so the pixels nearest a tile's cut, where its convolutions
saw zero padding instead of the neighbour's content, count least), and the weights of all tiles covering a
position are normalised to sum to exactly one. The grid is a product of a row grid and a column grid, so this
normalisation is done per axis and the 2-D weight of a tile is the outer product of its two 1-D windows.

Tiled is not equal to untiled: the VAE's GroupNorm statistics and its mid-block self-attention are global
over the whole image, and a tile sees only itself. Where the image's statistics are the same everywhere the
two agree closely; where they change from tile to tile (a smooth gradient) they can differ visibly, as with
every tiled VAE (diffusers' ``tiled_decode`` differs as much); ``tests/test_tiling.py`` gives the figures. So
the pipeline tiles only large images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor

from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.models.autoencoder import AutoencoderKL


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of the tiles covering [0, length): the first at 0, the last ending at ``length``, spread
    evenly so that neighbours overlap by at least ``overlap``; all multiples of ``align``. One tile (cropped to
    ``length``) when ``length <= tile``."""
    if tile < 1 or not 0 <= overlap < tile:
        raise LdmInpaintError(
            f"tiles need size >= 1 and 0 <= overlap < size, found size {tile}, overlap {overlap}"
        )
    if length % align or tile % align or overlap % align:
        raise LdmInpaintError(
            f"tile size {tile}, overlap {overlap} and length {length} must be multiples of {align} here"
        )
    if length <= tile:
        return [0]
    # In units of ``align``: count - 1 strides of at most tile - overlap cover length - tile, and rounding the
    # evenly spread starts down keeps every stride within that bound.
    span, stride = (length - tile) // align, (tile - overlap) // align
    count = math.ceil(span / stride) + 1
    return [align * (i * span // (count - 1)) for i in range(count)]


def blend_weights(length: int, starts: list[int], size: int, ramp: int) -> list[Tensor]:
    """1-D blending windows (size,), one per tile starting at ``starts``, summing to one at every position of
    [0, length). Before normalisation a window is 1 except for a linear ramp over ``ramp`` positions at each
    side that has a neighbour: (i + 1/2) / ramp from the tile's cut inwards."""
    position = torch.arange(size, dtype=torch.float64) + 0.5
    windows = []
    for start in starts:
        window = torch.ones(size, dtype=torch.float64)
        if ramp > 0 and start > 0:
            window = torch.minimum(window, position / ramp)
        if ramp > 0 and start + size < length:
            window = torch.minimum(window, (size - position) / ramp)
        windows.append(window)
    total = torch.zeros(length, dtype=torch.float64)
    for start, window in zip(starts, windows, strict=True):
        total[start : start + size] += window
    return [
        (window / total[start : start + size]).float() for start, window in zip(starts, windows, strict=True)
    ]


def map_tiles(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, scale: Fraction) -> Tensor:
    """``fn`` applied to ``x`` (b, c, h, w) tile by tile and blended, for an ``fn`` that maps (b, c, th, tw)
    to (b, c', th * scale, tw * scale). Tiles are ``tile`` x ``tile`` input cells overlapping by at least
    ``overlap``; with a fractional scale 1/f, tile starts are multiples of f. Blending is accumulated in
    float32; the result has ``fn``'s dtype."""
    height, width = x.shape[-2:]
    align = scale.denominator
    rows = tile_starts(height, tile, overlap, align)
    cols = tile_starts(width, tile, overlap, align)
    tile_h, tile_w = min(tile, height), min(tile, width)
    out_h, out_w, ramp = int(height * scale), int(width * scale), int(overlap * scale)
    piece_h, piece_w = int(tile_h * scale), int(tile_w * scale)
    row_weights = blend_weights(out_h, [int(start * scale) for start in rows], piece_h, ramp)
    col_weights = blend_weights(out_w, [int(start * scale) for start in cols], piece_w, ramp)
    out = None
    for row, row_weight in zip(rows, row_weights, strict=True):
        for col, col_weight in zip(cols, col_weights, strict=True):
            piece = fn(x[..., row : row + tile_h, col : col + tile_w])
            if piece.shape[-2:] != (piece_h, piece_w):
                raise ValueError(
                    f"a {tile_h}x{tile_w} tile gave {tuple(piece.shape)}, expected {piece_h}x{piece_w}"
                )
            if out is None:
                out = torch.zeros(*piece.shape[:-2], out_h, out_w, device=piece.device, dtype=torch.float32)
            # (piece_h,) x (piece_w,) -> (piece_h, piece_w): this tile's share of each output position
            weight = (row_weight[:, None] * col_weight[None, :]).to(piece.device)
            top, left = int(row * scale), int(col * scale)
            out[..., top : top + piece_h, left : left + piece_w] += piece.float() * weight
    return out.to(piece.dtype)


def decode_tiled(vae: AutoencoderKL, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
    """``vae.decode`` of the unscaled latent ``z`` (b, c, h, w) in latent tiles of ``tile`` cells (512 pixels
    for SD) overlapping by ``overlap`` cells (128 pixels), blended in pixel space."""
    return map_tiles(vae.decode, z, tile, overlap, Fraction(vae.downscale_factor))


def encode_tiled(vae: AutoencoderKL, x: Tensor, tile: int = 512, overlap: int = 128) -> Tensor:
    """The posterior mean of ``vae.encode(x)`` for an image (b, c, H, W) in pixel tiles of ``tile``
    overlapping by ``overlap`` (multiples of the downscale factor), blended in latent space."""
    return map_tiles(
        lambda piece: vae.encode(piece).mean, x, tile, overlap, Fraction(1, vae.downscale_factor)
    )
