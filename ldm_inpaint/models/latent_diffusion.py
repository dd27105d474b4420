"""The three networks of a Stable Diffusion checkpoint under the original top-level names.

``model.diffusion_model`` (UNet), ``first_stage_model`` (VAE) and ``cond_stage_model`` (text encoder) are the
prefixes of the original state dict, so a file loads into :class:`LatentDiffusion` with ``load_state_dict``
as it is (SD1's text encoder keys go through the one table in ``models.clip`` first).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ldm_inpaint.models.autoencoder import AutoencoderKL
from ldm_inpaint.models.clip import TextTransformer
from ldm_inpaint.models.unet import UNetModel
from ldm_inpaint.tokenizer import tokenize, tokenize_chunks

if TYPE_CHECKING:
    from ldm_inpaint.config import ModelConfig
    from ldm_inpaint.models.clip import TextEncoderParams


class TextConditioner(nn.Module):
    """``cond_stage_model``: prompts -> token ids -> CLIP context (b, 77, width)."""

    def __init__(self, params: TextEncoderParams) -> None:
        super().__init__()
        self.params = params
        self.model = TextTransformer(params)

    def forward(self, prompts: list[str], chunks: int | None = None) -> Tensor:
        """Contexts (b, 77, width), the original truncation (with a warning when text is cut); or, with
        ``chunks``, long-prompt contexts (b, chunks * 77, width): each 75-token window encoded on its own,
        wrapped in start/end tokens, and the windows concatenated along the sequence."""
        device = self.model.token_embedding.weight.device
        length = self.params.context_length
        if chunks is None:
            tokens = tokenize(prompts, pad_token=self.params.pad_token, context_length=length)
            for prompt, cut in zip(prompts, tokens.truncated, strict=True):
                if cut:
                    warnings.warn(
                        f"prompt cut to {length} tokens, {cut} token(s) dropped (use long prompts to keep them): "
                        f"{prompt[:60]!r}...",
                        stacklevel=2,
                    )
            return self.model(tokens.ids.to(device))
        ids = tokenize_chunks(prompts, pad_token=self.params.pad_token, chunks=chunks, context_length=length)
        # (b, chunks, 77) -> (b * chunks, 77) -> (b * chunks, 77, width) -> (b, chunks * 77, width)
        context = self.model(ids.flatten(0, 1).to(device))
        return context.reshape(len(prompts), chunks * length, -1)


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
