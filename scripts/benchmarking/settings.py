"""The benchmark's command line: its options, checked into :class:`Settings`, and the fixed inputs of every run."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm_inpaint.devices import PRECISIONS

REPO = Path(__file__).resolve().parents[2]
MODELS = {
    "sd15": REPO / "ldm_inpaint" / "configs" / "v1-inpainting-inference.yaml",
    "sd2": REPO / "ldm_inpaint" / "configs" / "v2-inpainting-inference.yaml",
}
IMPLEMENTATIONS = ("ours", "diffusers")
# What each worker imports before its clock starts (import memory is measured apart from loading); diffusers
# imports its pipeline modules and transformers lazily, on first use, so they are named here.
IMPORTS = {
    "ours": ("ldm_inpaint.pipeline",),
    "diffusers": (
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
        "transformers.models.clip.modeling_clip",
        "transformers.models.clip.tokenization_clip",
    ),
}
PROMPT = "a yellow cat sitting on a park bench"
NEGATIVE_PROMPT = "blurry, low quality"
GUIDANCE_SCALE = 7.5
TRAIN_TIMESTEPS = 1000
GB = 1e9
# What the two sides still do differently, as far as the benchmark could not remove it (under the table).
DIFFERENCES = (
    "Weights: ours reads the original .ckpt, diffusers its safetensors folder; in fp32 both keep the file "
    "memory-mapped, so part of the reading moves from the load (time and RSS) into the first (warm-up) call.",
    "Masked-image latent: ours takes the VAE posterior mean (deterministic), diffusers draws a sample.",
    "Text: each side runs its own tokenizer and text encoder on the same weights (diffusers: transformers' "
    "CLIPTextModel).",
    "Allocator: ours runs with the glibc setting the ldm-inpaint command applies at start-up "
    "(ldm_inpaint.runtime.keep_freed_memory; with --lean-memory, its lean mode); diffusers gets it only with "
    "--same-allocator.",
)


class BenchmarkError(ValueError):
    """Bad command-line input: the message says what was expected and what was found."""


@dataclass(frozen=True)
class Settings:
    """The command line, checked."""

    models: dict[str, Path]
    sizes: list[int]
    precisions: list[str]
    steps: int
    reps: int
    device: str
    threads: int
    seed: int
    warmup_calls: int
    compile: bool
    same_allocator: bool
    lean_memory: bool
    load_memory: bool
    evaluation: bool
    serving: bool
    matmul_size: int
    timeout: float
    workdir: Path
    out: Path


def _list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or len(set(items)) != len(items):
        raise BenchmarkError(f"{what}: expected a comma-separated list without repeats, found {text!r}")
    return items


def _models(text: str) -> dict[str, Path]:
    """Names (``sd15``, ``sd2``) or paths of inpainting YAML configs -> {name: config path}, each checked."""
    from ldm_inpaint.config import load_config
    from ldm_inpaint.errors import LdmInpaintError

    models = {}
    for item in _list(text, "--models"):
        path = MODELS.get(item, Path(item))
        if item not in MODELS and not (path.suffix in (".yaml", ".yml") and path.is_file()):
            raise BenchmarkError(
                f"--models: unknown model {item!r}; expected {sorted(MODELS)} or the path of a YAML config"
            )
        try:
            config = load_config(path)
        except LdmInpaintError as error:
            raise BenchmarkError(f"--models: {item}: {error}") from None
        if not config.is_inpainting:
            raise BenchmarkError(
                f"--models: {item} is a text-to-image config; the benchmark needs inpainting"
            )
        name = item if item in MODELS else path.stem
        if name in models:
            raise BenchmarkError(f"--models: two models are called {name!r}; rename one of the configs")
        models[name] = path.resolve()
    return models


def check_settings(args: argparse.Namespace) -> Settings:
    """The parsed command line, validated; raises :class:`BenchmarkError` naming the bad value."""
    try:
        sizes = [int(size) for size in _list(args.sizes, "--sizes")]
    except ValueError:
        raise BenchmarkError(f"--sizes: expected integers such as 256,512, found {args.sizes!r}") from None
    if any(size < 64 or size % 64 for size in sizes):
        raise BenchmarkError(
            f"--sizes: each side must be a positive multiple of 64 (SD's UNet), found {sizes}"
        )
    precisions = _list(args.precision, "--precision")
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        raise BenchmarkError(f"--precision: unknown {unknown}; expected some of {list(PRECISIONS)}")
    if not 2 <= args.steps <= TRAIN_TIMESTEPS or TRAIN_TIMESTEPS % args.steps:
        raise BenchmarkError(
            f"--steps: expected a divisor of {TRAIN_TIMESTEPS} that is at least 2 (s/step leaves out the first "
            f"step; only for divisors do the original DDIM grid and diffusers' take the same steps), "
            f"found {args.steps}"
        )
    counts = {"--reps": args.reps, "--threads": args.threads, "--matmul-size": args.matmul_size}
    if bad := {name: value for name, value in counts.items() if value < 1}:
        raise BenchmarkError(f"expected positive values, found {bad}")
    if args.warmup_calls < 0 or args.timeout <= 0:
        raise BenchmarkError(
            f"--warmup-calls must be >= 0 and --timeout > 0, found {args.warmup_calls}, {args.timeout}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchmarkError("--device cuda: torch sees no CUDA device on this machine")
    return Settings(
        models=_models(args.models),
        sizes=sizes,
        precisions=precisions,
        steps=args.steps,
        reps=args.reps,
        device=args.device,
        threads=args.threads,
        seed=args.seed,
        warmup_calls=args.warmup_calls,
        compile=args.compile,
        same_allocator=args.same_allocator,
        lean_memory=args.lean_memory,
        load_memory=args.load_memory,
        evaluation=args.eval,
        serving=args.serve,
        matmul_size=args.matmul_size,
        timeout=args.timeout,
        workdir=args.workdir,
        out=args.out,
    )


def cases(settings: Settings) -> list[dict[str, Any]]:
    """The rows of the table: every model x size x precision."""
    return [
        {"model": name, "size": size, "precision": precision}
        for name in settings.models
        for size in settings.sizes
        for precision in settings.precisions
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time our inpainting pipeline against diffusers' on the same random weights."
    )
    parser.add_argument(
        "--models", default="sd15,sd2", help="sd15, sd2 and/or paths of inpainting YAML configs"
    )
    parser.add_argument("--sizes", default="256,512", help="image sides in pixels, multiples of 64")
    parser.add_argument("--precision", default="fp32,bf16", help=f"some of {','.join(PRECISIONS)}")
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps, a divisor of 1000, at least 2")
    parser.add_argument("--reps", type=int, default=3, help="fresh-process runs per implementation")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (both)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and start latent")
    parser.add_argument("--warmup-calls", type=int, default=1, help="1-step calls before the measured one")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile both UNets (the warm-up calls compile them)"
    )
    parser.add_argument(
        "--same-allocator",
        action="store_true",
        help="give diffusers the allocator setting that ldm-inpaint applies at start-up (ldm_inpaint.runtime)",
    )
    parser.add_argument(
        "--lean-memory",
        action="store_true",
        help="run ours as ldm-inpaint --lean-memory (ldm_inpaint.runtime)",
    )
    parser.add_argument(
        "--eval",
        action="store_true",
        help="measure only the evaluation protocol's speed: prediction pairs/s (1 vs 4 pairs per UNet call) "
        "and scoring images/s",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="measure only what ldm-inpaint serve adds to a request (against a direct pipeline call) and the "
        "time to its first progress event",
    )
    parser.add_argument(
        "--load-memory",
        action="store_true",
        help="measure only the load memory (ldm-inpaint loading the .ckpt and inpainting one 64x64 step)",
    )
    parser.add_argument("--matmul-size", type=int, default=4096, help="side of the matmul peak measurement")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to one worker process")
    parser.add_argument("--workdir", type=Path, default=Path(".benchmark"), help="cache of generated weights")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder of the JSON and table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser
