"""Random LoRA files for the tests: every module's A and B drawn (both nonzero), in kohya's format."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm_inpaint.lora import names
from ldm_inpaint.models.latent_diffusion import LatentDiffusion


def random_module(
    weight_shape: tuple[int, ...], rank: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A (r, in[, kh, kw]) ~ N(0, 1/fan_in) and B (out, r[, 1, 1]) ~ N(0, 1/r): B A x is of the order of x."""
    out, *rest = weight_shape
    down = torch.randn(rank, *rest, generator=generator) / math.sqrt(math.prod(rest))
    up = torch.randn(out, rank, *[1] * (len(rest) - 1), generator=generator) / math.sqrt(rank)
    return down, up


def random_lora(
    shapes: dict[str, tuple[int, ...]], rank: int = 4, alpha: float = 2.0, seed: int = 0
) -> dict[str, Tensor]:
    """kohya entries (``NAME.lora_down.weight``, ``NAME.lora_up.weight``, ``NAME.alpha``) for the modules
    ``shapes`` names (file name -> weight shape)."""
    generator = torch.Generator().manual_seed(seed)
    entries = {}
    for name, shape in shapes.items():
        down, up = random_module(shape, rank, generator)
        entries |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(alpha),
        }
    return entries


def unet_shapes(model: LatentDiffusion, style: str = "diffusers") -> dict[str, tuple[int, ...]]:
    """Every module of the UNet a LoRA can change, by its file name in ``style`` ("diffusers" or
    "compvis"), with its weight's shape."""
    unet = model.model.diffusion_model
    return {
        names.file_name(names.UNET_PREFIX, theirs if style == "diffusers" else ours): tuple(
            unet.get_submodule(ours).state_dict()["weight"].shape
        )
        for ours, theirs in names.unet_paths(unet).items()
    }


def text_shapes(model: LatentDiffusion, layers: int) -> dict[str, tuple[int, ...]]:
    """The q, k, v, out, fc1 and fc2 modules of the first ``layers`` text-encoder layers, with their shapes."""
    width = model.config.text_encoder.width
    shapes = {}
    for layer in range(layers):
        prefix = f"{names.TEXT_PREFIX}text_model_encoder_layers_{layer}_"
        shapes |= {f"{prefix}self_attn_{p}_proj": (width, width) for p in ("q", "k", "v", "out")}
        shapes |= {f"{prefix}mlp_fc1": (4 * width, width), f"{prefix}mlp_fc2": (width, 4 * width)}
    return shapes
