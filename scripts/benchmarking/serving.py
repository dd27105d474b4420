"""``--serve``: what ``ldm-inpaint serve`` adds to a request, on the benchmark's random full-size checkpoints.

One pipeline, loaded once, called two ways with the same options (DDIM, ``--steps``, guidance 7.5, a fixed seed)
on the same PNG files: directly (``pipe(image, mask, options)`` on the decoded files) and through the server on
127.0.0.1 (a synchronous Cog ``POST /predictions`` with the files as base64: JSON, base64 and PNG decoding, the
queue, the worker thread, PNG encoding of the answer, HTTP). :data:`REPS` timed calls each after one untimed call
of each, alternating which goes first; the overhead is the ratio of the medians, minus one. Then the time from
sending ``POST /v1/jobs`` to its first server-sent ``progress`` event (the job has started) and to the first
one that reports a finished step.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .jobs import log
from .settings import Settings

REPS = 3


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _inputs(size: int, seed: int) -> tuple[bytes, bytes]:
    """A smooth random image and a centred square mask, as PNG files."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    image = np.array(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return _png(image), _png(mask)


def _first_events(http, image: str, mask: str, options: dict[str, Any]) -> tuple[float, float]:
    """Seconds from sending a job to its first ``progress`` event, and to the first after a finished step."""
    start = time.perf_counter()
    job = http.post("/v1/jobs", json={"image": image, "mask": mask, "options": options}).json()["id"]
    started = stepped = None
    with http.stream("GET", f"/v1/jobs/{job}/events") as events:
        for line in events.iter_lines():
            if line.startswith("data: ") and started is not None and json.loads(line[6:]).get("step", 0) >= 1:
                stepped = time.perf_counter() - start
                break
            if line == "event: progress" and started is None:
                started = time.perf_counter() - start
    http.delete(f"/v1/jobs/{job}")
    return started, stepped


def _measure_size(pipe, http, name: str, size: int, settings: Settings) -> dict[str, Any]:
    from ldm_inpaint.image_io import decode_image
    from ldm_inpaint.options import InpaintOptions

    options = InpaintOptions(prompt="a red bench", steps=settings.steps, seed=settings.seed)
    image_png, mask_png = _inputs(size, settings.seed)
    image, mask = (base64.b64encode(png).decode() for png in (image_png, mask_png))
    cog = {"input": {"prompt": options.prompt, "image": image, "mask": mask}}
    cog["input"] |= {"num_inference_steps": options.steps, "seed": options.seed}

    def direct() -> float:
        start = time.perf_counter()
        pipe(decode_image(image_png, "image"), decode_image(mask_png, "mask"), options)
        return time.perf_counter() - start

    def served() -> float:
        start = time.perf_counter()
        answer = http.post("/predictions", json=cog).json()
        if answer.get("status") != "succeeded":
            raise RuntimeError(f"the server's answer: {answer}")
        return time.perf_counter() - start

    ways = {"direct": direct, "server": served}
    times: dict[str, list[float]] = {"direct": [], "server": []}
    direct(), served()
    for rep in range(REPS):
        for way in ("direct", "server") if rep % 2 == 0 else ("server", "direct"):
            times[way].append(ways[way]())
    started, stepped = _first_events(http, image, mask, {"prompt": options.prompt, "steps": options.steps})
    row = {"model": name, "size": size, "steps": options.steps, **times}
    row |= {"first_event_s": started, "first_step_event_s": stepped}
    row["overhead"] = statistics.median(times["server"]) / statistics.median(times["direct"]) - 1
    log(f"[serve] {name} {size}px: overhead {row['overhead']:+.2%}, first event {started:.3f} s")
    return row


def measure_serving(files: dict[str, dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    import httpx

    from ldm_inpaint.cli import checkpoint_metadata
    from ldm_inpaint.pipeline import InpaintPipeline
    from ldm_inpaint.serving.app import ServerSettings, create_app, in_background
    from ldm_inpaint.serving.jobs import Model

    torch.set_num_threads(settings.threads)
    rows = []
    for name, prepared in files.items():
        pipe = InpaintPipeline.from_checkpoint(
            prepared["checkpoint"], prepared["config"], device=settings.device
        )
        model = Model(
            pipe,
            checkpoint_metadata(Path(prepared["checkpoint"]), pipe, torch.device(settings.device)),
            "fp32",
        )
        app = create_app(lambda model=model: model, ServerSettings())
        with in_background(app) as url, httpx.Client(base_url=url, timeout=settings.timeout) as http:
            while http.get("/readyz").status_code != 200:
                time.sleep(0.05)
            rows += [_measure_size(pipe, http, name, size, settings) for size in settings.sizes]
    return rows


def serving_table(report: dict[str, Any]) -> str:
    settings, machine = report["settings"], report["machine"]
    lines = [
        "| model | size | steps | direct s (median) | server s (median) | overhead | first progress event s | "
        "first step event s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["serving"]:
        lines.append(
            f"| {row['model']} | {row['size']} | {row['steps']} | {statistics.median(row['direct']):.3f} | "
            f"{statistics.median(row['server']):.3f} | {row['overhead']:+.2%} | {row['first_event_s']:.3f} | "
            f"{row['first_step_event_s']:.3f} |"
        )
    lines += [
        "",
        f"`{report['command']}`",
        "",
        f"{machine['cpu']}, {settings['threads']} threads, device {settings['device']}; torch {machine['torch']}. "
        f"Direct: the pipeline called on the decoded PNG files; server: a synchronous Cog request to the same "
        f"pipeline on 127.0.0.1 (base64, JSON, queue, worker thread, PNG encoding, HTTP); {REPS} timed calls each "
        "after one untimed call of each, alternating; DDIM, guidance 7.5, random weights of the real shapes.",
    ]
    return "\n".join(lines)
