"""A cheap look at a latent while it is sampled: a fixed linear map from the 4 latent channels to RGB, no VAE.

SD 1.x and SD 2.x share one latent space (the KL-f8 autoencoder of Rombach et al. 2022), so one map serves
both. The factors are the least-squares fit of decoded RGB on latent channels that ComfyUI publishes for
SD 1.5 latents (``latent_rgb_factors``), a fact about the released VAE; the image is 1/8 of the output size.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (4 latent channels) -> (R, G, B), applied to the latent as the sampler sees it (times the scale factor).
SD_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def latent_to_rgb(latent: Tensor) -> Tensor:
    """A (b, 4, h, w) latent as (b, h, w, 3) uint8 RGB on the CPU: the linear map, then [-1, 1] -> [0, 255]."""
    factors = torch.tensor(SD_LATENT_RGB, dtype=torch.float32)
    # (b, 4, h, w) -> (b, h, w, 4) -> (b, h, w, 3)
    rgb = latent.detach().float().cpu().permute(0, 2, 3, 1) @ factors
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
