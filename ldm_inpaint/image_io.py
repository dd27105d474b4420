"""Image files in and out: the only module of the package that touches PIL and file paths for images.

User files -> tensors: :func:`load_image` opens a file, :func:`image_to_tensor` gives ``(1, 3, H, W)`` in
[-1, 1] and :func:`mask_to_tensor` gives ``(1, 1, H, W)`` with values 0 or 1 (white = repaint), as the
original inpainting scripts prepare them (``scripts/inpaint.py``, ``scripts/gradio/inpainting.py``).
:func:`pad_to_multiple` / :func:`crop` let any image size through the VAE's factor-8 downsampling.

Tensors -> files: :func:`tensor_to_pil`, then :func:`save_png` / :func:`save_npy`, which number their files
``<stem>-NNNNN`` and never overwrite one, with the generation settings as PNG text chunks
(:func:`read_png_metadata` reads them back).

Batch input (a folder of ``X.png`` + ``X_mask.png`` pairs, or a text file listing pairs) is read by
:mod:`ldm_inpaint.pairs`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.files import write_atomic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# The most pixels an input or output image may have unless told otherwise (a 4096 x 4096 image: about 3 GB
# of float32 activations in the VAE's first layers, untiled).
DEFAULT_MAX_PIXELS = 4096 * 4096
# Masks may also be 2-D numpy arrays (values in [0, 1], or booleans).
MASK_EXTENSIONS = (*IMAGE_EXTENSIONS, ".npy")
MASK_SUFFIX = "_mask"

# Grayscale modes read on a 16-bit scale (white = 65535). "I" (32-bit integers) is included: Pillow uses it
# for many 16-bit files.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes whose pixels are read as they are; every other mode is first converted (see `_without_alpha`).
_DIRECT_MODES = ("1", "L", "F", "RGB", *SIXTEEN_BIT_MODES)
# What Pillow raises for a file it cannot decode: unidentified (an OSError), truncated, corrupt chunks, bombs.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageError(LdmInpaintError):
    """An image, mask or batch list that cannot be used: missing, unreadable, or of mismatched size."""


class TooManyPixels(ImageError):
    """An image larger than the limit in force (refused before it is decoded or allocated)."""


def check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    """Raise :class:`ImageError` if ``width x height`` exceeds ``max_pixels``, before anything is allocated."""
    if width * height > max_pixels:
        raise TooManyPixels(
            f"{what}: expected at most {max_pixels:,} pixels, found {width}x{height} = {width * height:,}; "
            "raise the limit (--max-pixels) if the machine has the memory"
        )


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file fully into memory (no file handle left open), upright as its EXIF orientation says;
    an image of more than ``max_pixels`` is refused from its header, before it is decoded.

    For a multi-frame file (GIF, APNG, multi-page TIFF) this is the first frame.
    """
    path = Path(path)
    return _upright(_read(path, max_pixels), str(path))


def decode_image(data: bytes, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """:func:`load_image` for the bytes of an image file (a request's upload); ``what`` names it in errors."""
    return _upright(_decode(io.BytesIO(data), what, max_pixels), what)


def encode_png(image: Image.Image, metadata: Mapping[str, str]) -> bytes:
    """The bytes of the PNG file that :func:`save_png` would write for ``image`` and ``metadata``."""
    buffer = io.BytesIO()
    _png_writer(image, metadata)(buffer)
    return buffer.getvalue()


def _upright(image: Image.Image, what: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as exc:
        raise ImageError(f"expected readable EXIF data, found damaged EXIF data in {what} ({exc})") from exc


def _read(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded image file as stored (format and PNG text chunks kept), its file closed; a 2-D ``.npy``
    array (a mask, say) as a floating-point (``F``) image."""
    if path.is_dir():
        raise ImageError(f"expected an image file, found a folder: {path}")
    if not path.exists():
        raise ImageError(f"expected an image file, found nothing at {path}")
    if path.suffix.lower() == ".npy":
        return _read_array(path)
    return _decode(path, str(path), max_pixels)


def _decode(source: Path | BinaryIO, what: str, max_pixels: int) -> Image.Image:
    """The image in ``source`` decoded, refused from its header when over ``max_pixels``."""
    try:
        with Image.open(source) as image:
            check_pixels(image.width, image.height, max_pixels, what)
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(
            f"{what}: expected at most {max_pixels:,} pixels, found a file that declares far more (a "
            f"decompression bomb?): {exc}"
        ) from None
    except Image.UnidentifiedImageError as exc:
        raise ImageError(
            f"expected an image file ({', '.join(IMAGE_EXTENSIONS)}, ...), found a file that Pillow cannot "
            f"identify as an image: {what}"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(
            f"expected a complete image file, found a damaged or truncated one: {what} ({exc})"
        ) from exc
    return image


def _read_array(path: Path) -> Image.Image:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ImageError(
            f"expected a .npy array without pickled objects, could not read {path} ({exc})"
        ) from exc
    if array.ndim != 2 or array.dtype.kind not in "biuf":
        raise ImageError(
            f"expected a 2-D array of numbers or booleans in {path}, found shape {array.shape} of {array.dtype}"
        )
    return Image.fromarray(array.astype(np.float32), mode="F")


def _without_alpha(image: Image.Image) -> Image.Image:
    """The image in one of `_DIRECT_MODES`: alpha dropped, palettes and other color spaces converted to RGB.

    Dropping alpha keeps the color channels as they are (no compositing onto a background), so a fully
    transparent pixel counts with whatever color it stores. A palette's transparency entry only sets alpha,
    which is then dropped.
    """
    if image.mode in _DIRECT_MODES:
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(
            f"expected an image whose mode Pillow converts to RGB, found mode {image.mode!r} "
            f"(supported: {', '.join(_DIRECT_MODES)}, LA, RGBA, P, PA, CMYK, YCbCr, ...)"
        ) from exc


def _pixels(image: Image.Image) -> tuple[np.ndarray, float]:
    """Pixel values as float32, (H, W) for grayscale or (H, W, 3) for color, and the value that means white.

    8-bit modes: white = 255. 16-bit modes: white = 65535, read at full precision (Pillow's ``convert("L")``
    would clip them at 255 instead of scaling). ``1``: white = 1. ``F``: Pillow's own 0..255 scale, the one
    ``convert("F")`` gives an 8-bit image. Values outside [0, white] are clipped.
    """
    image = _without_alpha(image)
    if image.mode in SIXTEEN_BIT_MODES:
        white = 65535.0
    elif image.mode == "1":
        white = 1.0
    else:
        white = 255.0
    return np.clip(np.asarray(image).astype(np.float32), 0.0, white), white


def image_to_tensor(image: Image.Image) -> Tensor:
    """The image as a (1, 3, H, W) float32 tensor in [-1, 1]: ``x / 127.5 - 1`` for 8-bit pixels.

    Alpha is dropped (see `_without_alpha`); grayscale is repeated over the three channels.
    """
    pixels, white = _pixels(image)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    x = torch.from_numpy(pixels / (white / 2) - 1)
    return x.permute(2, 0, 1)[None].contiguous()  # (H, W, 3) -> (1, 3, H, W)


def mask_levels(mask: Image.Image) -> tuple[np.ndarray, float]:
    """The mask's levels, (H, W) float32, and the level that means white (repaint), reading masks as people
    make them:

    - grayscale or color: the luminance (Pillow's ITU-R 601-2 luma for color), as the original scripts;
    - drawn in the alpha channel (RGBA / LA / PA whose color channels are one uniform color while the alpha
      varies): the alpha, opaque = repaint;
    - floating point (mode ``F``: TIFF, ``.npy``) with every value in [0, 1]: that scale, white = 1; other
      ``F`` values are on Pillow's 0..255 scale.
    """
    if mask.mode in ("RGBA", "LA", "PA"):
        rgba = np.asarray(mask.convert("RGBA"))
        alpha = rgba[..., 3]
        if (rgba[..., :3] == rgba[:1, :1, :3]).all() and alpha.min() != alpha.max():
            return alpha.astype(np.float32), 255.0
    gray = _without_alpha(mask)
    if gray.mode == "RGB":
        gray = gray.convert("L")
    if gray.mode == "F":
        values = np.asarray(gray, dtype=np.float32)
        if np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1:
            return values, 1.0
    return _pixels(gray)


def mask_to_tensor(mask: Image.Image) -> Tensor:
    """The mask as a (1, 1, H, W) float32 tensor of exact 0s and 1s, where 1 (white) marks pixels to repaint:
    :func:`mask_levels` binarized at half of white, as in the original scripts (``>= 0.5 -> 1``, so 8-bit
    127 -> 0 and 128 -> 1)."""
    levels, white = mask_levels(mask)
    repaint = levels >= white / 2  # the same as levels / white >= 0.5, without rounding
    return torch.from_numpy(repaint.astype(np.float32))[None, None]  # (H, W) -> (1, 1, H, W)


def soft_pixels(mask: Image.Image) -> int:
    """How many pixels of the mask are neither black nor white (binarized at 0.5 all the same)."""
    levels, white = mask_levels(mask)
    return int(((levels > 0) & (levels < white)).sum())


def resize_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask resized to ``size = (width, height)`` with nearest-neighbour sampling (no new gray levels)."""
    return mask.resize(size, Image.Resampling.NEAREST)


def check_same_size(image: Image.Image, mask: Image.Image) -> None:
    """Raise :class:`ImageError` unless the image and the mask have the same width and height."""
    if image.size != mask.size:
        raise ImageError(
            f"expected a mask of the image's size {image.width}x{image.height} (width x height), found "
            f"{mask.width}x{mask.height}; pass --resize-mask to resize the mask to the image "
            "(nearest-neighbour)"
        )


def pad_to_multiple(x: Tensor, multiple: int = 8) -> tuple[Tensor, tuple[int, int]]:
    """Pad the bottom and right of a (b, c, H, W) tensor, repeating its last row / column, so that H and W are
    multiples of ``multiple``. Returns the padded tensor and the original (H, W), for :func:`crop`."""
    if x.ndim != 4:
        raise ValueError(f"expected a (b, c, H, W) tensor, found shape {tuple(x.shape)}")
    if multiple < 1:
        raise ValueError(f"expected a multiple >= 1, found {multiple}")
    height, width = x.shape[-2:]
    # (b, c, H, W) -> (b, c, H + pad_h, W + pad_w)
    padded = F.pad(x, (0, -width % multiple, 0, -height % multiple), mode="replicate")
    return padded, (height, width)


def crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Undo :func:`pad_to_multiple`: keep the top-left ``size = (H, W)`` of a (..., H', W') tensor."""
    height, width = size
    return x[..., :height, :width]


def tensor_to_pil(x: Tensor) -> list[Image.Image]:
    """8-bit RGB images from a (b, 3, H, W) tensor in [-1, 1].

    Values are clamped to [-1, 1], mapped to [0, 255] by ``(x + 1) * 127.5`` and rounded to nearest, halves
    up (``floor(v + 0.5)``). The original scripts truncate instead (``astype(np.uint8)``); rounding makes
    :func:`image_to_tensor` followed by this function give back the same 8-bit pixels.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (b, 3, H, W) tensor, found shape {tuple(x.shape)}")
    pixels = torch.floor((x.detach().float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (b, 3, H, W) -> (b, H, W, 3)
    return [Image.fromarray(array) for array in arrays]


def _count_existing(outdir: Path, stem: str) -> int:
    """How many ``<stem>-NNNNN.png`` files ``outdir`` holds: the first number :func:`save_png` tries."""
    pattern = re.compile(rf"{re.escape(stem)}-\d{{5,}}\.png")
    return sum(1 for path in outdir.iterdir() if pattern.fullmatch(path.name))


def _png_writer(image: Image.Image, metadata: Mapping[str, str]) -> Callable[[BinaryIO], None]:
    """A writer of ``image`` as PNG with every metadata item as a text chunk (tEXt, or iTXt for text outside
    Latin-1). Text that is not valid Unicode (a file name in another encoding, read as surrogate escapes) is
    stored with its bytes as ``\\xNN``."""
    info = PngInfo()
    for key, value in metadata.items():
        if not 1 <= len(key) <= 79:
            raise ValueError(f"expected PNG text keys of 1 to 79 characters, found {len(key)}: {key!r}")
        info.add_text(key, value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
    return lambda file: image.save(file, format="PNG", pnginfo=info)


def write_png(image: Image.Image, path: str | Path, metadata: Mapping[str, str]) -> Path:
    """Write ``path``, replacing the file there if any, in one step (:func:`~ldm_inpaint.files.write_atomic`):
    for files that are views of other results (a study's grids)."""
    write_atomic(path, _png_writer(image, metadata), replace=True)
    return Path(path)


def write_new_png(image: Image.Image, path: str | Path, metadata: Mapping[str, str]) -> bool:
    """Write ``path`` in one step (:func:`~ldm_inpaint.files.write_atomic`) unless a file is there already:
    False then, and nothing written. For outputs named by their inputs (the evaluation's crops and
    predictions), which a rerun skips."""
    try:
        return write_atomic(path, _png_writer(image, metadata))
    except OSError as error:
        raise ImageError(f"cannot write {path}: {error.strerror or error}") from None


def save_png(image: Image.Image, outdir: str | Path, stem: str, metadata: Mapping[str, str]) -> Path:
    """Write ``outdir/<stem>-NNNNN.png`` with the next free number and return its path.

    Numbering starts at the count of existing ``<stem>-NNNNN.png`` files and moves on past every number that
    is taken, as a PNG or as a latent ``.npy``. The file is written under a temporary name and linked to its
    number only when complete (:func:`~ldm_inpaint.files.write_atomic`), so a killed run leaves no partial
    PNG, and a file created by another process meanwhile is skipped, never overwritten. Every metadata item
    becomes a PNG text chunk. ``outdir`` is created if missing.
    """
    if not stem or Path(stem).name != stem:
        raise ValueError(f"expected a file name stem without folders, found {stem!r}")
    write = _png_writer(image, metadata)
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"expected an output folder at {outdir}, could not create one ({exc})") from exc
    number = _count_existing(outdir, stem)
    while True:
        path = outdir / f"{stem}-{number:05d}.png"
        try:
            if not path.with_suffix(".npy").exists() and write_atomic(path, write):
                return path
        except OSError as error:
            raise ImageError(f"cannot write {path}: {error.strerror or error}") from None
        number += 1


def save_npy(array: Tensor | np.ndarray, png_path: str | Path) -> Path:
    """Write ``array`` as float32 to the ``.npy`` file named like ``png_path``, beside it; return its path.

    Use it right after :func:`save_png`, which has claimed the number. An existing file is never overwritten.
    """
    if isinstance(array, Tensor):
        array = array.detach().cpu().float().numpy()
    values = np.asarray(array, dtype=np.float32)
    png_path = Path(png_path)
    path = png_path.with_suffix(".npy")
    if not write_atomic(path, lambda file: np.save(file, values, allow_pickle=False)):
        raise ImageError(
            f"expected no file at {path} (the latent of {png_path.name}), found one; not overwriting it"
        )
    return path


def read_png_metadata(path: str | Path) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file, as :func:`save_png` wrote them."""
    return _png_text(_read(Path(path)), str(path))


def png_metadata(data: bytes, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, str]:
    """:func:`read_png_metadata` for the bytes of a PNG file (a request's upload)."""
    return _png_text(_decode(io.BytesIO(data), what, max_pixels), what)


def _png_text(image: Image.Image, what: str) -> dict[str, str]:
    if image.format != "PNG":
        raise ImageError(f"expected a PNG file, found a {image.format} file: {what}")
    return dict(image.text)
