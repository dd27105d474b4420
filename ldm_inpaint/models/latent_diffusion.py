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

if TYPE_CHECKING:
    from ldm_inpaint.config import ModelConfig
    from ldm_inpaint.models.clip import TextEncoderParams


class TextConditioner(nn.Module):
    """``cond_stage_model``: token ids -> CLIP context (b, 77, width). Tokenization happens outside
    (``ldm_inpaint.tokenizer``), so a data loader can pre-tokenize."""

    def __init__(self, params: TextEncoderParams) -> None:
        super().__init__()
        self.params = params
        self.model = TextTransformer(params)

    def forward(self, ids: Tensor) -> Tensor:
        """Contexts (b, 77, width) of token ids (b, 77) (:func:`~ldm_inpaint.tokenizer.tokenize`); or, for
        long prompts, (b, chunks * 77, width) of ids (b, chunks, 77)
        (:func:`~ldm_inpaint.tokenizer.tokenize_chunks`): each window encoded on its own and the windows
        concatenated along the sequence."""
        if ids.ndim == 2:
            return self.model(ids)
        b, chunks, length = ids.shape
        # (b, chunks, 77) -> (b * chunks, 77) -> (b * chunks, 77, width) -> (b, chunks * 77, width)
        context = self.model(ids.flatten(0, 1))
        return context.reshape(b, chunks * length, -1)


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
