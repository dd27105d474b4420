"""Ours vs diffusers' ``StableDiffusionInpaintPipeline``, side by side, on the same random weights.

    python scripts/benchmark.py                                   # SD1.5 + SD2, 256 + 512 px, fp32 + bf16, CPU
    python scripts/benchmark.py --device cuda --precision fp16,bf16 --sizes 512,768

1. **Files, once** (``--workdir``, reused when present): for each model a random checkpoint of the real layout
   (``random_weights.random_checkpoint``) saved as ``.ckpt``, the file users load; the same weights converted
   by diffusers' own original-checkpoint code (the conversion the parity tests check, ``tests/oracles.py``),
   with a transformers ``CLIPTextModel`` (SD2: the 23-block tower diffusers runs for OpenCLIP's penultimate
   layer) and a ``CLIPTokenizer`` built from open_clip's bundled BPE, saved with ``save_pretrained``: diffusers
   loads it by its normal ``from_pretrained(folder)``.
2. **Runs**: every (implementation, repetition) is a fresh interpreter (``--worker``), so load time and peak
   memory are its own; the order alternates (ours first, then diffusers first, ...). Both get the same image,
   mask, prompts, start latent, DDIM (the original's "uniform" grid: diffusers' leading spacing with
   ``steps_offset=1``, ``set_alpha_to_one=False``), eta 0, guidance 7.5 (a batch-2 UNet call per step),
   precision and thread count. ``--warmup-calls`` 1-step calls run first; then one measured call.
3. **Figures**: s/step = median of the measured call's step durations (step-end callbacks) without the first
   step — UNet + sampler only; s/image = the whole measured call (text, VAE encode, sampling, VAE decode);
   load = construction to ready; RSS = ``ru_maxrss`` after loading and at the end. UNet FLOPs per step are
   counted once by ``torch.utils.flop_counter`` on the meta device and divided by s/step; the machine's
   matmul throughput is the best of a few large square matmuls of the same dtype and threads.

Writes ``benchmark-N.json`` (every raw measurement, machine info) and ``benchmark-N.md`` (the table) to
``--out`` without overwriting, and prints the table. Exit status 1 when a run failed (reported, not raised).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm_inpaint.devices import PRECISIONS as DTYPES

REPO = Path(__file__).resolve().parent.parent
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


# ---------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class PrepareJob:
    """Write the random checkpoint and its diffusers folder for one config, unless already there."""

    config: str
    seed: int
    checkpoint: str
    diffusers_dir: str


@dataclass(frozen=True)
class MatmulJob:
    """Measure (size x size) @ (size x size) matmuls in each of ``precisions``."""

    precisions: list[str]
    device: str
    size: int
    reps: int


@dataclass(frozen=True)
class RunJob:
    """Load one implementation and time one inpainting call."""

    implementation: str
    config: str
    checkpoint: str
    diffusers_dir: str
    size: int
    steps: int
    precision: str
    device: str
    seed: int
    warmup_calls: int
    compile: bool
    same_allocator: bool
    lean_memory: bool


# ------------------------------------------------------------------------------------- measurements


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def synchronizer(device: str) -> Callable[[], None]:
    """Waits for queued GPU work before a timestamp; a no-op on CPU."""
    return torch.cuda.synchronize if device.startswith("cuda") else lambda: None


class Stopwatch:
    """Timestamps at the end of each sampler step, and durations of named sections of a call."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.step_ends: list[float] = []
        self.sections: dict[str, float] = {}

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def step(self) -> None:
        self.step_ends.append(self.now())

    def reset(self) -> None:
        self.step_ends, self.sections = [], {}

    def time_method(self, owner: object, name: str, section: str) -> None:
        """Replace ``owner.name`` (a bound method) by a wrapper adding its duration to ``section``."""
        method = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.now()
            out = method(*args, **kwargs)
            self.sections[section] = self.sections.get(section, 0.0) + self.now() - start
            return out

        setattr(owner, name, timed)


def sample_inputs(size: int) -> tuple[Any, Any]:
    """A smooth colour image with texture and a rectangular mask (PIL, size x size), as a user gives them."""
    from PIL import Image

    rng = np.random.RandomState(0)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1)
    pixels = np.clip(127.5 * (1 + 0.8 * base) + 10 * rng.randn(size, size, 3), 0, 255)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 3 : 5 * size // 6] = 255
    return Image.fromarray(pixels.astype(np.uint8)), Image.fromarray(mask)


def start_latent(seed: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """The original demos' start noise, ``RandomState(seed).randn(1, 4, h/8, w/8)``, in the run's dtype; both
    implementations get these exact values."""
    noise = np.random.RandomState(seed).randn(1, 4, size // 8, size // 8).astype(np.float32)
    return torch.from_numpy(noise).to(dtype)


def load_ours(job: RunJob, watch: Stopwatch) -> Callable[[int], torch.Tensor]:
    """Our pipeline from the ``.ckpt``; returns ``run(steps) -> images``."""
    from ldm_inpaint.pipeline import InpaintPipeline
    from ldm_inpaint.runtime import keep_freed_memory

    keep_freed_memory(lean=job.lean_memory)  # as the ldm-inpaint command does at start-up

    pipe = InpaintPipeline.from_checkpoint(
        job.checkpoint, job.config, device=job.device, dtype=DTYPES[job.precision], compile=job.compile
    )
    watch.time_method(pipe, "encode_prompts", "text_s")
    watch.time_method(pipe, "encode_image", "vae_encode_s")
    watch.time_method(pipe, "decode", "vae_decode_s")
    image, mask = sample_inputs(job.size)
    x_T = start_latent(job.seed, job.size, DTYPES[job.precision])

    def run(steps: int) -> torch.Tensor:
        # Every call does the whole work, as diffusers' does: no contexts or latents memoized by an earlier one.
        pipe.clear_memo()
        return pipe(
            image,
            mask,
            PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            eta=0.0,
            seed=job.seed,
            start_latent=x_T,
            callback=lambda index, total: watch.step(),
        ).images

    return run


def load_diffusers(job: RunJob, watch: Stopwatch) -> Callable[[int], torch.Tensor]:
    """diffusers' pipeline from its saved folder; returns ``run(steps) -> images``."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging

    from ldm_inpaint.runtime import keep_freed_memory

    if job.same_allocator:
        keep_freed_memory()

    logging.set_verbosity_error()
    dtype = DTYPES[job.precision]
    pipe = StableDiffusionInpaintPipeline.from_pretrained(job.diffusers_dir, torch_dtype=dtype).to(job.device)
    pipe.set_progress_bar_config(disable=True)
    if job.compile:
        if job.device == "cpu":
            # Weight freezing, as ours compiles on CPU (ldm_inpaint.pipeline.compile_unet); set for the whole
            # process, which runs diffusers only.
            from torch._inductor import config as inductor_config

            inductor_config.freezing = True
        pipe.unet = torch.compile(pipe.unet)
    watch.time_method(pipe, "encode_prompt", "text_s")
    watch.time_method(pipe.vae, "encode", "vae_encode_s")
    watch.time_method(pipe.vae, "decode", "vae_decode_s")
    image, mask = sample_inputs(job.size)
    x_T = start_latent(job.seed, job.size, dtype).to(job.device)

    def on_step_end(pipe: Any, index: int, t: Any, tensors: dict) -> dict:
        watch.step()
        return tensors

    def run(steps: int) -> torch.Tensor:
        # Ours runs under inference_mode; diffusers' own __call__ under no_grad: give it the same mode.
        with torch.inference_mode():
            return pipe(
                prompt=PROMPT,
                negative_prompt=NEGATIVE_PROMPT,
                image=image,
                mask_image=mask,
                height=job.size,
                width=job.size,
                num_inference_steps=steps,
                guidance_scale=GUIDANCE_SCALE,
                eta=0.0,
                generator=torch.Generator(job.device).manual_seed(job.seed),
                latents=x_T,
                output_type="pt",
                callback_on_step_end=on_step_end,
            ).images

    return run


LOADERS = {"ours": load_ours, "diffusers": load_diffusers}


def run_worker(job: RunJob) -> dict[str, Any]:
    """Import, load, warm up, then time one call; every figure of one (implementation, repetition)."""
    for module in IMPORTS[job.implementation]:
        importlib.import_module(module)
    import_rss = peak_rss()
    watch = Stopwatch(synchronizer(job.device))
    start = watch.now()
    run = LOADERS[job.implementation](job, watch)
    load_s = watch.now() - start
    load_rss = peak_rss()
    warmup_s = []
    for _ in range(job.warmup_calls):
        start = watch.now()
        run(1)
        warmup_s.append(watch.now() - start)
    watch.reset()
    start = watch.now()
    images = run(job.steps)
    image_s = watch.now() - start
    step_s = [later - earlier for earlier, later in pairwise(watch.step_ends)]
    result = {
        "import_rss_bytes": import_rss,
        "load_s": load_s,
        "load_rss_bytes": load_rss,
        "warmup_call_s": warmup_s,
        "image_s": image_s,
        "steps_taken": len(watch.step_ends),
        "step_s": step_s,  # durations of steps 2..n (each from the end of the previous step)
        "median_step_s": statistics.median(step_s) if step_s else None,
        **watch.sections,
        "peak_rss_bytes": peak_rss(),
        "output_finite": bool(torch.isfinite(images).all()),
        "output_shape": list(images.shape),
    }
    if job.device.startswith("cuda"):
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def matmul_worker(job: MatmulJob) -> dict[str, Any]:
    """Per precision, GFLOP/s of a square matmul (2 n^3 flops): the best of ``reps`` after one warm-up."""
    sync = synchronizer(job.device)
    results = {}
    for precision in job.precisions:
        a, b = (torch.randn(job.size, job.size, device=job.device).to(DTYPES[precision]) for _ in range(2))
        torch.mm(a, b)
        seconds = []
        for _ in range(job.reps):
            sync()
            start = time.perf_counter()
            torch.mm(a, b)
            sync()
            seconds.append(time.perf_counter() - start)
        results[precision] = {
            "size": job.size,
            "seconds": seconds,
            "gflops": 2 * job.size**3 / min(seconds) / 1e9,
        }
    return results


# -------------------------------------------------------------------------- files for both pipelines


def _oracles() -> Any:
    """``tests/oracles.py``: diffusers' own original-checkpoint conversion, exactly as the parity tests use it."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("tests.oracles")


def clip_tokenizer(pad_token: int) -> Any:
    """transformers' ``CLIPTokenizer`` with open_clip's bundled BPE (the same 49,408 tokens and merges as the
    tokenizer files of the SD repos, which are not reachable offline), padding with token id ``pad_token``
    (SD1: end-of-text; SD2: "!", id 0, as diffusers' SD2 tokenizer declares)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    pad = {index: token for token, index in vocab.items()}[pad_token]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)


def clip_text_model(params: Any, checkpoint: dict[str, torch.Tensor]) -> Any:
    """transformers' ``CLIPTextModel`` as diffusers runs SD's text encoders (SD2: OpenCLIP's blocks up to the
    penultimate, then the final norm), with the checkpoint's weights converted by diffusers' functions.

    Every parameter is loaded; left out on purpose: ``position_ids`` (implied by position), OpenCLIP's
    ``text_projection`` and its last block (unused by ``layer: penultimate``)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    layers = params.layers - (1 if params.layer == "penultimate" else 0)
    config = CLIPTextConfig(
        vocab_size=params.vocab_size,
        hidden_size=params.width,
        intermediate_size=4 * params.width,
        num_hidden_layers=layers,
        num_attention_heads=params.heads,
        max_position_embeddings=params.context_length,
        hidden_act=params.activation,
        layer_norm_eps=1e-5,
        projection_dim=params.projection_dim or params.width,
    )
    model = CLIPTextModel(config).eval()
    if params.layout == "openai":
        weights = convert_ldm_clip_checkpoint(checkpoint)
    else:
        weights = convert_open_clip_checkpoint(model, checkpoint)
    # transformers >= 5.6 has no ``text_model.`` level in CLIPTextModel (diffusers strips it the same way).
    prefix = "" if hasattr(model, "text_model") else "text_model."
    weights = {key.removeprefix(prefix): value for key, value in weights.items()}
    model.load_state_dict({key: weights[key] for key in model.state_dict()}, strict=True)
    return model


def diffusers_pipeline(config_path: Path, checkpoint: dict[str, torch.Tensor]) -> Any:
    """diffusers' inpainting pipeline holding the checkpoint's weights, with the original's DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    from ldm_inpaint.config import load_config

    oracles = _oracles()
    raw = oracles.original_yaml(config_path)
    text = load_config(config_path).text_encoder
    return StableDiffusionInpaintPipeline(
        vae=oracles.diffusers_vae(raw, checkpoint),
        text_encoder=clip_text_model(text, checkpoint),
        tokenizer=clip_tokenizer(text.pad_token),
        unet=oracles.diffusers_unet(raw, checkpoint),
        scheduler=DDIMScheduler(**oracles.ORIGINAL_DDIM, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def prepare_worker(job: PrepareJob) -> dict[str, Any]:
    """Write the ``.ckpt`` and the diffusers folder if missing (each under a temporary name, then renamed, so an
    interrupted run leaves no half-written cache); their sizes in bytes."""
    from ldm_inpaint.config import load_config
    from ldm_inpaint.random_weights import random_checkpoint

    checkpoint_path, diffusers_dir = Path(job.checkpoint), Path(job.diffusers_dir)
    if not checkpoint_path.exists():
        partial = checkpoint_path.with_name(checkpoint_path.name + ".partial")
        torch.save(random_checkpoint(load_config(job.config), job.seed), partial)
        partial.rename(checkpoint_path)
    if not (diffusers_dir / "model_index.json").exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
        partial = diffusers_dir.with_name(diffusers_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        diffusers_pipeline(Path(job.config), checkpoint).save_pretrained(partial)
        shutil.rmtree(diffusers_dir, ignore_errors=True)
        partial.rename(diffusers_dir)
    return file_sizes(job)


def file_sizes(job: PrepareJob) -> dict[str, int]:
    """Bytes of the ``.ckpt`` and of the weight files in the diffusers folder."""
    weights = Path(job.diffusers_dir).rglob("*.safetensors")
    return {
        "checkpoint_bytes": Path(job.checkpoint).stat().st_size,
        "diffusers_bytes": sum(path.stat().st_size for path in weights),
    }


WORKERS: dict[str, tuple[type, Callable[[Any], dict[str, Any]]]] = {
    "prepare": (PrepareJob, prepare_worker),
    "matmul": (MatmulJob, matmul_worker),
    "run": (RunJob, run_worker),
}


def worker_main(message: str) -> int:
    """Entry point of a worker process: ``{"kind", "job", "threads", "result"}`` -> result JSON file."""
    request = json.loads(message)
    job_type, work = WORKERS[request["kind"]]
    torch.set_num_threads(request["threads"])
    result = work(job_type(**request["job"]))
    Path(request["result"]).write_text(json.dumps(result))
    return 0


def spawn(kind: str, job: Any, threads: int, timeout: float) -> dict[str, Any]:
    """Run ``job`` in a fresh interpreter; its result, or ``{"error": ...}`` if it failed or timed out."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        request = {"kind": kind, "job": asdict(job), "threads": threads, "result": str(result)}
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(request)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"{kind} worker timed out after {timeout:g} s"}
        if done.returncode != 0 or not result.exists():
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            return {
                "error": f"{kind} worker exited with status {done.returncode}: {lines[-1]}",
                "stderr_tail": lines[-20:],
            }
        return json.loads(result.read_text())


# ------------------------------------------------------------------------------------ the benchmark


@dataclass(frozen=True)
class Settings:
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
    if unknown := [p for p in precisions if p not in DTYPES]:
        raise BenchmarkError(f"--precision: unknown {unknown}; expected some of {list(DTYPES)}")
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
        matmul_size=args.matmul_size,
        timeout=args.timeout,
        workdir=args.workdir,
        out=args.out,
    )


def unet_flops(config_path: Path, size: int) -> int:
    """FLOPs of one UNet call at batch 2 (a guided step) on size x size images, counted on the meta device
    (shapes only: no weights, no time). Attention runs on SDPA's math backend, whose matmuls every torch
    release counts (a fused kernel's FLOPs are counted by some releases and not by others)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ldm_inpaint.config import load_config
    from ldm_inpaint.models.unet import UNetModel

    params = load_config(config_path).unet
    latent = size // 8
    with torch.device("meta"):
        unet = UNetModel(params)
        x = torch.empty(2, params.in_channels, latent, latent)
        context = torch.empty(2, 77, params.context_dim)
        t = torch.full((2,), 500.0)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, context)
    return counter.get_total_flops()


def cache_job(name: str, config_path: Path, workdir: Path, seed: int) -> PrepareJob:
    """Where the model's files live: names carry the config's content hash and the seed, so another config or
    seed gets other files."""
    digest = hashlib.sha256(config_path.read_bytes()).hexdigest()[:8]
    stem = workdir.resolve() / f"{name}-{digest}-seed{seed}"
    return PrepareJob(str(config_path), seed, checkpoint=f"{stem}.ckpt", diffusers_dir=f"{stem}-diffusers")


def prepare(name: str, config_path: Path, settings: Settings) -> dict[str, Any]:
    """The model's files and their sizes, written by a worker process if missing."""
    job = cache_job(name, config_path, settings.workdir, settings.seed)
    if Path(job.checkpoint).exists() and (Path(job.diffusers_dir) / "model_index.json").exists():
        return {**asdict(job), **file_sizes(job)}
    log(f"[prepare] {name}: writing the random checkpoint and its diffusers folder to {settings.workdir}")
    return {**asdict(job), **spawn("prepare", job, settings.threads, settings.timeout)}


def machine_info(settings: Settings) -> dict[str, Any]:
    import diffusers
    import transformers
    from diffusers.utils import is_accelerate_available

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    info = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": settings.threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        # Without accelerate, diffusers' from_pretrained falls back to low_cpu_mem_usage=False.
        "diffusers_has_accelerate": is_accelerate_available(),
    }
    if settings.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cases(settings: Settings) -> list[dict[str, Any]]:
    """The rows of the table: every model x size x precision."""
    return [
        {"model": name, "size": size, "precision": precision}
        for name in settings.models
        for size in settings.sizes
        for precision in settings.precisions
    ]


def measure(settings: Settings) -> dict[str, Any]:
    """Every worker of the benchmark, in order; the raw results."""
    settings.workdir.mkdir(parents=True, exist_ok=True)
    files = {name: prepare(name, config_path, settings) for name, config_path in settings.models.items()}
    job = MatmulJob(settings.precisions, settings.device, settings.matmul_size, reps=5)
    measured = spawn("matmul", job, settings.threads, settings.timeout)
    # One result per precision; if the worker failed, its error for each.
    matmul = {precision: measured.get(precision, measured) for precision in settings.precisions}
    log(f"[matmul] GFLOP/s: { {precision: result.get('gflops') for precision, result in matmul.items()} }")
    flops = {
        f"{name}@{size}": unet_flops(config_path, size)
        for name, config_path in settings.models.items()
        for size in settings.sizes
    }
    runs = []
    for case in cases(settings):
        for rep in range(settings.reps):
            # Alternate who goes first, so that drift (heat, caches) does not favour one side.
            for implementation in IMPLEMENTATIONS if rep % 2 == 0 else IMPLEMENTATIONS[::-1]:
                run = {**case, "rep": rep, "implementation": implementation}
                runs.append({**run, **run_one(files[case["model"]], run, settings)})
    return {"files": files, "matmul": matmul, "unet_flops_per_step": flops, "runs": runs}


def run_one(files: dict[str, Any], run: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The measurements of one worker run, or ``{"error": ...}``."""
    if "error" in files:
        return {"error": f"files not prepared: {files['error']}"}
    job = RunJob(
        implementation=run["implementation"],
        config=files["config"],
        checkpoint=files["checkpoint"],
        diffusers_dir=files["diffusers_dir"],
        size=run["size"],
        steps=settings.steps,
        precision=run["precision"],
        device=settings.device,
        seed=settings.seed,
        warmup_calls=settings.warmup_calls,
        compile=settings.compile,
        same_allocator=settings.same_allocator,
        lean_memory=settings.lean_memory,
    )
    result = spawn("run", job, settings.threads, settings.timeout)
    if "error" not in result and not result["output_finite"]:
        result["error"] = "the output image has NaN/inf values"
    if "error" not in result and result["steps_taken"] != settings.steps:
        result["error"] = f"the sampler took {result['steps_taken']} steps, {settings.steps} were asked for"
    status = result.get("error") or f"{result['median_step_s']:.3f} s/step, {result['image_s']:.2f} s/image"
    log(f"[run] {' '.join(str(value) for value in run.values())}: {status}")
    return result


# --------------------------------------------------------------------------------------------- report


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


SUMMARY_FIELDS = (
    "median_step_s",
    "image_s",
    "load_s",
    "text_s",
    "vae_encode_s",
    "vae_decode_s",
    "import_rss_bytes",
    "load_rss_bytes",
    "peak_rss_bytes",
    "gpu_peak_bytes",
)


def summarize(raw: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """One row per model x size x precision: medians over repetitions per implementation, and ratios."""
    rows = []
    for case in cases(settings):
        files = raw["files"][case["model"]]
        flops = raw["unet_flops_per_step"][f"{case['model']}@{case['size']}"]
        peak = raw["matmul"][case["precision"]].get("gflops")
        row: dict[str, Any] = dict(case)
        for implementation, file_key in zip(
            IMPLEMENTATIONS, ("checkpoint_bytes", "diffusers_bytes"), strict=True
        ):
            runs = [
                run
                for run in raw["runs"]
                if run["implementation"] == implementation
                and all(run[key] == value for key, value in case.items())
            ]
            good = [run for run in runs if "error" not in run]
            stats = {field: _median([run.get(field) for run in good]) for field in SUMMARY_FIELDS}
            gflops = flops / stats["median_step_s"] / 1e9 if stats["median_step_s"] else None
            row[implementation] = {
                **stats,
                "runs_ok": len(good),
                "errors": [run["error"] for run in runs if "error" in run],
                "file_bytes": files.get(file_key),
                "unet_gflops": gflops,
                "matmul_peak_fraction": gflops / peak if gflops and peak else None,
            }
        row["ratio"] = {
            field: _ratio(row["ours"][field], row["diffusers"][field])
            for field in ("median_step_s", "image_s", "load_s", "load_rss_bytes", "peak_rss_bytes")
        }
        rows.append(row)
    return rows


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _rss(stats: dict[str, Any]) -> str:
    """Load peak RSS in GB and as a multiple of the weight files' size."""
    rss, size = stats["load_rss_bytes"], stats["file_bytes"]
    if rss is None:
        return "—"
    return f"{rss / GB:.2f} ({rss / size:.2f}x)" if size else f"{rss / GB:.2f}"


def _inference_rss(stats: dict[str, Any]) -> str:
    """Peak RSS at the end in GB, with the growth over the load peak."""
    peak, load = stats["peak_rss_bytes"], stats["load_rss_bytes"]
    return "—" if peak is None else f"{peak / GB:.2f} (+{(peak - load) / GB:.2f})"


def _gb(size: float | None) -> str:
    return "—" if size is None else f"{size / GB:.2f}"


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.0f}%"


COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("model", lambda row: row["model"]),
    ("px", lambda row: str(row["size"])),
    ("dtype", lambda row: row["precision"]),
    ("s/step ours", lambda row: _num(row["ours"]["median_step_s"], 3)),
    ("s/step diffusers", lambda row: _num(row["diffusers"]["median_step_s"], 3)),
    ("step ratio", lambda row: _num(row["ratio"]["median_step_s"])),
    ("s/image ours", lambda row: _num(row["ours"]["image_s"])),
    ("s/image diffusers", lambda row: _num(row["diffusers"]["image_s"])),
    ("image ratio", lambda row: _num(row["ratio"]["image_s"])),
    ("load s ours", lambda row: _num(row["ours"]["load_s"])),
    ("load s diffusers", lambda row: _num(row["diffusers"]["load_s"])),
    ("load RSS GB ours (x file)", lambda row: _rss(row["ours"])),
    ("load RSS GB diffusers (x file)", lambda row: _rss(row["diffusers"])),
    ("peak RSS GB ours (+ over load)", lambda row: _inference_rss(row["ours"])),
    ("peak RSS GB diffusers (+ over load)", lambda row: _inference_rss(row["diffusers"])),
    ("UNet GFLOP/s ours", lambda row: _num(row["ours"]["unet_gflops"], 1)),
    ("UNet GFLOP/s diffusers", lambda row: _num(row["diffusers"]["unet_gflops"], 1)),
    ("% matmul peak ours", lambda row: _percent(row["ours"]["matmul_peak_fraction"])),
    ("% matmul peak diffusers", lambda row: _percent(row["diffusers"]["matmul_peak_fraction"])),
)
GPU_COLUMNS = tuple(
    (
        f"GPU peak GB {implementation}",
        lambda row, implementation=implementation: _gb(row[implementation]["gpu_peak_bytes"]),
    )
    for implementation in IMPLEMENTATIONS
)


def markdown(report: dict[str, Any]) -> str:
    """The table, the command and machine, what the columns mean, and any failures."""
    machine, settings = report["machine"], report["settings"]
    rows = report["summary"]
    columns = COLUMNS + (GPU_COLUMNS if settings["device"] == "cuda" else ())
    lines = [
        "| " + " | ".join(header for header, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows),
    ]
    matmul = ", ".join(
        f"{precision} {_num(result.get('gflops'), 0)}" for precision, result in report["matmul"].items()
    )
    notes = [
        "",
        f"`{report['command']}`",
        "",
        f"{machine['cpu']}, {settings['threads']} threads, device {settings['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + f"; torch {machine['torch']}, diffusers {machine['diffusers']}, transformers {machine['transformers']}. "
        f"DDIM {settings['steps']} steps, eta 0, guidance {GUIDANCE_SCALE} (UNet batch 2), "
        f"medians of {settings['reps']} runs per side, each in a fresh process after "
        f"{settings['warmup_calls']} warm-up call(s). Matmul peak ({settings['matmul_size']}^2, GFLOP/s): {matmul}.",
        "",
        "s/step: median step time without the first step (UNet + sampler). s/image: one whole call (text, VAE "
        "encode, sampling, VAE decode). ratio: ours / diffusers (below 1: ours is faster). load: weights file "
        "to ready pipeline (ours: the original .ckpt; diffusers: its safetensors folder), after imports. RSS: "
        "peak resident memory after loading (x: over the weight files' size) and at the end (+: growth during "
        "inference). UNet GFLOP/s: FLOPs of one guided UNet call / s/step.",
        "",
        *(f"- {difference}" for difference in report["differences"]),
    ]
    if not machine["diffusers_has_accelerate"]:
        notes.append(
            "- accelerate is not installed: diffusers' from_pretrained falls back to low_cpu_mem_usage=False "
            "(diffusers recommends accelerate for faster loading with less memory)."
        )
    failures = [
        f"- {row['model']} {row['size']}px {row['precision']} {implementation}: {error}"
        for row in rows
        for implementation in IMPLEMENTATIONS
        for error in row[implementation]["errors"]
    ]
    if failures:
        notes += ["", "Failed runs:", *failures]
    return "\n".join(lines + notes) + "\n"


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``benchmark-N.json`` and ``benchmark-N.md`` with the first N that names neither file yet."""
    out.mkdir(parents=True, exist_ok=True)
    number = 1
    while (out / f"benchmark-{number:03d}.json").exists() or (out / f"benchmark-{number:03d}.md").exists():
        number += 1
    paths = out / f"benchmark-{number:03d}.json", out / f"benchmark-{number:03d}.md"
    with open(paths[0], "x") as file:
        json.dump(report, file, indent=1, default=str)  # paths as strings
    with open(paths[1], "x") as file:
        file.write(markdown(report))
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time our inpainting pipeline against diffusers' on the same random weights."
    )
    parser.add_argument(
        "--models", default="sd15,sd2", help="sd15, sd2 and/or paths of inpainting YAML configs"
    )
    parser.add_argument("--sizes", default="256,512", help="image sides in pixels, multiples of 64")
    parser.add_argument("--precision", default="fp32,bf16", help=f"some of {','.join(DTYPES)}")
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
    parser.add_argument("--matmul-size", type=int, default=4096, help="side of the matmul peak measurement")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to one worker process")
    parser.add_argument("--workdir", type=Path, default=Path(".benchmark"), help="cache of generated weights")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder of the JSON and table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    try:
        settings = check_settings(args)
    except BenchmarkError as error:
        parser.error(str(error))
    raw = measure(settings)
    report = {
        "command": shlex.join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": asdict(settings),
        "machine": machine_info(settings),
        "differences": DIFFERENCES,
        **raw,
        "summary": summarize(raw, settings),
    }
    json_path, md_path = write_report(report, settings.out)
    print(markdown(report))
    log(f"wrote {json_path} and {md_path}")
    return 1 if any("error" in run for run in raw["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
