"""Independent reference implementations, fed the same random weights in the original checkpoint layout.

- UNet and VAE: diffusers' models, converted by diffusers' own original-checkpoint code
  (``diffusers.loaders.single_file_utils``) and loaded strictly;
- SD1 text encoder: transformers' ``CLIPTextModel``; SD2: open_clip's text tower run the way the original
  ``FrozenOpenCLIPEmbedder`` runs it (penultimate block, then ``ln_final``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from omegaconf import OmegaConf
from open_clip.model import _build_text_tower
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_inpaint.models.clip import TextEncoderParams

# The original DDIM in diffusers' terms (REFERENCE.md); the two agree only for step counts that divide 1000.
ORIGINAL_DDIM = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def original_yaml(path: Path, in_channels: int | None = None) -> dict[str, Any]:
    """A config file as the original code reads it (optionally with another UNet input width)."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if in_channels is not None:
        raw["model"]["params"]["unet_config"]["params"]["in_channels"] = in_channels
    return raw


def diffusers_unet(raw_config: dict[str, Any], checkpoint: dict[str, Tensor]) -> UNet2DConditionModel:
    """diffusers' UNet built and converted from the original config and checkpoint, loaded strictly."""
    config = create_unet_diffusers_config_from_ldm(raw_config, checkpoint)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def diffusers_vae(raw_config: dict[str, Any], checkpoint: dict[str, Tensor]) -> AutoencoderKL:
    """diffusers' AutoencoderKL built and converted from the original config and checkpoint, loaded strictly."""
    config = create_vae_diffusers_config_from_ldm(raw_config, checkpoint)
    model = AutoencoderKL(**config)
    model.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return model.eval()


def transformers_clip(params: TextEncoderParams, openai_weights: dict[str, Tensor]) -> CLIPTextModel:
    """transformers' CLIPTextModel (the SD1 original) with weights in its own (the SD1 checkpoint's) names,
    relative to ``text_model.``."""
    config = CLIPTextConfig(
        vocab_size=params.vocab_size,
        hidden_size=params.width,
        intermediate_size=4 * params.width,
        num_hidden_layers=params.layers,
        num_attention_heads=params.heads,
        max_position_embeddings=params.context_length,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPTextModel._from_config(config, attn_implementation="eager").eval()
    # transformers < 5.6 nests the modules under ``text_model.`` (the checkpoint's layout), later ones do not.
    prefix = "text_model." if hasattr(model, "text_model") else ""
    model.load_state_dict({prefix + key: value for key, value in openai_weights.items()})
    return model


def openclip_tower(params: TextEncoderParams, text_cfg: dict[str, Any], weights: dict[str, Tensor]) -> Any:
    """open_clip's text tower with weights in its own (the SD2 checkpoint's) names, relative to ``model.``."""
    tower = _build_text_tower(params.projection_dim, text_cfg).eval()
    # logit_scale belongs to open_clip's CLIP model, not to its text tower.
    tower.load_state_dict({key: value for key, value in weights.items() if key != "logit_scale"})
    return tower


def openclip_context(tower: Any, tokens: Tensor, layer: str) -> Tensor:
    """FrozenOpenCLIPEmbedder.encode_with_transformer: embeddings, the resblocks up to ``layer`` with the
    causal mask, ``ln_final``."""
    blocks = tower.transformer.resblocks
    used = len(blocks) - (1 if layer == "penultimate" else 0)
    x = tower.token_embedding(tokens) + tower.positional_embedding
    if not tower.transformer.batch_first:
        x = x.permute(1, 0, 2)  # (b, n, d) -> (n, b, d)
    for block in blocks[:used]:
        x = block(x, attn_mask=tower.attn_mask)
    if not tower.transformer.batch_first:
        x = x.permute(1, 0, 2)  # (n, b, d) -> (b, n, d)
    return tower.ln_final(x)


def tiny_text_cfg(params: TextEncoderParams) -> dict[str, int]:
    return {"width": params.width, "layers": params.layers, "heads": params.heads}
