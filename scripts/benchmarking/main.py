"""The benchmark from start to end: files, workers in order, report; and the entry point of worker processes."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from .diffusers_files import file_sizes, prepare_worker
from .evaluation import measure_evaluation
from .jobs import MatmulJob, PrepareJob, RunJob, log, spawn
from .load_memory import measure_load_memory
from .report import markdown, summarize, write_report
from .runs import matmul_worker, run_worker
from .serving import measure_serving
from .settings import (
    DIFFERENCES,
    GB,
    IMPLEMENTATIONS,
    BenchmarkError,
    Settings,
    build_parser,
    cases,
    check_settings,
)

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
    """The model's files and their sizes, written by a worker process if missing (``--load-memory``: the
    ``.ckpt`` alone)."""
    job = replace(
        cache_job(name, config_path, settings.workdir, settings.seed),
        with_diffusers=not (settings.load_memory or settings.evaluation or settings.serving),
    )
    if job.done():
        return {**asdict(job), **file_sizes(job)}
    log(f"[prepare] {name}: writing the random checkpoint (and any diffusers folder) to {settings.workdir}")
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


def measure(settings: Settings) -> dict[str, Any]:
    """Every worker of the benchmark, in order; the raw results."""
    settings.workdir.mkdir(parents=True, exist_ok=True)
    files = {name: prepare(name, config_path, settings) for name, config_path in settings.models.items()}
    if settings.evaluation:
        return {
            "files": files,
            "load_memory": [],
            "runs": [],
            "evaluation": measure_evaluation(files, settings),
        }
    if settings.serving:
        return {"files": files, "load_memory": [], "runs": [], "serving": measure_serving(files, settings)}
    load_memory = [
        load_memory_row(files[name], name, precision, settings)
        for name, precision in itertools.product(settings.models, settings.precisions)
    ]
    if settings.load_memory:
        return {"files": files, "load_memory": load_memory, "runs": []}
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
    return {
        "files": files,
        "load_memory": load_memory,
        "matmul": matmul,
        "unet_flops_per_step": flops,
        "runs": runs,
    }


def load_memory_row(files: dict[str, Any], name: str, precision: str, settings: Settings) -> dict[str, Any]:
    """One load-memory measurement (:mod:`.load_memory`), logged."""
    row = {"model": name, "precision": precision}
    row |= measure_load_memory(files, precision, settings.device, settings.threads, settings.timeout)
    status = row.get("error") or f"peak {row['peak_rss_bytes'] / GB:.2f} GB, {row['ratio']:.2f}x the file"
    log(f"[load memory] {name} {precision}: {status}")
    return row


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
        "summary": []
        if settings.load_memory or settings.evaluation or settings.serving
        else summarize(raw, settings),
    }
    json_path, md_path = write_report(report, settings.out)
    print(markdown(report))
    log(f"wrote {json_path} and {md_path}")
    return 1 if any("error" in row for row in raw["runs"] + raw["load_memory"]) else 0
