"""diffusers' side of the comparison: the same random weights as a diffusers folder.

The UNet and the VAE go through diffusers' own original-checkpoint conversion (``diffusers.loaders.
single_file_utils``), which the parity tests use as their oracles too; the text encoders are transformers'
``CLIPTextModel`` as diffusers runs them, and the tokenizer is built from open_clip's bundled BPE. diffusers
and transformers are test extras, never runtime dependencies of ``ldm_inpaint``: they are imported inside
the functions that need them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .jobs import PrepareJob

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
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if in_channels is not None:
        raw["model"]["params"]["unet_config"]["params"]["in_channels"] = in_channels
    return raw


def diffusers_unet(raw_config: dict[str, Any], checkpoint: dict[str, Tensor]) -> Any:
    """diffusers' UNet built and converted from the original config and checkpoint, loaded strictly."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    config = create_unet_diffusers_config_from_ldm(raw_config, checkpoint)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def diffusers_vae(raw_config: dict[str, Any], checkpoint: dict[str, Tensor]) -> Any:
    """diffusers' AutoencoderKL built and converted from the original config and checkpoint, loaded strictly."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    config = create_vae_diffusers_config_from_ldm(raw_config, checkpoint)
    model = AutoencoderKL(**config)
    model.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, config), strict=True)
    return model.eval()


def clip_tokenizer(pad_token: int) -> Any:
    """transformers' ``CLIPTokenizer`` with open_clip's bundled BPE (the same 49,408 tokens and merges as the
    tokenizer files of the SD repos, which are not reachable offline), padding with token id ``pad_token``
    (SD1: end-of-text; SD2: "!", id 0, as diffusers' SD2 tokenizer declares)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    pad = {index: token for token, index in vocab.items()}[pad_token]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=77)


def clip_text_model(params: Any, checkpoint: dict[str, torch.Tensor]) -> Any:
    """transformers' ``CLIPTextModel`` as diffusers runs SD's text encoders (SD2: OpenCLIP's blocks up to the
    penultimate, then the final norm), with the checkpoint's weights converted by diffusers' functions.

    Every parameter is loaded; left out on purpose: ``position_ids`` (implied by position), OpenCLIP's
    ``text_projection`` and its last block (unused by ``layer: penultimate``)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    layers = params.layers - (1 if params.layer == "penultimate" else 0)
    config = CLIPTextConfig(
        vocab_size=params.vocab_size,
        hidden_size=params.width,
        intermediate_size=4 * params.width,
        num_hidden_layers=layers,
        num_attention_heads=params.heads,
        max_position_embeddings=params.context_length,
        hidden_act=params.activation,
        layer_norm_eps=1e-5,
        projection_dim=params.projection_dim or params.width,
    )
    model = CLIPTextModel(config).eval()
    if params.layout == "openai":
        weights = convert_ldm_clip_checkpoint(checkpoint)
    else:
        weights = convert_open_clip_checkpoint(model, checkpoint)
    # transformers >= 5.6 has no ``text_model.`` level in CLIPTextModel (diffusers strips it the same way).
    prefix = "" if hasattr(model, "text_model") else "text_model."
    weights = {key.removeprefix(prefix): value for key, value in weights.items()}
    model.load_state_dict({key: weights[key] for key in model.state_dict()}, strict=True)
    return model


def diffusers_pipeline(config_path: Path, checkpoint: dict[str, torch.Tensor]) -> Any:
    """diffusers' inpainting pipeline holding the checkpoint's weights, with the original's DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    from ldm_inpaint.config import load_config

    raw = original_yaml(config_path)
    text = load_config(config_path).text_encoder
    return StableDiffusionInpaintPipeline(
        vae=diffusers_vae(raw, checkpoint),
        text_encoder=clip_text_model(text, checkpoint),
        tokenizer=clip_tokenizer(text.pad_token),
        unet=diffusers_unet(raw, checkpoint),
        scheduler=DDIMScheduler(**ORIGINAL_DDIM, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def prepare_worker(job: PrepareJob) -> dict[str, Any]:
    """Write the ``.ckpt`` and (if the job asks for it) the diffusers folder if missing (each under a temporary name, then renamed, so an
    interrupted run leaves no half-written cache); their sizes in bytes."""
    from ldm_inpaint.config import load_config
    from ldm_inpaint.random_weights import random_checkpoint

    checkpoint_path, diffusers_dir = Path(job.checkpoint), Path(job.diffusers_dir)
    if not checkpoint_path.exists():
        partial = checkpoint_path.with_name(checkpoint_path.name + ".partial")
        torch.save(random_checkpoint(load_config(job.config), job.seed), partial)
        partial.rename(checkpoint_path)
    if job.with_diffusers and not (diffusers_dir / "model_index.json").exists():
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
        partial = diffusers_dir.with_name(diffusers_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        diffusers_pipeline(Path(job.config), checkpoint).save_pretrained(partial)
        shutil.rmtree(diffusers_dir, ignore_errors=True)
        partial.rename(diffusers_dir)
    return file_sizes(job)


def file_sizes(job: PrepareJob) -> dict[str, int]:
    """Bytes of the ``.ckpt`` and of the weight files in the diffusers folder (0 when it is not written)."""
    weights = Path(job.diffusers_dir).rglob("*.safetensors")
    return {
        "checkpoint_bytes": Path(job.checkpoint).stat().st_size,
        "diffusers_bytes": sum(path.stat().st_size for path in weights),
    }
