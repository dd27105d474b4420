"""The three networks of a Stable Diffusion checkpoint under the original top-level names.

``model.diffusion_model`` (UNet), ``first_stage_model`` (VAE) and ``cond_stage_model`` (text encoder) are the
prefixes of the original state dict, so a file loads into :class:`LatentDiffusion` with ``load_state_dict``
as it is (SD1's text encoder keys go through the one table in ``models.clip`` first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ldm_inpaint.models.autoencoder import AutoencoderKL
from ldm_inpaint.models.clip import TextTransformer
from ldm_inpaint.models.unet import UNetModel
from ldm_inpaint.tokenizer import tokenize

if TYPE_CHECKING:
    from ldm_inpaint.config import ModelConfig
    from ldm_inpaint.models.clip import TextEncoderParams


class TextConditioner(nn.Module):
    """``cond_stage_model``: prompts -> token ids -> CLIP context (b, 77, width)."""

    def __init__(self, params: TextEncoderParams) -> None:
        super().__init__()
        self.params = params
        self.model = TextTransformer(params)

    def forward(self, prompts: list[str]) -> Tensor:
        tokens = tokenize(prompts, pad_token=self.params.pad_token, context_length=self.params.context_length)
        return self.model(tokens.ids.to(self.model.token_embedding.weight.device))


class LatentDiffusion(nn.Module):
    """Container of UNet, VAE and text encoder; the diffusion math lives in ``schedule``/``samplers``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.diffusion_model = UNetModel(config.unet)
        self.first_stage_model = AutoencoderKL(config.autoencoder)
        self.cond_stage_model = TextConditioner(config.text_encoder)

    @property
    def device(self) -> torch.device:
        return self.model.diffusion_model.time_embed[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.diffusion_model.time_embed[0].weight.dtype
