"""Sample grids during training, ``RUN/samples/step-NNNNNNN.png``: a few fixed validation crops and masks,
inpainted with the current and (EMA on) the EMA weights through the inference pipeline itself; or, with
``--stage autoencoder``, the crops and their reconstructions.

The validation samples are the first images of the folder (at most :data:`COUNT`), each cropped and masked by
draws keyed apart from every training draw, so every grid of a run shows the same inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm_inpaint import image_io
from ldm_inpaint.ablation.draw import draw_grid
from ldm_inpaint.conditioning import binarize_mask, mask_image
from ldm_inpaint.mask_generators import draw_mask
from ldm_inpaint.models.autoencoder import AutoencoderKL
from ldm_inpaint.options import InpaintOptions
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.training.data import ImageFolder
from ldm_inpaint.training.ema import Ema

if TYPE_CHECKING:
    from ldm_inpaint.training.loop import Trainer

COUNT = 4
VALIDATION_STREAM = 0x7A11
SAMPLER_STEPS = 20
Sample = tuple[Tensor, Tensor, str]  # image (1, 3, R, R), binary mask (1, 1, R, R), caption
Row = list[tuple[Image.Image, tuple[str, str], str]]


def validation_set(data: ImageFolder, seed: int, masks: str) -> list[Sample]:
    """The validation samples of the first images of the folder."""
    samples = []
    for index in range(min(COUNT, len(data))):
        rng = np.random.default_rng([seed, VALIDATION_STREAM, index])
        image, mask, caption = data.load(index, rng)
        if masks != "files":
            mask = torch.from_numpy(draw_mask(masks, image.shape[-2], image.shape[-1], rng))[None]
        samples.append((image[None], binarize_mask(mask)[None], caption))
    return samples


def write(trainer: Trainer, pipe: InpaintPipeline, samples: list[Sample], run: Path) -> None:
    """The grid of the trainer's current step."""
    path = run / "samples" / f"step-{trainer.step:07d}.png"
    if trainer.settings.stage == "autoencoder":
        columns, rows = ["image", "reconstruction"], reconstructions(trainer.model.first_stage_model, samples)
    else:
        columns = ["masked input", "current"] + (["EMA"] if trainer.ema is not None else [])
        rows = inpaintings(pipe, samples, trainer.ema, trainer.settings.seed)
    side = samples[0][0].shape[-1]
    labels = ("sample", [str(i) for i in range(len(rows))])
    grid = draw_grid(f"step {trainer.step}", labels, ("", columns), rows, (side, side))
    path.parent.mkdir(exist_ok=True)
    image_io.write_png(grid, path, {"step": str(trainer.step)})


@torch.no_grad()
def reconstructions(vae: AutoencoderKL, samples: list[Sample]) -> list[Row]:
    """Each image and its reconstruction from the posterior mean."""
    device = next(vae.parameters()).device
    rows = []
    for image, _, caption in samples:
        reconstruction, _ = vae(image.to(device))
        tiles = image_io.tensor_to_pil(torch.cat([image, reconstruction.float().cpu().clamp(-1, 1)]))
        rows.append([(tile, (caption[:40], ""), "") for tile in tiles])
    return rows


@torch.no_grad()
def inpaintings(pipe: InpaintPipeline, samples: list[Sample], ema: Ema | None, seed: int) -> list[Row]:
    """Each masked input, its inpainting with the current weights and with the EMA weights."""
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
                row.append(
                    (pipe(image, mask, options).to_pil()[0], ("EMA" if swapped else "current", ""), "")
                )
        finally:
            if swapped:
                ema.swap()
    return rows
