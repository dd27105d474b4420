"""``ldm-inpaint eval STAGE ...``: the evaluation protocol, one subcommand per stage, each module imported when
its stage is called."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ldm_inpaint.command import EXIT_BAD_INPUT, Parser

# Stage -> (module, its main(argv), what it does), in protocol order.
STAGES: dict[str, tuple[str, str, str]] = {
    "masks": (
        "ldm_inpaint.evaluation.masks",
        "masks_main",
        "LaMa's evaluation crops and masks of a folder of images",
    ),
    "predict": (
        "ldm_inpaint.evaluation.predict",
        "predict_main",
        "inpaint every crop/mask pair with the protocol's settings (torchrun too)",
    ),
    "score": (
        "ldm_inpaint.evaluation.score",
        "score_main",
        "FID, LPIPS, SSIM and PSNR of the predictions, overall and by mask area",
    ),
    "run": ("ldm_inpaint.evaluation.run", "run_main", "the whole protocol, from images to report"),
}


def build_parser() -> Parser:
    stages = "\n".join(f"  ldm-inpaint eval {name:8} {text}" for name, (_, _, text) in STAGES.items())
    parser = Parser(
        prog="ldm-inpaint eval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate an inpainting checkpoint as the LDM paper (Sec. 4.5, following LaMa).",
        epilog=f"stages (each with its own --help):\n{stages}",
    )
    parser.add_argument("stage", choices=STAGES, help="the stage to run")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the stage's own arguments")
    return parser


def eval_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    module, function, _ = STAGES[args.stage]
    try:
        stage = getattr(importlib.import_module(module), function)
    except ImportError as error:
        print(
            f"ldm-inpaint eval: error: {error.name or error} is not installed; the evaluation needs the eval "
            'extra: pip install "ldm-inpaint[eval]" (or -e ".[eval]" in a checkout)',
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    return stage(args.arguments)
