"""How well the demo model inpaints photos it never saw: mean absolute error inside LaMa-thick masks
(LaMa's evaluation rule: masks over half the image redrawn) on crops of the held-out photos, for the trained
model, the same model untrained, the mean color of the known pixels, and a blur fill. Called by
``scripts/train_demo.py``; writes ``demo-report.md``, ``demo-report.json`` and ``demo-report.png``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ldm_inpaint import image_io
from ldm_inpaint.ablation.draw import draw_grid
from ldm_inpaint.conditioning import mask_image
from ldm_inpaint.mask_generators import draw_eval_mask, keyed_rng
from ldm_inpaint.masks import blur
from ldm_inpaint.options import InpaintOptions
from ldm_inpaint.pipeline import InpaintPipeline

# The sampling of the report: DDIM 50 steps, eta 0 (the inpainting protocol's), no guidance (the demo's text
# encoder is random and its captions were empty).
OPTIONS = InpaintOptions(prompt="", sampler="ddim", steps=50, eta=0.0, guidance_scale=1.0)
BLUR_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
SHOWN = 6


def mean_fill(image: Tensor, mask: Tensor) -> Tensor:
    """Every masked pixel set to the mean color of the known pixels."""
    known = 1 - mask
    color = (image * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True)
    return image * known + color * mask


def blur_fill(image: Tensor, mask: Tensor) -> Tensor:
    """Normalized convolution at growing scales: each masked pixel takes the Gaussian-weighted mean of the known
    pixels at the smallest scale (of :data:`BLUR_SIGMAS`) whose window reaches any."""
    known = 1 - mask
    filled, todo = image * known, mask.clone()
    for sigma in BLUR_SIGMAS:
        weight = blur(known, sigma)
        # (1, 3, H, W) -> (3, 1, H, W): blur each channel as a one-channel image
        estimate = blur((image * known).transpose(0, 1), sigma).transpose(0, 1) / weight.clamp(min=1e-8)
        reached = todo * (weight > 1e-4)
        filled = filled * (1 - reached) + estimate * reached
        todo = todo * (1 - reached)
    return filled


def mae_inside(prediction: Tensor, truth: Tensor, mask: Tensor) -> float:
    """Mean absolute error over the masked pixels, in [0, 1] pixel units (images are in [-1, 1])."""
    error = (prediction.clamp(-1, 1) - truth).abs().mean(1, keepdim=True) / 2
    return (error * mask).sum().item() / mask.sum().item()


def write_report(trained: Path, untrained: Path, config: Path, held_out: Path, out: Path, seed: int) -> dict:
    models = {
        "trained": InpaintPipeline.from_checkpoint(trained),
        "untrained": InpaintPipeline.from_checkpoint(untrained, config),
    }
    errors: dict[str, list[float]] = {name: [] for name in (*models, "mean fill", "blur fill")}
    rows = []
    for index, path in enumerate(sorted(held_out.glob("*.png"))):
        image = image_io.image_to_tensor(image_io.load_image(path))
        mask = draw_eval_mask("lama-thick", image.shape[-2], image.shape[-1], keyed_rng(seed, 0, index))
        if mask is None:
            continue
        mask = torch.from_numpy(mask)[None, None]
        results = {
            name: pipe(image, mask, OPTIONS, seed=seed + index).images for name, pipe in models.items()
        }
        results["mean fill"], results["blur fill"] = mean_fill(image, mask), blur_fill(image, mask)
        for name, prediction in results.items():
            errors[name].append(mae_inside(prediction, image, mask))
        if len(rows) < SHOWN:
            tiles = [mask_image(image, mask), image, *results.values()]
            rows.append([(image_io.tensor_to_pil(t.clamp(-1, 1))[0], (path.stem, ""), "") for t in tiles])
    summary = {
        name: {"mae_inside_mask": float(np.mean(values)), "std": float(np.std(values)), "count": len(values)}
        for name, values in errors.items()
    }
    out.mkdir(exist_ok=True)
    columns = ["masked input", "original", *errors]
    grid = draw_grid(
        "demo model on held-out photos (LaMa-thick masks)",
        ("crop", [str(i) for i in range(len(rows))]),
        ("", columns),
        rows,
        (64, 64),
    )
    image_io.write_png(grid, out / "demo-report.png", {})
    (out / "demo-report.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = ["| fill | MAE inside the mask (0-1) | std | crops |", "|---|---|---|---|"]
    table += [
        f"| {name} | {s['mae_inside_mask']:.4f} | {s['std']:.4f} | {s['count']} |"
        for name, s in summary.items()
    ]
    (out / "demo-report.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return summary
