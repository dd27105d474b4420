"""Inside a worker process: load one implementation and time one inpainting call; measure matmul peak."""

from __future__ import annotations

import importlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from ldm_inpaint.devices import PRECISIONS

from .jobs import MatmulJob, RunJob
from .settings import GUIDANCE_SCALE, IMPORTS, NEGATIVE_PROMPT, PROMPT


def rss_bytes(ru_maxrss: int) -> int:
    """``ru_maxrss`` in bytes (the kernel counts KiB on Linux, bytes on macOS)."""
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    return rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


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


def step_callback(watch: Stopwatch) -> Callable[[Any], None]:
    """Our pipeline's step callback (it gets a ``StepInfo``): a timestamp at the end of each step."""

    def on_step(step: Any) -> None:
        watch.step()

    return on_step


def load_ours(job: RunJob, watch: Stopwatch) -> Callable[[int], torch.Tensor]:
    """Our pipeline from the ``.ckpt``; returns ``run(steps) -> images``."""
    from ldm_inpaint.pipeline import InpaintPipeline
    from ldm_inpaint.runtime import keep_freed_memory

    keep_freed_memory(lean=job.lean_memory)  # as the ldm-inpaint command does at start-up

    pipe = InpaintPipeline.from_checkpoint(
        job.checkpoint, job.config, device=job.device, dtype=PRECISIONS[job.precision], compile=job.compile
    )
    watch.time_method(pipe, "tokenize", "text_s")
    watch.time_method(pipe, "encode_tokens", "text_s")
    watch.time_method(pipe, "encode_image", "vae_encode_s")
    watch.time_method(pipe, "decode", "vae_decode_s")
    image, mask = sample_inputs(job.size)
    x_T = start_latent(job.seed, job.size, PRECISIONS[job.precision])

    def run(steps: int) -> torch.Tensor:
        # Every call does the whole work, as diffusers' does: no contexts or latents memoized by an earlier one.
        pipe.clear_memo()
        return pipe(
            image,
            mask,
            prompt=PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            eta=0.0,
            seed=job.seed,
            start_latent=x_T,
            callback=step_callback(watch),
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
    dtype = PRECISIONS[job.precision]
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
        a, b = (
            torch.randn(job.size, job.size, device=job.device).to(PRECISIONS[precision]) for _ in range(2)
        )
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
