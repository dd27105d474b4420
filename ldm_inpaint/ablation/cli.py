"""``ldm-inpaint ablate``: sweep inpainting options and checkpoints over image/mask pairs.

A study (:mod:`~ldm_inpaint.ablation.study`) is checkpoints x pairs x the product of the swept values, with
every other option fixed. It comes from a small YAML spec (``examples/ablation.yaml``), from the
command line, or both (the command line wins). Each cell is one inpainting run of one sample. Under ``--out``:

- ``cells/<pair>-<hash>-NNNNN.png``: the result, its parameters in PNG text chunks;
- ``results.sqlite``, exported as ``results.jsonl`` and ``results.csv``: one row per cell and attempt with
  every option, the checkpoint's sha256, the wall time, the number of UNet evaluations, and the mean absolute
  change of the pixels (in [0, 1]) outside the mask (how well the known region is kept) and inside it;
- ``grid-<pair>[-pN].png``: labelled grids (the first swept key down the rows, the second across the
  columns; one key: across; one grid per value combination of any further keys);
- ``spec-<hash>.yaml``: the resolved study, which ``--spec`` runs again.

A cell's hash covers everything that decides its result: every option, the contents (sha256) of the
checkpoint, image and mask files, the config, EMA and precision. A cell with an ``ok`` row whose image exists
is finished and skipped when the study runs again; failed cells are tried again. Shared work is done once:
pairs are read once, each checkpoint is loaded once into one pipeline and its cells run together, through the
pipeline's caches of text contexts and masked-image latents.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ldm_inpaint import options
from ldm_inpaint.ablation.cells import expand, write_spec
from ldm_inpaint.ablation.grids import write_grids
from ldm_inpaint.ablation.results import Results
from ldm_inpaint.ablation.runner import PROG, Runner
from ldm_inpaint.ablation.study import SWEEPABLE, build_study
from ldm_inpaint.command import Parser, checkpoint_argument
from ldm_inpaint.devices import PRECISIONS, resolve_device
from ldm_inpaint.errors import LdmInpaintError

if TYPE_CHECKING:
    from ldm_inpaint.ablation.evaluation import Evaluator


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Sweep sampling parameters and checkpoints over image/mask pairs: one labelled grid per "
        "pair, one CSV/JSON row per cell. Re-running skips finished cells.",
        epilog=f"sweepable keys: {', '.join(SWEEPABLE)}. Values given here override the spec's.",
    )
    parser.add_argument("--spec", type=Path, help="YAML study (see examples/ablation.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="study folder (created; re-running resumes)")
    parser.add_argument(
        "--ckpt",
        type=checkpoint_argument,
        action="append",
        help="checkpoint (or 'demo'); give it several times for a checkpoint axis",
    )
    parser.add_argument(
        "--config",
        action="append",
        help="YAML config for all checkpoints, or one per --ckpt (default: the YAML beside each checkpoint, "
        "else detected)",
    )
    parser.add_argument("--use-ema", action=argparse.BooleanOptionalAction, help="load the model_ema.* copy")
    parser.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:WEIGHT]",
        help="LoRA merged into every cell's checkpoint (repeat to stack); or sweep it: --sweep lora=none,FILE:0.8",
    )
    parser.add_argument(
        "--image", type=Path, action="append", help="image to inpaint (repeatable, with --mask)"
    )
    parser.add_argument("--mask", type=Path, action="append", help="its mask: white = repaint")
    parser.add_argument(
        "--batch", type=Path, help="folder of X.png + X_mask.png pairs, or a text file of pairs"
    )
    parser.add_argument(
        "--resize-mask",
        action=argparse.BooleanOptionalAction,
        help="resize masks of another size to the image",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help='swept values, in grid order (rows, columns, pages); a YAML list for values with commas: KEY=["a, b", c]',
    )
    fixed = parser.add_argument_group("fixed parameters (default: the ldm-inpaint command's)")
    options.add_arguments(fixed, with_defaults=False, names=options.SWEEPABLE)
    evaluation = parser.add_argument_group(
        "dataset metrics of every setting (the evaluation protocol's FID, LPIPS, SSIM, PSNR; needs the eval extra)"
    )
    evaluation.add_argument(
        "--eval-data", type=Path, help="folder of crop/mask pairs (ldm-inpaint eval masks)"
    )
    evaluation.add_argument(
        "--inception-weights", type=Path, help="pytorch-fid's Inception file (with --eval-data)"
    )
    evaluation.add_argument("--lpips-weights", type=Path, help="torchvision's VGG16 file (none: no LPIPS)")
    evaluation.add_argument("--eval-batch-size", type=int, default=4, help="pairs per UNet call (default 4)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--precision", default="fp32", choices=sorted(PRECISIONS), help="weights/compute dtype"
    )
    return parser


def _evaluator(args: argparse.Namespace, device: torch.device) -> Evaluator | None:
    """The dataset evaluation of ``--eval-data``, checked; None without it."""
    if args.eval_data is None:
        return None
    if args.inception_weights is None:
        raise LdmInpaintError(
            "--eval-data needs --inception-weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)"
        )
    if args.eval_batch_size < 1:
        raise LdmInpaintError(f"--eval-batch-size: expected a positive number, found {args.eval_batch_size}")
    try:
        from ldm_inpaint.ablation.evaluation import Evaluator
    except ImportError as error:
        raise LdmInpaintError(
            f'--eval-data needs the eval extra ({error.name} is missing): pip install "ldm-inpaint[eval]"'
        ) from None
    evaluator = Evaluator(
        args.eval_data, args.inception_weights, args.lpips_weights, args.eval_batch_size, args.out, device
    )
    evaluator.check()
    return evaluator


def ablate_main(argv: Sequence[str] | None = None) -> int:
    """``ldm-inpaint ablate``: 0 if every cell succeeded, 1 if any failed, 2 for a study that cannot run."""
    args = build_parser().parse_args(argv)
    try:
        study = build_study(args)
        cells = expand(study, args.precision)
        device = resolve_device(args.device)
        results = Results(args.out)
        spec_path = write_spec(study, args.out)
        done = sum(results.finished(cell) for cell in cells)
        shape = " x ".join(
            [f"{len(study.pairs)} pair(s)", *(f"{len(values)} {key}" for key, values in study.sweep.items())]
        )
        print(
            f"{PROG}: {len(cells)} cells ({shape}); {done} finished before, {len(cells) - done} to run",
            file=sys.stderr,
        )
        precision = "" if args.precision == "fp32" else f" --precision {args.precision}"
        print(
            f"{PROG}: reproduce with: ldm-inpaint ablate --spec {spec_path} --out {args.out}{precision}",
            file=sys.stderr,
        )
        evaluator = _evaluator(args, device)
        Runner(study, args.out, device, args.precision, results, evaluator).run(cells)
        for path in write_grids(study, cells, results, args.out):
            print(path)
        if evaluator is not None:
            from ldm_inpaint.ablation.evaluation import summary_rows, write_summary

            for path in write_summary(study, summary_rows(study, cells, evaluator), args.out):
                print(path)
    except LdmInpaintError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(results.jsonl)
    print(results.csv)
    failed = [(cell, results.latest(cell)) for cell in cells if not results.finished(cell)]
    if evaluator is not None and evaluator.failed:
        print(f"{PROG}: {len(evaluator.failed)} setting(s) not evaluated:", file=sys.stderr)
        for line in evaluator.failed:
            print(f"  {line}", file=sys.stderr)
        if not failed:
            return 1
    if failed:
        print(f"{PROG}: {len(failed)} of {len(cells)} cell(s) failed:", file=sys.stderr)
        for cell, row in failed:
            print(f"  {cell.pair.name} {cell.hash}: {row['error'] if row else 'not run'}", file=sys.stderr)
        return 1
    return 0
