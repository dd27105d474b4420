"""The image/mask pairs of a batch: a folder of ``X.<ext>`` + ``X_mask.<ext>`` files (or LaMa's numbered
``X_mask000.<ext>``), or a text file listing one ``image mask`` pair per line."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from ldm_inpaint.image_io import IMAGE_EXTENSIONS, MASK_EXTENSIONS, MASK_SUFFIX, ImageError

# The stem of X's mask: X_mask, or X_mask000 as LaMa's evaluation sets name it (``bin/gen_mask_dataset.py``;
# its readers take the image of ``*mask*.png`` as the name up to the last ``_mask``).
MASK_STEM = re.compile(rf"(?P<image>.+){MASK_SUFFIX}\d*")


def find_pairs(source: str | Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """The (image, mask) pairs of a batch and the problems found, one sentence per problem.

    ``source`` is either a folder, where every image ``X.<ext>`` pairs with ``X_mask.<ext>`` or
    ``X_maskNNN.<ext>`` (:data:`MASK_STEM`; any of :data:`IMAGE_EXTENSIONS`, case-insensitive; other files
    and hidden files are ignored), or a text file with one ``image_path mask_path`` pair per line (see
    `_pairs_in_list`). An image without its mask, a mask without its image and a malformed line are
    problems, not exceptions, so that all of them can be reported at once. Folder pairs are sorted by name;
    list pairs keep the order of the list.
    """
    source = Path(source)
    if source.is_dir():
        return _pairs_in_folder(source)
    if source.is_file():
        return _pairs_in_list(source)
    raise ImageError(
        f"expected a folder of image/mask pairs or a text file listing them, found nothing at {source}"
    )


def _pairs_in_folder(folder: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    images: dict[str, list[Path]] = defaultdict(list)
    masks: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        mask_of = MASK_STEM.fullmatch(path.stem)
        if mask_of and path.suffix.lower() in MASK_EXTENSIONS:
            masks[mask_of["image"]].append(path)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            images[path.stem].append(path)
    if not images and not masks:
        return [], [
            f"{folder}: no image files found (expected X.png with X{MASK_SUFFIX}.png, or other extensions: "
            f"{', '.join(IMAGE_EXTENSIONS)})"
        ]
    pairs: list[tuple[Path, Path]] = []
    problems: list[str] = []
    for name in sorted(images.keys() | masks.keys()):
        found_images, found_masks = images[name], masks[name]
        if not found_masks:
            problems += [
                f"{path}: no mask found (expected {name}{MASK_SUFFIX}.<ext> beside it)"
                for path in found_images
            ]
        elif not found_images:
            problems += [f"{path}: no image found (expected {name}.<ext> beside it)" for path in found_masks]
        elif len(found_images) > 1 or len(found_masks) > 1:
            names = ", ".join(path.name for path in found_images + found_masks)
            problems.append(f"{folder}: expected one image and one mask named {name!r}, found {names}")
        else:
            pairs.append((found_images[0], found_masks[0]))
    return pairs, problems


def _pairs_in_list(list_file: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Pairs from a text file: one ``image_path mask_path`` per line, separated by whitespace, or by a tab
    when a path contains spaces. Relative paths start from the list file's folder. Blank lines and lines
    starting with ``#`` are skipped. A line with other than two fields, or naming a missing file, is a
    problem."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(
            f"expected a folder or a UTF-8 text file listing 'image_path mask_path' pairs, could not read "
            f"{list_file} as text ({exc})"
        ) from exc
    pairs: list[tuple[Path, Path]] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [field.strip() for field in line.split("\t")] if "\t" in line else line.split()
        fields = [field for field in fields if field]
        if len(fields) != 2:
            problems.append(
                f"{list_file} line {number}: expected 'image_path mask_path', "
                f"found {len(fields)} fields: {line!r}"
            )
            continue
        image, mask = (list_file.parent / field for field in fields)
        missing = [str(path) for path in (image, mask) if not path.is_file()]
        if missing:
            problems.append(
                f"{list_file} line {number}: expected existing files, found none at {', '.join(missing)}"
            )
            continue
        pairs.append((image, mask))
    if not pairs and not problems:
        problems.append(f"{list_file}: expected at least one 'image_path mask_path' line, found none")
    return pairs, problems
