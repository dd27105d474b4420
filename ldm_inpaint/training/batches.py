"""Training batches as the original ``AddMask`` (pesser ``ldm/data/laion.py``) builds them.

Per sample: a crop of its image; one mask, the whole image with probability ``p_full_mask``, else from the
chosen generator (or the mask file); binarized at 0.5; the masked image ``image * (mask < 0.5)``; the caption,
replaced by "" with probability ``p_drop_text``; a timestep uniform over the training steps and the noise.

Every draw of sample ``index`` of the global batch of optimizer step ``step`` comes from one generator keyed by
``(seed, step, index)`` (:func:`~ldm_inpaint.mask_generators.keyed_rng`), so a sample is the same whichever process draws it, and a resumed
run draws what an uninterrupted one would. Which image sample ``index`` of ``step`` uses is also a function of
those numbers: the ``step * batch_size + index``-th of a sequence of shuffled passes over the folder.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ldm_inpaint.conditioning import binarize_mask
from ldm_inpaint.mask_generators import draw_mask, keyed_rng
from ldm_inpaint.training.data import ImageFolder

SHUFFLE_STREAM = 0x5EED  # keys the shuffle of each pass apart from the per-sample draws


@functools.lru_cache(maxsize=2)
def _shuffle(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order of pass ``epoch`` over ``count`` images (drawn once per pass, not once per sample)."""
    return np.random.default_rng([seed, SHUFFLE_STREAM, epoch]).permutation(count)


def image_index(seed: int, position: int, count: int) -> int:
    """The image at ``position`` of the endless sequence of shuffled passes over ``count`` images."""
    epoch, offset = divmod(position, count)
    return int(_shuffle(seed, epoch, count)[offset])


@dataclass(frozen=True)
class Batch:
    """A (micro-)batch: images (b, 3, R, R) in [-1, 1], binary masks (b, 1, R, R) with 1 = repaint (the
    masked image is made from both where it is encoded, :func:`~ldm_inpaint.conditioning.inpainting_concat`),
    captions, timesteps (b,) and noise (b, 4, R/f, R/f)."""

    image: Tensor
    mask: Tensor
    captions: list[str]
    timesteps: Tensor
    noise: Tensor


@dataclass(frozen=True)
class BatchRecipe:
    """How samples are drawn (the run's settings that matter here)."""

    seed: int
    batch_size: int
    masks: str
    p_full_mask: float
    p_drop_text: float
    timesteps: int
    latent_shape: tuple[int, int, int]


def draw_sample(
    data: ImageFolder, recipe: BatchRecipe, step: int, index: int
) -> tuple[Tensor, Tensor, str, int, Tensor]:
    """Sample ``index`` of step ``step``: (image, binary mask, caption, timestep, noise). The order of the
    draws is fixed: crop, full-mask coin, mask, caption coin, timestep, noise."""
    rng = keyed_rng(recipe.seed, step, index)
    position = step * recipe.batch_size + index
    image, mask_file, caption = data.load(image_index(recipe.seed, position, len(data)), rng)
    size = image.shape[-2:]
    if rng.random() < recipe.p_full_mask:
        mask = torch.ones(1, *size)
    elif recipe.masks == "files":
        mask = mask_file
    else:
        mask = torch.from_numpy(draw_mask(recipe.masks, size[0], size[1], rng))[None]
    if rng.random() < recipe.p_drop_text:
        caption = ""
    timestep = int(rng.integers(0, recipe.timesteps))
    noise_generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63)))
    noise = torch.randn(recipe.latent_shape, generator=noise_generator)
    return image, binarize_mask(mask), caption, timestep, noise


def make_batch(data: ImageFolder, recipe: BatchRecipe, step: int, indices: Sequence[int]) -> Batch:
    """The samples ``indices`` of the global batch of ``step``, stacked."""
    images, masks, captions, timesteps, noises = zip(
        *(draw_sample(data, recipe, step, i) for i in indices), strict=True
    )
    return Batch(
        image=torch.stack(images),
        mask=torch.stack(masks),
        captions=list(captions),
        timesteps=torch.tensor(timesteps, dtype=torch.long),
        noise=torch.stack(noises),
    )
