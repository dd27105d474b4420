"""Every crop/mask pair of an evaluation set inpainted with the protocol's settings (``ldm-inpaint eval
predict``), as the SD inpainting evaluation runs (RunwayML README table; pesser ``scripts/inpaint_sd.py``):
DDIM, 50 steps, eta 0, guidance 6.0, the prompt ``photograph of a beautiful empty scene, highest quality
settings``, the checkpoint's EMA weights, and the result pasted back as ``(1 - m) x + m pred`` for the binary
mask m (``paste_back`` without blur) -- :data:`PROTOCOL`, each setting open to the command line.

Files: the pairs are those :func:`~ldm_inpaint.pairs.find_pairs` finds (``X_crop000.png`` with
``X_crop000_mask000.png``, from ``ldm-inpaint eval masks``). A prediction is named after its mask, as LaMa's
``bin/predict.py`` names it: the mask's stem + :data:`PREDICTION_SUFFIX` in the output folder,
``X_crop000_mask000.png`` (:func:`prediction_path`; the scorer finds predictions by this rule). Its options,
its own seed among them, are PNG text chunks; an existing prediction is never replaced.

Determinism: a pair's noise comes from its own seed, :func:`file_seed` of (seed, mask name), never from its
place in a batch. Pairs go through the UNet in fixed groups of ``batch_size`` consecutive pairs (group g holds
pairs g B .. g B + B - 1 in :func:`~ldm_inpaint.pairs.find_pairs` order), group g on rank ``g % world_size``
(torchrun). A file's bits depend on the checkpoint, the options, the batch size, the pairs of its group, the
device and the thread count, not on the number of processes: the kernels' float rounding depends on the batch
they see (measured on the CPU), so a resumed run redoes a group with a missing file whole and writes only what
is missing.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ldm_inpaint import distributed, image_io, options
from ldm_inpaint.command import EXIT_BAD_INPUT, EXIT_FAILED_ITEMS, Parser, checkpoint_argument
from ldm_inpaint.devices import PRECISIONS
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.files import check_output_folder
from ldm_inpaint.mask_generators import draw_mask, keyed_rng
from ldm_inpaint.options import InpaintOptions
from ldm_inpaint.pairs import find_pairs

if TYPE_CHECKING:
    from ldm_inpaint.pipeline import InpaintPipeline

PROG = "ldm-inpaint eval predict"
PROTOCOL = InpaintOptions(
    prompt="photograph of a beautiful empty scene, highest quality settings",
    sampler="ddim",
    steps=50,
    eta=0.0,
    guidance_scale=6.0,
    paste_back=True,
)
# A prediction's name: its mask's stem + this (LaMa's bin/predict.py), X_crop000_mask000.png.
PREDICTION_SUFFIX = ".png"
BATCH_SIZE = 4
# Options the command does not take: one prediction per pair, at the crop's own size.
FIXED_OPTIONS = ("n_samples", "height", "width", "crop_to_mask")
EMA_CHOICES = {"auto": None, "on": True, "off": False}


def prediction_path(out: Path, mask: Path) -> Path:
    """Where the prediction of the pair with ``mask`` goes: ``out / (mask stem + PREDICTION_SUFFIX)``."""
    return out / f"{mask.stem}{PREDICTION_SUFFIX}"


def file_seed(seed: int, name: str) -> int:
    """The seed of one pair: 32 bits of a hash of (seed, the mask's stem ``name``), whatever the batch or
    process that runs it."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=4).digest(), "little")


def rank_groups(count: int, batch_size: int, world: distributed.World) -> list[range]:
    """The groups of ``count`` pairs this rank runs: group g is pairs [g B, g B + B), run by rank g % size."""
    starts = range(world.rank * batch_size, count, world.size * batch_size)
    return [range(start, min(start + batch_size, count)) for start in starts]


@dataclass
class PredictReport:
    """What one process did: predictions written, predictions already there, one sentence per failure."""

    written: int = 0
    existing: int = 0
    failed: list[str] = field(default_factory=list)


def predict_group(
    pipeline: InpaintPipeline,
    pairs: Sequence[tuple[Path, Path]],
    out: Path,
    options: InpaintOptions,
    metadata: dict[str, str],
    report: PredictReport,
) -> None:
    """Inpaint one group of pairs (those of one size in one batch) and write the predictions not there yet; a
    pair that cannot be read or run is added to ``report.failed`` and the rest go on."""
    by_size: dict[tuple[int, int], list[tuple[Path, Path, Image.Image, Image.Image]]] = defaultdict(list)
    for image_path, mask_path in pairs:
        try:
            image, mask = image_io.load_image(image_path), image_io.load_image(mask_path)
            image_io.check_same_size(image, mask)
            by_size[image.size].append((image_path, mask_path, image, mask))
        except (ValueError, OSError) as error:
            report.failed.append(f"{mask_path}: {error}")
    for items in by_size.values():
        seeds = [file_seed(options.seed, mask_path.stem) for _, mask_path, _, _ in items]
        try:
            result = pipeline.inpaint_batch([(image, mask) for *_, image, mask in items], seeds, options)
        except (ValueError, OSError, RuntimeError, MemoryError) as error:
            report.failed += [f"{mask_path}: {error}" for _, mask_path, _, _ in items]
            continue
        for (image_path, mask_path, _, _), seed, picture in zip(items, seeds, result.to_pil(), strict=True):
            chunks = {**metadata, **replace(options, seed=seed).to_metadata(), "eval_seed": str(options.seed)}
            chunks |= {
                "steps_taken": str(result.steps_taken),
                "image": str(image_path),
                "mask": str(mask_path),
            }
            try:
                report.written += image_io.write_new_png(picture, prediction_path(out, mask_path), chunks)
            except ValueError as error:
                report.failed.append(f"{mask_path}: {error}")


def predict_folder(
    pipeline: InpaintPipeline,
    data: Path,
    out: Path,
    options: InpaintOptions,
    batch_size: int = BATCH_SIZE,
    world: distributed.World | None = None,
    metadata: dict[str, str] | None = None,
) -> PredictReport:
    """Predict this rank's groups of the pairs in ``data`` into ``out`` (see the module docstring), skipping
    groups whose predictions all exist; a progress bar on rank 0. ``metadata``: more PNG text chunks."""
    world = world or distributed.World(0, 1, pipeline.model.device)
    pairs, problems = find_pairs(data)
    report = PredictReport(failed=problems if world.is_main else [])
    groups = rank_groups(len(pairs), batch_size, world)
    total = sum(len(group) for group in groups)
    metadata = {"batch_size": str(batch_size), **(metadata or {})}
    with tqdm(total=total, unit="pair", disable=not world.is_main, file=sys.stderr) as bar:
        for group in groups:
            members = [pairs[index] for index in group]
            missing = [mask for _, mask in members if not prediction_path(out, mask).exists()]
            report.existing += len(members) - len(missing)
            if missing:
                predict_group(pipeline, members, out, options, metadata, report)
            bar.update(len(members))
    return report


def throughput(
    pipeline: InpaintPipeline, size: int, batch_size: int, pairs: int = 8, options: InpaintOptions = PROTOCOL
) -> float:
    """Pairs per second of prediction at ``size`` x ``size`` in batches of ``batch_size``: ``pairs`` made-up
    pairs (random pixels, LaMa thick masks) after one batch that is not timed (warm-up), memos cleared, as
    the benchmark compares batch 1 with batch N."""
    rng = np.random.default_rng(0)
    items = [
        (
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
            Image.fromarray(
                (draw_mask("lama-thick", size, size, keyed_rng(0, 0, index)) * 255).astype(np.uint8)
            ),
        )
        for index in range(pairs)
    ]
    batches = [items[start : start + batch_size] for start in range(0, pairs, batch_size)]
    pipeline.inpaint_batch(batches[0], list(range(len(batches[0]))), options)
    pipeline.clear_memo()
    start = time.perf_counter()
    for batch in batches:
        pipeline.inpaint_batch(batch, list(range(len(batch))), options)
    return pairs / (time.perf_counter() - start)


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Inpaint every crop/mask pair of an evaluation set (ldm-inpaint eval masks) with the LDM "
        "paper's settings, several pairs per UNet call; one process or many (torchrun --nproc-per-node N -m "
        f"ldm_inpaint eval predict ...). Each prediction is named as its mask, <crop>_mask000{PREDICTION_SUFFIX}; "
        "a rerun finishes what is missing.",
    )
    parser.add_argument(
        "--ckpt", type=checkpoint_argument, required=True, help="checkpoint file (.ckpt or .safetensors)"
    )
    parser.add_argument("--config", help="YAML config (default: beside the checkpoint, else detected)")
    parser.add_argument(
        "--ema",
        choices=EMA_CHOICES,
        default="auto",
        help="the file's EMA weights (model_ema.*), as the protocol; auto: when it has them (default auto)",
    )
    parser.add_argument("--data", type=Path, required=True, help="folder of <img>_crop000.png + masks")
    parser.add_argument("--out", type=Path, required=True, help="folder for the predictions")
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_SIZE, help=f"pairs per UNet call (default {BATCH_SIZE})"
    )
    names = [name for name in options.OPTION_NAMES if name not in FIXED_OPTIONS]
    group = parser.add_argument_group("sampling settings (defaults: the protocol's)")
    options.add_arguments(group, with_defaults=False, names=names, base=PROTOCOL)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--precision", default="fp32", choices=sorted(PRECISIONS), help="weights/compute dtype"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    return parser


def _options(parser: Parser, args: object) -> InpaintOptions:
    """The run's options, checked before anything loads."""
    chosen = options.from_arguments(args, PROTOCOL)
    try:
        chosen.validate()
    except LdmInpaintError as error:
        parser.error(str(error))
    if chosen.seed == options.RANDOM_SEED:
        parser.error(f"--seed: an evaluation needs a fixed seed (0..{options.MAX_SEED}), found {chosen.seed}")
    if args.batch_size < 1:
        parser.error(f"--batch-size: expected at least 1, found {args.batch_size}")
    if args.out.resolve() == args.data.resolve():
        parser.error(
            f"--out: expected a folder other than --data (predictions take their masks' names), found {args.out}"
        )
    return chosen


def _load(args: object, world: distributed.World) -> tuple[InpaintPipeline, dict[str, str]]:
    """The pipeline, and the PNG text chunks that describe its model."""
    from ldm_inpaint.checkpoint import load_model
    from ldm_inpaint.cli import checkpoint_metadata
    from ldm_inpaint.models.packing import can_pack
    from ldm_inpaint.pipeline import InpaintPipeline

    dtype = PRECISIONS[args.precision]
    pack = can_pack(world.device, dtype) and not args.compile
    use_ema = EMA_CHOICES[args.ema]
    loaded = load_model(args.ckpt, args.config, use_ema=use_ema, dtype=dtype, device=world.device, pack=pack)
    pipeline = InpaintPipeline(loaded.model, compile=args.compile)
    if world.is_main:
        weights = (
            "EMA" if loaded.ema else "non-EMA (the file has no EMA copy)" if use_ema is None else "non-EMA"
        )
        print(
            f"{PROG}: config {loaded.config.name} ({loaded.config_source}), {weights} weights",
            file=sys.stderr,
        )
    metadata = checkpoint_metadata(args.ckpt, pipeline, world.device)
    return pipeline, {**metadata, "ema": str(loaded.ema), "precision": args.precision}


def predict_main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = _options(parser, args)
    try:
        world = distributed.join(args.device)
    except LdmInpaintError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if world.is_main:
            check_output_folder(args.out)
        distributed.barrier(world)
        pipeline, metadata = _load(args, world)
        report = predict_folder(pipeline, args.data, args.out, chosen, args.batch_size, world, metadata)
        for failure in report.failed:
            print(f"{PROG}: error: {failure}", file=sys.stderr)
        counts = torch.tensor([report.written, report.existing, len(report.failed)], device=world.device)
        written, existing, failed = distributed.total(counts, world).tolist()
    except LdmInpaintError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        distributed.leave()
    if world.is_main:
        print(f"{args.out}: {written} predictions written, {existing} already there, {failed} failed")
    return EXIT_FAILED_ITEMS if failed else 0
