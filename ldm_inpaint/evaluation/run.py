"""``ldm-inpaint eval run``: the whole protocol in one command — masks -> predict -> score — resumable.

``OUT/data`` holds LaMa's crops and masks of ``--images`` (:mod:`.masks`), ``OUT/predictions`` the inpainted
crops (:mod:`.predict`), ``OUT/report`` the scores (:mod:`.score`). Each stage keeps what an earlier run
finished: a rerun of an interrupted evaluation completes it, and a finished one only prints where it is.
Options may come from ``--spec FILE`` (YAML: option name -> value, the names of this command's options without
the dashes); the command line wins. Options this command does not know go to ``eval predict`` (the sampling
settings: ``--steps``, ``--sampler``, ...). Under torchrun, rank 0 makes the masks and every rank predicts and
scores its share.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from ldm_inpaint import distributed
from ldm_inpaint.command import EXIT_BAD_INPUT, Parser
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.evaluation import masks, predict, score

PROG = "ldm-inpaint eval run"


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, help="YAML file of options (the command line wins)")
    parser.add_argument("--ckpt", required=True, help="checkpoint to evaluate (or 'demo')")
    parser.add_argument("--images", type=Path, required=True, help="folder of evaluation images")
    parser.add_argument("--out", type=Path, required=True, help="folder for data/, predictions/, report/")
    parser.add_argument("--kind", choices=masks.KINDS, default="thick", help="LaMa mask set (default thick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of crops, masks and noise (default 0)")
    parser.add_argument("--resolution", type=int, default=512, help="crop side (default 512)")
    parser.add_argument("--inception-weights", type=Path, required=True, help="pytorch-fid's Inception file")
    parser.add_argument("--lpips-weights", type=Path, help="torchvision's VGG16 file (none: no LPIPS)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return parser


def spec_arguments(path: Path) -> list[str]:
    """A spec file as command-line arguments (placed before the real ones, which therefore win)."""
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise LdmInpaintError(
            f"--spec {path}: expected a readable YAML file, could not read it ({error})"
        ) from None
    if not isinstance(spec, dict):
        raise LdmInpaintError(
            f"--spec {path}: expected a mapping of option names to values, found {type(spec).__name__}"
        )
    arguments = []
    for name, value in spec.items():
        flag = "--" + str(name).replace("_", "-")
        if value is True:
            arguments.append(flag)
        elif value not in (None, False):
            arguments += [flag, str(value)]
    return arguments


def _arguments(argv: Sequence[str]) -> tuple[object, list[str]]:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.spec is not None:
        try:
            argv = [*spec_arguments(first.spec), *argv]
        except LdmInpaintError as error:
            parser.error(str(error))
    return parser.parse_known_args(argv)


def run_main(argv: Sequence[str]) -> int:
    args, predict_options = _arguments(argv)
    data, predictions, report = args.out / "data", args.out / "predictions", args.out / "report"
    device = ["--device", args.device] if args.device else []
    world = distributed.join(args.device)
    try:
        if world.is_main:
            made = masks.make_masks(args.images, data, args.kind, args.seed, args.resolution, progress=True)
            for line in [*made.skipped, *made.failed]:
                print(f"{PROG}: {line}", file=sys.stderr)
        distributed.barrier(world)
    except LdmInpaintError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    status = predict.predict_main(
        [
            "--ckpt",
            args.ckpt,
            "--data",
            str(data),
            "--out",
            str(predictions),
            "--seed",
            str(args.seed),
            *device,
            *predict_options,
        ]
    )
    if status == EXIT_BAD_INPUT:
        return status
    if (report / "report.json").exists():
        if world.is_main:
            print(f"{report}: already scored (remove it to score again)")
        return status
    weights = ["--inception-weights", str(args.inception_weights)]
    if args.lpips_weights is not None:
        weights += ["--lpips-weights", str(args.lpips_weights)]
    scored = score.score_main(
        [
            "--pred",
            str(predictions),
            "--real",
            str(data),
            "--masks",
            str(data),
            "--out",
            str(report),
            *weights,
            *device,
        ]
    )
    return max(status, scored) if EXIT_BAD_INPUT not in (status, scored) else EXIT_BAD_INPUT
