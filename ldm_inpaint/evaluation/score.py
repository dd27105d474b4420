"""``ldm-inpaint eval score``: inpainted images against their originals, overall and by mask area.

Files are matched by name (:func:`match_files`): a prediction ``P.<ext>`` is scored against the real image
named ``P`` without a trailing ``_mask<digits>`` (LaMa's naming: ``photo_crop000_mask000.png`` inpaints
``photo_crop000.png``; a prediction without that ending is compared with the real image of its own name) and,
with ``--masks``, binned by the mask named ``P`` in that folder (LaMa's layout, where a prediction takes its
mask's name). Files named ``*_mask<digits>`` in the real folder are masks, not real images, so LaMa's folders,
crops and masks side by side, serve as both ``--real`` and ``--masks``. Anything left unmatched is one line
of the report, and the rest is scored.

Under ``torchrun`` process ``rank`` scores the files ``i % world_size == rank`` of the sorted list; the FID
moments are summed over the processes and the per-image scores gathered, so any number of processes gives
the scores of one.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ldm_inpaint import distributed, image_io
from ldm_inpaint.command import EXIT_BAD_INPUT, EXIT_FAILED_ITEMS, Parser, run
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.evaluation import features, report
from ldm_inpaint.evaluation.metrics import area_bin, feature_moments, psnr, ssim
from ldm_inpaint.files import sha256_file

PROG = "ldm-inpaint eval score"
MASK_ENDING = re.compile(r"_mask\d+$")
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class Item:
    prediction: Path
    real: Path
    mask: Path | None


@dataclass(frozen=True)
class Record:
    """One prediction's scores; ``area`` is the masked fraction (None without masks)."""

    name: str
    area: float | None
    lpips: float | None
    ssim: float
    psnr: float

    @property
    def group(self) -> int | None:
        return None if self.area is None else area_bin(self.area)


@dataclass(frozen=True)
class Scorers:
    inception: features.FidInception
    lpips: torch.nn.Module | None
    device: torch.device


@dataclass(frozen=True)
class Scores:
    """All processes' records (sorted by name), the FID moments by mask-area group (None: no masks), each
    ``(2, d + 1, d + 1)`` for predictions and reals, the files that could not be scored, the seconds taken."""

    records: list[Record]
    moments: dict[int | None, Tensor]
    failures: list[str]
    seconds: float


def _images_by_stem(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.iterdir()):
        if (
            path.is_file()
            and not path.name.startswith(".")
            and path.suffix.lower() in image_io.IMAGE_EXTENSIONS
        ):
            found[path.stem].append(path)
    return found


def _one(found: list[Path], folder: Path, stem: str, what: str, owner: Path) -> Path | str:
    """The single file of ``found``, or the problem: none, or several with one name."""
    if len(found) == 1:
        return found[0]
    if not found:
        return f"{owner}: no {what} {stem}.<ext> in {folder}"
    return f"{owner}: several {what}s named {stem!r} in {folder}: {', '.join(path.name for path in found)}"


def match_files(predictions: Path, reals: Path, masks: Path | None) -> tuple[list[Item], list[str]]:
    """The (prediction, real, mask) items by the rule of the module docstring, sorted by prediction name, and
    one line per file left unmatched."""
    for option, folder in (("--pred", predictions), ("--real", reals), ("--masks", masks)):
        if folder is not None and not folder.is_dir():
            raise LdmInpaintError(f"{option} {folder}: expected a folder of images, found none there")
    predicted = _images_by_stem(predictions)
    real_files = {
        stem: paths for stem, paths in _images_by_stem(reals).items() if not MASK_ENDING.search(stem)
    }
    mask_files = _images_by_stem(masks) if masks is not None else {}
    items: list[Item] = []
    problems: list[str] = []
    claimed: set[str] = set()
    for stem in sorted(predicted):
        real_stem = MASK_ENDING.sub("", stem)
        claimed.add(real_stem)
        prediction = _one(predicted[stem], predictions, stem, "prediction", predictions)
        real = _one(real_files.get(real_stem, []), reals, real_stem, "real image", predicted[stem][0])
        mask = (
            None if masks is None else _one(mask_files.get(stem, []), masks, stem, "mask", predicted[stem][0])
        )
        found = [entry for entry in (prediction, real, mask) if isinstance(entry, str)]
        if found:
            problems += found
        else:
            items.append(Item(prediction, real, mask))
    for stem in sorted(real_files.keys() - claimed):
        problems += [f"{path}: no prediction for it in {predictions}" for path in real_files[stem]]
    return items, problems


def _rgb(path: Path) -> np.ndarray:
    """8-bit RGB pixels ``(H, W, 3)``, as pytorch-fid reads them (``convert("RGB")``)."""
    return np.asarray(image_io.load_image(path).convert("RGB"))


def _load(item: Item) -> tuple[np.ndarray, np.ndarray, float | None]:
    """The prediction's and the real image's pixels and the mask's area (the fraction of pixels to repaint,
    the mask binarized as the pipeline reads it)."""
    pred, real = _rgb(item.prediction), _rgb(item.real)
    if pred.shape != real.shape:
        raise LdmInpaintError(
            f"{item.prediction}: {pred.shape[1]}x{pred.shape[0]} pixels, its real image {item.real} "
            f"{real.shape[1]}x{real.shape[0]}; expected the same size"
        )
    if item.mask is None:
        return pred, real, None
    mask = image_io.mask_to_tensor(image_io.load_image(item.mask))
    if tuple(mask.shape[-2:]) != pred.shape[:2]:
        raise LdmInpaintError(
            f"{item.prediction}: {pred.shape[1]}x{pred.shape[0]} pixels, its mask {item.mask} "
            f"{mask.shape[-1]}x{mask.shape[-2]}; expected the same size"
        )
    return pred, real, float(mask.mean())


def _to_batch(images: list[np.ndarray], device: torch.device) -> Tensor:
    """8-bit ``(H, W, 3)`` images -> ``(b, 3, H, W)`` float32 in [0, 1], as torchvision's ``ToTensor``."""
    pixels = torch.from_numpy(np.stack(images)).to(device)
    return pixels.permute(0, 3, 1, 2).float().div(255)  # (b, H, W, 3) -> (b, 3, H, W)


def score_pairs(
    scorers: Scorers,
    names: list[str],
    preds: list[np.ndarray],
    reals: list[np.ndarray],
    areas: list[float | None],
) -> tuple[list[Record], Tensor, Tensor]:
    """Records and Inception features ``(b, 2048)`` of predictions and reals, for images of one size."""
    pred, real = _to_batch(preds, scorers.device), _to_batch(reals, scorers.device)
    with torch.inference_mode():
        pred_features, real_features = scorers.inception(pred), scorers.inception(real)
        distances = (
            features.lpips_distances(scorers.lpips, pred, real).tolist()
            if scorers.lpips is not None
            else [None] * len(names)
        )
    records = [
        Record(name, area, distance, ssim(p, r), psnr(p, r))
        for name, area, distance, p, r in zip(names, areas, distances, preds, reals, strict=True)
    ]
    return records, pred_features, real_features


def _add_moments(moments: dict, records: list[Record], pred_features: Tensor, real_features: Tensor) -> None:
    for group in {record.group for record in records}:
        rows = [index for index, record in enumerate(records) if record.group == group]
        both = torch.stack([feature_moments(pred_features[rows]), feature_moments(real_features[rows])])
        moments[group] = both if group not in moments else moments[group] + both


def _group_order(group: int | None) -> int:
    return -1 if group is None else group


def score_items(items: list[Item], scorers: Scorers, batch_size: int, world: distributed.World) -> Scores:
    """Score this process's share of ``items`` and combine every process's (see the module docstring)."""
    start = time.perf_counter()
    mine = items[world.rank :: world.size]
    records: list[Record] = []
    failures: list[str] = []
    moments: dict[int | None, Tensor] = {}
    stats = _stats_device(scorers.device)
    progress = tqdm(total=len(items), unit="image", file=sys.stderr, disable=not world.is_main, leave=False)
    for first in range(0, len(mine), batch_size):
        by_size: dict[tuple[int, ...], list[tuple[str, np.ndarray, np.ndarray, float | None]]]
        by_size = defaultdict(list)
        for item in mine[first : first + batch_size]:
            try:
                pred, real, area = _load(item)
            except LdmInpaintError as error:
                failures.append(str(error))
                continue
            by_size[pred.shape].append((item.prediction.name, pred, real, area))
        for loaded in by_size.values():
            names, preds, reals, areas = (list(column) for column in zip(*loaded, strict=True))
            batch_records, pred_features, real_features = score_pairs(scorers, names, preds, reals, areas)
            _add_moments(moments, batch_records, pred_features.to(stats), real_features.to(stats))
            records += batch_records
        progress.update(min(batch_size, len(mine) - first) * world.size)
    progress.close()
    records = sorted(distributed.gathered(records, world), key=lambda record: record.name)
    failures = distributed.gathered(failures, world)
    size = features.FID_DIMS + 1
    empty = torch.zeros(2, size, size, dtype=torch.float64, device=stats)
    totals = {
        group: distributed.total(moments.get(group, empty), world)
        for group in sorted({record.group for record in records}, key=_group_order)
    }
    return Scores(records, totals, failures, time.perf_counter() - start)


def _stats_device(device: torch.device) -> torch.device:
    """Where the float64 moments are summed: the GPU under CUDA (NCCL reduces there), else the CPU (MPS has no
    float64)."""
    return device if device.type == "cuda" else torch.device("cpu")


def load_scorers(inception_weights: Path, lpips_weights: Path | None, device: torch.device) -> Scorers:
    inception = features.load_fid_inception(inception_weights).to(device)
    model = None if lpips_weights is None else features.load_lpips(lpips_weights).to(device)
    return Scorers(inception, model, device)


def scoring_throughput(
    count: int = 8, size: int = 512, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu"
) -> float:
    """Images scored per second (FID features, LPIPS, SSIM, PSNR; PNG files read and masks binned included)
    for ``count`` random ``size`` x ``size`` pairs, with randomly initialized networks of the real shapes (the
    speed does not depend on the weights)."""
    where = torch.device(device)
    network = features.fid_inception_network()
    scorers = Scorers(
        features.FidInception(network).eval().to(where), features.lpips_network().to(where), where
    )
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        items = []
        for index in range(count):
            paths = [Path(folder) / f"{index:03d}_{kind}.png" for kind in ("pred", "real", "mask")]
            for path in paths:
                (image,) = image_io.tensor_to_pil(torch.rand(1, 3, size, size, generator=generator) * 2 - 1)
                image_io.write_png(image, path, {})
            items.append(Item(*paths))
        scores = score_items(items, scorers, batch_size, distributed.World(0, 1, where))
    return count / scores.seconds


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Score inpainted images against their originals as the LDM paper and LaMa do: FID "
        "(pytorch-fid's Inception), LPIPS (VGG, v0.1), SSIM and PSNR, overall and in 10 mask-area bins; "
        "writes report.json, report.md and a chart to --out. Runs on several processes under torchrun.",
    )
    parser.add_argument("--pred", type=Path, required=True, help="folder of inpainted images")
    parser.add_argument("--real", type=Path, required=True, help="folder of the original images")
    parser.add_argument(
        "--masks", type=Path, help="folder of the masks, named like the predictions (no masks: no bins)"
    )
    parser.add_argument("--out", type=Path, required=True, help="report folder (an existing report is kept)")
    parser.add_argument(
        "--inception-weights",
        type=Path,
        required=True,
        help=f"pytorch-fid's {features.FID_INCEPTION.name} ({features.FID_INCEPTION.url})",
    )
    parser.add_argument(
        "--lpips-weights",
        type=Path,
        help=f"torchvision's {features.VGG16.name} ({features.VGG16.url}); none: no LPIPS",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per step (default {DEFAULT_BATCH_SIZE})",
    )
    return parser


def sources(
    pred: Path, real: Path, masks: Path | None, inception_weights: Path, lpips_weights: Path | None
) -> dict[str, str | None]:
    """What was scored with what (a report's ``sources``): the folders, and the weights files with their
    sha256."""
    found = {
        name: None if path is None else str(path)
        for name, path in (("pred", pred), ("real", real), ("masks", masks))
    }
    for name, path in (("inception_weights", inception_weights), ("lpips_weights", lpips_weights)):
        found[name] = None if path is None else str(path)
        found[f"{name}_sha256"] = None if path is None else sha256_file(path)
    return found


def score_main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size: expected a positive number, found {args.batch_size}")
    try:
        world = distributed.join(args.device)
        items, problems = match_files(args.pred, args.real, args.masks)
        if world.is_main:
            for problem in problems:
                print(f"{PROG}: {problem}", file=sys.stderr)
        if not items:
            raise LdmInpaintError(
                f"no prediction in {args.pred} has its real image in {args.real}: nothing to score"
            )
        scorers = load_scorers(args.inception_weights, args.lpips_weights, world.device)
        report.check_report_folder(args.out)
        scores = score_items(items, scorers, args.batch_size, world)
        if world.is_main:
            for failure in scores.failures:
                print(f"{PROG}: {failure}", file=sys.stderr)
            summary = report.build_report(
                scores,
                problems,
                sources(args.pred, args.real, args.masks, args.inception_weights, args.lpips_weights),
                world.size,
            )
            for path in report.write_report(args.out, summary):
                print(path)
    except LdmInpaintError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        distributed.leave()
    return EXIT_FAILED_ITEMS if problems or scores.failures else 0


if __name__ == "__main__":
    sys.exit(run(PROG, score_main, sys.argv[1:]))
