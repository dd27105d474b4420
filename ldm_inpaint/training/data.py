"""Training examples: a folder of images, each with an optional caption and an optional mask file.

- Images: every file with an image extension (any size or mode), sorted by name; ``X_mask.<ext>`` files are
  masks, not images.
- Captions: ``X.txt`` beside ``X.<ext>``, or one ``captions.jsonl`` (objects with ``file_name`` and ``text``) or
  ``captions.csv`` (columns ``file_name``, ``text``) in the folder; an image without a caption trains with "".
- Masks (``--masks files``): ``X_mask.<ext>``, white = repaint.

A crop is the image resized (bicubic) so that its short side is the resolution, then cut at a random offset,
as the original ``--resize 512, random crop 512``. An image that cannot be read is reported once and replaced
by the next readable one, so a run goes on, and goes on the same way every time.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.image_io import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    MASK_SUFFIX,
    ImageError,
    image_to_tensor,
    load_image,
    mask_to_tensor,
)

CAPTION_FILES = ("captions.jsonl", "captions.csv")


class DataError(LdmInpaintError):
    """A training folder that cannot be used at all (as opposed to one bad image, which is skipped)."""


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    mask: Path | None


def _caption_table(folder: Path) -> dict[str, str]:
    """file name -> caption from ``captions.jsonl`` or ``captions.csv`` (at most one of them)."""
    present = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if len(present) > 1:
        raise DataError(f"{folder}: found both {CAPTION_FILES[0]} and {CAPTION_FILES[1]}; keep one of them")
    if not present:
        return {}
    path = present[0]
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(text.splitlines()))
        return {str(row["file_name"]): str(row["text"]) for row in rows}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, csv.Error) as error:
        raise DataError(
            f"{path}: expected one caption per row with fields 'file_name' and 'text' (UTF-8), "
            f"could not read it ({type(error).__name__}: {error})"
        ) from None


def scan(folder: str | Path, with_masks: bool) -> list[Example]:
    """The examples of ``folder`` in name order; DataError if there are none, or (``with_masks``) if an image
    has no mask file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--data: expected a folder of training images, found no folder at {folder}")
    table = _caption_table(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    masks = {
        p.stem.removesuffix(MASK_SUFFIX): p
        for p in files
        if p.stem.endswith(MASK_SUFFIX) and p.suffix.lower() in MASK_EXTENSIONS
    }
    examples = []
    for path in files:
        if path.suffix.lower() not in IMAGE_EXTENSIONS or path.stem.endswith(MASK_SUFFIX):
            continue
        caption_file = path.with_suffix(".txt")
        caption = (
            caption_file.read_text(encoding="utf-8", errors="replace").strip()
            if caption_file.is_file()
            else ""
        )
        examples.append(Example(path, table.get(path.name, caption), masks.get(path.stem)))
    if not examples:
        raise DataError(f"--data {folder}: no image files found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    missing = [e.image.name for e in examples if e.mask is None]
    if with_masks and missing:
        raise DataError(
            f"--masks files: {len(missing)} image(s) have no {MASK_SUFFIX} file, e.g. {missing[0]} "
            f"(expected {Path(missing[0]).stem}{MASK_SUFFIX}.png beside it)"
        )
    return examples


def crop_box(height: int, width: int, resolution: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(resized height, resized width, top, left): the short side resized to ``resolution``, then a random
    square crop."""
    scale = resolution / min(height, width)
    resized = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    top = int(rng.integers(0, resized[0] - resolution + 1))
    left = int(rng.integers(0, resized[1] - resolution + 1))
    return (*resized, top, left)


def _cropped(
    image: Image.Image, box: tuple[int, int, int, int], resolution: int, resample: int
) -> Image.Image:
    height, width, top, left = box
    return image.resize((width, height), resample).crop((left, top, left + resolution, top + resolution))


class ImageFolder:
    """The examples of a training folder, read as crops."""

    def __init__(self, folder: str | Path, resolution: int, with_masks: bool) -> None:
        self.examples = scan(folder, with_masks)
        self.resolution = resolution
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.examples)

    def load(self, index: int, rng: np.random.Generator) -> tuple[Tensor, Tensor | None, str]:
        """Example ``index`` (or the next readable one) as (image (3, R, R) in [-1, 1], its mask (1, R, R) in
        [0, 1] or None, caption)."""
        for offset in range(len(self.examples)):
            position = (index + offset) % len(self.examples)
            if position in self.bad:
                continue
            try:
                return self._read(self.examples[position], rng)
            except ImageError as error:
                self.bad.add(position)
                print(f"ldm-inpaint train: skipped a bad image: {error}", file=sys.stderr)
        raise DataError("every training image failed to load; see the messages above")

    def _read(self, example: Example, rng: np.random.Generator) -> tuple[Tensor, Tensor | None, str]:
        image = load_image(example.image)
        box = crop_box(image.height, image.width, self.resolution, rng)
        pixels = image_to_tensor(_cropped(image.convert("RGB"), box, self.resolution, Image.BICUBIC))[0]
        mask = None
        if example.mask is not None:
            mask_file = load_image(example.mask)
            if mask_file.size != image.size:
                raise ImageError(
                    f"{example.mask}: mask is {mask_file.size}, its image {image.size}; expected the same size"
                )
            mask = mask_to_tensor(_cropped(mask_file, box, self.resolution, Image.NEAREST))[0]
        return pixels.to(torch.float32), mask, example.caption
