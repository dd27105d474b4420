"""Sample grids during training: a few fixed validation crops and masks, inpainted with the current weights
and (EMA on) the EMA weights, through the inference pipeline itself.

The validation samples are the first images of the folder (at most :data:`COUNT`), each cropped and masked by
draws keyed apart from every training draw, so every grid of a run shows the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ldm_inpaint import image_io
from ldm_inpaint.ablation.draw import draw_grid
from ldm_inpaint.conditioning import binarize_mask, mask_image
from ldm_inpaint.mask_generators import draw_mask
from ldm_inpaint.options import InpaintOptions
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.training.data import ImageFolder
from ldm_inpaint.training.ema import Ema

COUNT = 4
VALIDATION_STREAM = 0x7A11
SAMPLER_STEPS = 20


def validation_set(data: ImageFolder, seed: int, masks: str) -> list[tuple[Tensor, Tensor, str]]:
    """(image (1, 3, R, R), binary mask (1, 1, R, R), caption) of the first images of the folder."""
    samples = []
    for index in range(min(COUNT, len(data))):
        rng = np.random.default_rng([seed, VALIDATION_STREAM, index])
        image, mask, caption = data.load(index, rng)
        if masks != "files":
            mask = torch.from_numpy(draw_mask(masks, image.shape[-2], image.shape[-1], rng))[None]
        samples.append((image[None], binarize_mask(mask)[None], caption))
    return samples


def write_grid(
    path: Path,
    pipe: InpaintPipeline,
    samples: list[tuple[Tensor, Tensor, str]],
    ema: Ema | None,
    seed: int,
    step: int,
) -> None:
    """One row per validation sample: the masked input, the current weights' result, the EMA weights' one."""
    columns = ["masked input", "current"] + (["EMA"] if ema is not None else [])
    rows = [
        [(image_io.tensor_to_pil(mask_image(image, mask))[0], (caption[:40], ""), "")]
        for image, mask, caption in samples
    ]
    for swapped in [False, True] if ema is not None else [False]:
        if swapped:
            ema.swap()
        try:
            pipe.clear_memo()
            for row, (image, mask, caption) in zip(rows, samples, strict=True):
                options = InpaintOptions(prompt=caption, sampler="ddim", steps=SAMPLER_STEPS, seed=seed)
                with torch.no_grad():
                    result = pipe(image, mask, options)
                row.append((result.to_pil()[0], ("EMA" if swapped else "current", ""), ""))
        finally:
            if swapped:
                ema.swap()
    side = samples[0][0].shape[-1]
    grid = draw_grid(
        f"step {step}",
        ("sample", [str(i) for i in range(len(rows))]),
        ("weights", columns),
        rows,
        (side, side),
    )
    path.parent.mkdir(exist_ok=True)
    image_io.write_png(grid, path, {"step": str(step)})
