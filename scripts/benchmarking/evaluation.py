"""``--eval``: the evaluation protocol's speed on the benchmark's random full-size checkpoints.

Prediction: pairs per second of ``ldm-inpaint eval predict`` (the protocol's settings, ``--steps`` DDIM steps)
with one pair per UNet call against :data:`BATCH` pairs per call
(:func:`ldm_inpaint.evaluation.predict.throughput`); scoring: images per second of ``ldm-inpaint eval
score`` (FID features, LPIPS, SSIM, PSNR, files read; :func:`ldm_inpaint.evaluation.score.scoring_throughput`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .jobs import log
from .settings import Settings

BATCH = 4  # pairs per UNet call against 1
PAIRS = 4  # timed pairs per measurement, after one untimed batch


def measure_evaluation(files: dict[str, dict[str, Any]], settings: Settings) -> dict[str, Any]:
    from ldm_inpaint.evaluation.predict import PROTOCOL, throughput
    from ldm_inpaint.evaluation.score import scoring_throughput
    from ldm_inpaint.pipeline import InpaintPipeline

    torch.set_num_threads(settings.threads)
    options = replace(PROTOCOL, steps=settings.steps)
    prediction = []
    for name, prepared in files.items():
        pipe = InpaintPipeline.from_checkpoint(
            prepared["checkpoint"], prepared["config"], device=settings.device
        )
        for size in settings.sizes:
            for batch in (1, BATCH):
                rate = throughput(pipe, size, batch, pairs=PAIRS, options=options)
                log(f"[eval predict] {name} {size}px batch {batch}: {rate:.4f} pairs/s")
                prediction.append({"model": name, "size": size, "batch_size": batch, "pairs_per_s": rate})
        del pipe
    scoring = []
    for size in settings.sizes:
        rate = scoring_throughput(count=8, size=size, device=settings.device)
        log(f"[eval score] {size}px: {rate:.3f} images/s")
        scoring.append({"size": size, "images_per_s": rate})
    return {"prediction": prediction, "scoring": scoring}


def evaluation_table(report: dict[str, Any]) -> str:
    """Prediction pairs/s by batch size (and the speed-up of batching), then scoring images/s."""
    settings, measured = report["settings"], report["evaluation"]
    lines = [
        "| model | size | pairs/s, 1 per call | pairs/s, 4 per call | batching speed-up |",
        "|---|---|---|---|---|",
    ]
    rows = measured["prediction"]
    for single, batched in zip(rows[::2], rows[1::2], strict=True):
        lines.append(
            f"| {single['model']} | {single['size']} | {single['pairs_per_s']:.4f} | {batched['pairs_per_s']:.4f} | "
            f"{batched['pairs_per_s'] / single['pairs_per_s']:.2f}x |"
        )
    lines += ["", "| size | scoring images/s |", "|---|---|"]
    lines += [f"| {row['size']} | {row['images_per_s']:.3f} |" for row in measured["scoring"]]
    machine = report["machine"]
    lines += [
        "",
        f"`{report['command']}`",
        "",
        f"{machine['cpu']}, {settings['threads']} threads, device {settings['device']}; torch {machine['torch']}. "
        f"Prediction: the protocol's settings (guidance 6, paste-back) with DDIM {settings['steps']} steps, "
        f"{PAIRS} timed pairs after one untimed batch, VAE encode and decode included, random weights of the "
        "real shapes. Scoring: 8 random image pairs per size, randomly initialised FID Inception and LPIPS VGG of "
        "the real shapes (speed does not depend on the weights), PNG reading included, FID's matrix square "
        "root (once per report) not included.",
    ]
    return "\n".join(lines)
