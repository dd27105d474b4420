"""Independent reference implementations, fed the same random weights in the original checkpoint layout.

- UNet and VAE: diffusers' models, converted by diffusers' own original-checkpoint code
  (``diffusers.loaders.single_file_utils``) and loaded strictly (``scripts/benchmarking/diffusers_files.py``);
- SD1 text encoder: transformers' ``CLIPTextModel``; SD2: open_clip's text tower run the way the original
  ``FrozenOpenCLIPEmbedder`` runs it (penultimate block, then ``ln_final``).
"""

from __future__ import annotations

from typing import Any

from open_clip.model import _build_text_tower
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_inpaint.models.clip import TextEncoderParams
from scripts.benchmarking.diffusers_files import ORIGINAL_DDIM, diffusers_unet, diffusers_vae, original_yaml

# The UNet and VAE oracles (diffusers' conversion) live with the benchmark, which writes diffusers' side with them.
__all__ = [
    "ORIGINAL_DDIM",
    "diffusers_unet",
    "diffusers_vae",
    "openclip_context",
    "openclip_tower",
    "original_yaml",
    "tiny_text_cfg",
    "transformers_clip",
]


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
