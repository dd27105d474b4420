"""``ldm-inpaint train`` (also ``python -m ldm_inpaint train``, ``scripts/train.py`` and ``torchrun ... -m
ldm_inpaint train``): settings -> run folder -> :mod:`.loop`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ldm_inpaint import distributed
from ldm_inpaint.command import EXIT_BAD_INPUT, Parser
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.files import write_new_text
from ldm_inpaint.training import loop, outputs, setup
from ldm_inpaint.training import settings as run_settings
from ldm_inpaint.training.settings import SETTINGS_FILE, SettingsError, TrainSettings


def build_parser() -> Parser:
    parser = Parser(
        prog="ldm-inpaint train",
        description="Fine-tune an inpainting checkpoint (or train LoRA adapters, or a model from scratch: "
        "--stage autoencoder, then the UNet) on a folder of images, on one "
        "process or many (torchrun --nproc-per-node N -m ldm_inpaint train ...). Writes RUN/last.ckpt in the "
        "original layout, RUN/metrics.jsonl, sample grids and a resume state.",
    )
    parser.add_argument(
        "--resume", type=Path, help="continue this run folder up to --steps, with its settings"
    )
    run_settings.add_arguments(parser)
    return parser


def _start(args: object, world: distributed.World) -> tuple[TrainSettings, Path, bool]:
    """The run's settings, its folder, and whether it resumes."""
    if args.resume is not None:
        settings = run_settings.resumed_settings(args.resume, args)
        settings.check(world.size)
        return settings, args.resume, True
    settings = run_settings.new_settings(args)
    settings.check(world.size)
    run = Path(settings.out)
    if world.is_main:
        if run.exists():
            raise SettingsError(
                f"--out {run} already exists; a run folder is never overwritten (use --resume {run})"
            )
        run.mkdir(parents=True)
        write_new_text(run / SETTINGS_FILE, run_settings.to_json(settings))
    return settings, run, False


def train_main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        world = distributed.join(args.device)
        settings, run, resuming = _start(args, world)
        distributed.barrier(world)
        trainer = setup.build(settings, world)
        if resuming:
            trainer.load(outputs.load_state(run, world.device))
            if world.is_main:
                outputs.truncate_metrics(run, trainer.step)
        loop.train(trainer, run)
    except LdmInpaintError as error:
        print(f"ldm-inpaint train: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        distributed.leave()
    if world.is_main:
        print(f"{run}: {trainer.step} steps; {run / 'last.ckpt'}")
    return 0
