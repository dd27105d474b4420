"""LaMa's evaluation crops and masks (``ldm-inpaint eval masks``), made as LaMa's ``bin/gen_mask_dataset.py``
makes them with ``configs/data_gen/random_{thick,medium,thin}_512.yaml``:

1. every image is resized (bicubic) so that its shorter side is the resolution, 512 (``out_min_size``): small
   images up (``handle_small_mode: upscale``) and, as LaMa does too, large ones down; sides are rounded;
2. 5 candidate masks of the set (``variants_n``) are drawn on the resized image, each cropped to a random
   square near its far end, the crops covering more than half (``max_tamper_area`` 0.5) dropped, one of the
   rest kept (:func:`~ldm_inpaint.mask_generators.draw_eval_crop`);
3. with none left, 5 fresh candidates, up to 10 tries (LaMa's ``n_max``); an image whose tries all fail is
   skipped and reported (LaMa stops the whole run there). At 512 a try of thick masks fails about 1.6 % of
   the time, so in practice no image is skipped;
4. the crop is written as ``<img>_crop000.png`` beside its mask, 0 or 255, ``<img>_crop000_mask000.png``: one
   mask per image (``max_masks_per_image`` 1).

Image ``i`` of the folder's images sorted by name draws from ``keyed_rng(seed, 0, i)``, so the files are a
function of (seed, kind, resolution, folder listing), whichever part runs when. A rerun writes only what is
missing, never replacing a file; ``eval-masks.json`` records the settings and the listing, and a rerun with
others is refused. Images are read from the folder itself (LaMa's reader also descends into subfolders).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ldm_inpaint import __version__, image_io
from ldm_inpaint.command import EXIT_BAD_INPUT, EXIT_FAILED_ITEMS, Parser
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.files import check_output_folder, write_new_text
from ldm_inpaint.mask_generators import EvalCrop, draw_eval_crop, keyed_rng

KINDS = ("thick", "medium", "thin")
RESOLUTION = 512
CANDIDATES = 5
MAX_AREA = 0.5
TRIES = 10
CROP_SUFFIX = "_crop000"
MASK_SUFFIX = "_mask000"
SETTINGS_FILE = "eval-masks.json"


def resize_short_side(image: Image.Image, side: int) -> Image.Image:
    """``image`` resized (bicubic) so that its shorter side is ``side``, the other ``round(long * side /
    short)``, as LaMa's ``gen_mask_dataset.py`` (an image of that size already is copied)."""
    scale = side / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)


def eval_crop(
    image: Image.Image, kind: str, rng: np.random.Generator, resolution: int = RESOLUTION
) -> tuple[Image.Image, EvalCrop] | None:
    """The crop (resolution x resolution) and mask of one image: :data:`TRIES` tries of
    :func:`~ldm_inpaint.mask_generators.draw_eval_crop` (kind ``thick``, ``medium`` or ``thin``) on the
    resized image; None when every try fails."""
    resized = resize_short_side(image.convert("RGB"), resolution)
    for _ in range(TRIES):
        crop = draw_eval_crop(f"lama-{kind}", resized.height, resized.width, rng, CANDIDATES, MAX_AREA)
        if crop is not None:
            box = (crop.left, crop.top, crop.left + resolution, crop.top + resolution)
            return resized.crop(box), crop
    return None


def output_paths(out: Path, stem: str) -> tuple[Path, Path]:
    """The crop and the mask written for the image named ``stem``."""
    return out / f"{stem}{CROP_SUFFIX}.png", out / f"{stem}{CROP_SUFFIX}{MASK_SUFFIX}.png"


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` (:data:`~ldm_inpaint.image_io.IMAGE_EXTENSIONS`, not hidden), sorted by
    name: their positions key the masks' randomness."""
    if not folder.is_dir():
        raise LdmInpaintError(f"--images: expected a folder of images, found none at {folder}")
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in image_io.IMAGE_EXTENSIONS
    )


@dataclass
class MasksReport:
    """What a run did: pairs written, pairs already there, and one sentence per skipped or failed image."""

    written: int = 0
    existing: int = 0
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _check_settings(out: Path, settings: dict[str, object]) -> None:
    """Record ``settings`` in ``out``, or check them against those recorded by an earlier run."""
    path = out / SETTINGS_FILE
    text = json.dumps(settings, indent=1) + "\n"
    if write_new_text(path, text):
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise LdmInpaintError(
            f"{path}: expected the settings of an earlier run, could not read them ({error})"
        ) from None
    if recorded != settings:
        changed = sorted(
            key for key in settings.keys() | recorded.keys() if settings.get(key) != recorded.get(key)
        )
        raise LdmInpaintError(
            f"{out} holds masks made with other settings (differing: {', '.join(changed)}; see {path}); "
            "rerun with the recorded ones to finish that set, or write to another folder"
        )


def make_masks(
    images: Path, out: Path, kind: str, seed: int = 0, resolution: int = RESOLUTION, progress: bool = False
) -> MasksReport:
    """Write the crop and mask of every image in ``images`` to ``out`` (see the module docstring); images
    that cannot be read, or whose name another image has, are reported and the others go on."""
    if kind not in KINDS or resolution < 1 or seed < 0:
        raise LdmInpaintError(
            f"expected kind one of {', '.join(KINDS)}, resolution >= 1 and seed >= 0, found kind {kind!r}, "
            f"resolution {resolution}, seed {seed}"
        )
    paths = list_images(images)
    listing = hashlib.sha256("\n".join(path.name for path in paths).encode("utf-8", "surrogateescape"))
    check_output_folder(out)
    settings = {"kind": kind, "seed": seed, "resolution": resolution, "images": len(paths)}
    _check_settings(out, {**settings, "listing_sha256": listing.hexdigest()})
    named: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        named[path.stem].append(path)
    report = MasksReport()
    for index, path in enumerate(tqdm(paths, unit="image", disable=not progress, file=sys.stderr)):
        if len(named[path.stem]) > 1:
            others = ", ".join(other.name for other in named[path.stem])
            report.failed.append(f"{path}: expected one image named {path.stem!r}, found {others}")
            continue
        crop_path, mask_path = output_paths(out, path.stem)
        if crop_path.exists() and mask_path.exists():
            report.existing += 1
            continue
        try:
            made = eval_crop(image_io.load_image(path), kind, keyed_rng(seed, 0, index), resolution)
            if made is None:
                report.skipped.append(
                    f"{path}: all {TRIES * CANDIDATES} candidate masks cover over half the crop"
                )
                continue
            crop, chosen = made
            metadata = {**{key: str(value) for key, value in settings.items()}, "index": str(index)}
            metadata |= {"source": path.name, "crop_top": str(chosen.top), "crop_left": str(chosen.left)}
            metadata["software"] = f"ldm-inpaint {__version__}"
            image_io.write_new_png(crop, crop_path, metadata)
            mask = Image.fromarray((chosen.mask * 255).astype(np.uint8))
            image_io.write_new_png(mask, mask_path, metadata)
            report.written += 1
        except (ValueError, OSError) as error:
            report.failed.append(f"{path}: {error}")
    return report


def build_parser() -> Parser:
    parser = Parser(
        prog="ldm-inpaint eval masks",
        description="Make LaMa's evaluation set of a folder of images: each image resized to a shorter side of "
        "--resolution, a random square crop around one LaMa mask covering at most half of it, written as "
        f"<img>{CROP_SUFFIX}.png and <img>{CROP_SUFFIX}{MASK_SUFFIX}.png. Reruns finish what is missing.",
    )
    parser.add_argument("--images", type=Path, required=True, help="folder of images (Places validation)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the crops and masks")
    parser.add_argument("--kind", required=True, choices=KINDS, help="LaMa mask set (the LDM paper: thick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    parser.add_argument(
        "--resolution", type=int, default=RESOLUTION, help=f"crop side in pixels (default {RESOLUTION})"
    )
    return parser


def masks_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    prog = "ldm-inpaint eval masks"
    try:
        report = make_masks(args.images, args.out, args.kind, args.seed, args.resolution, progress=True)
    except LdmInpaintError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for line in report.skipped:
        print(f"{prog}: skipped: {line}", file=sys.stderr)
    for line in report.failed:
        print(f"{prog}: error: {line}", file=sys.stderr)
    print(
        f"{args.out}: {report.written} crop/mask pairs written, {report.existing} already there, "
        f"{len(report.skipped)} image(s) skipped, {len(report.failed)} failed"
    )
    return EXIT_FAILED_ITEMS if report.failed else 0
