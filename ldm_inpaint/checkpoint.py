"""Loading the original checkpoint files, strictly, into our modules.

A file is read without running any code from it (:mod:`~ldm_inpaint.checkpoint_files`), its entries are sorted into (a) weights for the model, (b) entries we skip on purpose — each kind named in
:data:`KNOWN_EXTRAS` and counted — and (c) anything else, which is an error. UNet and VAE keys are our module
names as they are; only the SD1 text encoder goes through one explicit table (``models.clip``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ldm_inpaint.checkpoint_files import checkpoint_path, is_model_folder, read_checkpoint
from ldm_inpaint.config import BUNDLED_CONFIGS, ModelConfig, load_config
from ldm_inpaint.errors import CheckpointError
from ldm_inpaint.formats.diffusers import read_folder
from ldm_inpaint.formats.vae import swap_vae
from ldm_inpaint.models.clip import openai_to_openclip, openclip_to_openai
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.models.packing import pack_convolutions
from ldm_inpaint.runtime import release_file_pages
from ldm_inpaint.schedule import alphas_cumprod
from ldm_inpaint.weight_checks import check_weights, describe_keys

SCHEDULE_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
# Entries real files carry that inference does not use, by kind.
KNOWN_EXTRAS: dict[str, tuple[str, ...]] = {
    "DDPM schedule buffers (recomputed from the config)": SCHEDULE_KEYS,
    "training-only DDPM entries": ("logvar", "model_ema.decay", "model_ema.num_updates"),
    "text-encoder position ids (implied by position)": (
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    ),
}
EMA_PREFIX = "model_ema."
SD1_TEXT_PREFIX = "cond_stage_model.transformer.text_model."
OUR_TEXT_PREFIX = "cond_stage_model.model."
# Non-tensor top-level entries of Lightning checkpoints.
LIGHTNING_ENTRIES = (
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "callbacks",
    "optimizer_states",
    "lr_schedulers",
    "hparams_name",
    "hyper_parameters",
    "loops",
    "hparams",
    "NativeMixedPrecisionPlugin",
    "MixedPrecisionPlugin",
)


@dataclass
class SortedEntries:
    """A file's entries sorted into model weights (our key names), skipped entries by kind, and the rest."""

    weights: dict[str, Tensor]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    ema: dict[str, Tensor] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


def ema_key(name: str) -> str:
    """LitEma's name for the shadow of ``model.<name>``: every dot removed (``model_ema.diffusion_modelout0bias``)."""
    return EMA_PREFIX + name.removeprefix("model.").replace(".", "")


def sort_entries(entries: Mapping[str, object]) -> SortedEntries:
    """Split raw file entries into model weights (text keys mapped to our layout), skipped extras, EMA shadows
    and unknown entries."""
    known = {key: kind for kind, keys in KNOWN_EXTRAS.items() for key in keys}
    sorted_ = SortedEntries(weights={})
    text_openai: dict[str, Tensor] = {}
    for key, value in entries.items():
        if key in known:
            sorted_.skipped.setdefault(known[key], []).append(key)
        elif key in LIGHTNING_ENTRIES:
            sorted_.skipped.setdefault("Lightning training state", []).append(key)
        elif not isinstance(value, Tensor):
            sorted_.unknown.append(key)
        elif key.startswith(EMA_PREFIX):
            sorted_.ema[key] = value
        elif key.startswith(SD1_TEXT_PREFIX):
            text_openai[key.removeprefix(SD1_TEXT_PREFIX)] = value
        elif key.startswith(("model.diffusion_model.", "first_stage_model.", OUR_TEXT_PREFIX)):
            sorted_.weights[key] = value
        else:
            sorted_.unknown.append(key)
    if text_openai:
        mapped = openai_to_openclip(text_openai)
        sorted_.weights.update({OUR_TEXT_PREFIX + key: value for key, value in mapped.items()})
    return sorted_


def to_file_layout(weights: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """The inverse of :func:`sort_entries` for model weights: our key names -> the original file's (only the SD1
    text encoder differs)."""
    if config.text_encoder.layout != "openai":
        return dict(weights)
    text = {
        key.removeprefix(OUR_TEXT_PREFIX): value
        for key, value in weights.items()
        if key.startswith(OUR_TEXT_PREFIX)
    }
    rest = {key: value for key, value in weights.items() if not key.startswith(OUR_TEXT_PREFIX)}
    return {**rest, **{SD1_TEXT_PREFIX + key: value for key, value in openclip_to_openai(text).items()}}


def detect_config(weights: Mapping[str, Tensor]) -> str:
    """Name of the bundled config matching a state dict: UNet input channels (9 = inpainting, 4 =
    text-to-image) and cross-attention context width (768 = SD1, 1024 = SD2)."""
    conv_in = weights.get("model.diffusion_model.input_blocks.0.0.weight")
    to_k = weights.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if conv_in is None or to_k is None or conv_in.ndim != 4 or to_k.ndim != 2:
        raise CheckpointError(
            "cannot detect the model: expected an SD UNet under 'model.diffusion_model.' (input_blocks.0.0.weight "
            "and a cross-attention to_k weight); found none — is this a Stable Diffusion checkpoint?"
        )
    kinds = {9: "inpainting", 4: "text-to-image"}
    in_channels, context_dim = conv_in.shape[1], to_k.shape[1]
    name = BUNDLED_CONFIGS.get((kinds.get(in_channels, ""), context_dim))
    if name is None:
        raise CheckpointError(
            f"cannot detect the model: UNet has {in_channels} input channels and context width {context_dim}; "
            f"supported: 9 or 4 channels with 768 (SD1) or 1024 (SD2). Pass a config explicitly."
        )
    return name


def apply_ema(sorted_: SortedEntries) -> dict[str, Tensor]:
    """The model weights with every ``model.*`` tensor replaced by its LitEma shadow."""
    if not sorted_.ema:
        raise CheckpointError("EMA weights requested, but the file has no 'model_ema.*' copy")
    weights = dict(sorted_.weights)
    for key in weights:
        if key.startswith("model."):
            shadow = ema_key(key)
            if shadow not in sorted_.ema:
                raise CheckpointError(f"EMA copy is incomplete: no {shadow} for {key}")
            weights[key] = sorted_.ema[shadow]
    return weights


def check_schedule(entries: Mapping[str, object], config: ModelConfig) -> None:
    """A file's stored ``alphas_cumprod`` (if any) must match the config's schedule — a free check that the
    config fits the file. Half-precision files store it rounded, hence a tolerance well above rounding and
    far below the difference between real schedules."""
    stored = entries.get("alphas_cumprod")
    if not isinstance(stored, Tensor):
        return
    expected = alphas_cumprod(config.schedule)
    if stored.shape != expected.shape:
        raise CheckpointError(
            f"the file's DDPM schedule has {stored.shape[0] if stored.ndim else 0} timesteps, config "
            f"{config.name!r} has {expected.shape[0]}"
        )
    tolerance = 8e-3  # bf16 rounding (2**-7); files converted from fp16/bf16 may store the rounded values
    error = ((stored.double() - expected) / expected).abs().max().item()
    if error > tolerance:
        raise CheckpointError(
            f"the file's DDPM schedule (alphas_cumprod) differs from config {config.name!r} by {error:.2g} "
            f"(relative; allowed {tolerance:g}): the config does not fit this checkpoint"
        )


@dataclass
class LoadedModel:
    model: LatentDiffusion
    config: ModelConfig
    skipped: dict[str, list[str]]
    config_source: str  # how the config was found, see resolve_config
    ema: bool = False  # whether the weights are the file's EMA copy


DETECTED = "detected from the checkpoint"  # how a config was found, when nothing named it


def config_beside(checkpoint: str | Path) -> Path | None:
    """The config that AUTOMATIC1111's convention puts beside a checkpoint, if that file exists: the same
    name with the suffix ``.yaml`` (``model.safetensors`` -> ``model.yaml``)."""
    candidate = Path(checkpoint).with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def config_reference(
    weights: Mapping[str, Tensor],
    config: str | Path | ModelConfig | None,
    checkpoint: str | Path | None = None,
) -> tuple[str | Path | ModelConfig, str]:
    """Which config a checkpoint loads with, and how it was found (for messages): ``config`` when given;
    else the YAML beside ``checkpoint`` (:func:`config_beside`); else the bundled one detected from the
    weights. Every command finds its config here."""
    if config is not None:
        return config, "given"
    beside = config_beside(checkpoint) if checkpoint is not None else None
    if beside is not None:
        return beside, f"{beside.name} beside the checkpoint"
    return detect_config(weights), DETECTED


def resolve_config(
    weights: Mapping[str, Tensor],
    config: str | Path | ModelConfig | None,
    checkpoint: str | Path | None = None,
) -> tuple[ModelConfig, str]:
    """The config of :func:`config_reference`, loaded, and how it was found."""
    reference, how = config_reference(weights, config, checkpoint)
    return (reference if isinstance(reference, ModelConfig) else load_config(reference)), how


def check_fit(
    weights: Mapping[str, Tensor], entries: Mapping[str, object], config: ModelConfig
) -> LatentDiffusion:
    """The strict checks (the schedule buffers, then every weight with its shape and nothing else) against
    the model of ``config`` built on the meta device, which is returned, still without weights."""
    check_schedule(entries, config)
    with torch.device("meta"):
        model = LatentDiffusion(config)
    check_weights(model, weights, config)
    return model


def load_model(
    path: str | Path,
    config: str | Path | ModelConfig | None = None,
    *,
    use_ema: bool | None = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    pack: bool = False,
    vae: str | Path | None = None,
) -> LoadedModel:
    """Read a checkpoint file, or a diffusers / ppdiffusers model folder
    (:mod:`~ldm_inpaint.formats.diffusers`), and load it into the model of ``config`` (see
    :func:`build_model`; None: the YAML beside the file, else detected). ``use_ema``: the file's EMA copy of
    the UNet; None: when it has one. ``vae``: another VAE in place of the model's own
    (:mod:`~ldm_inpaint.formats.vae`), loaded as strictly.

    ``pack``: store the UNet's and the VAE's convolution weights pre-packed for oneDNN
    (:mod:`ldm_inpaint.models.packing`; CPU, float32 or bfloat16): faster CPU inference in the same memory,
    same ``state_dict()``. Each weight is packed on its first use, and the plain one then freed (or its file
    pages given back)."""
    path = checkpoint_path(path)
    if is_model_folder(path):
        folder = read_folder(path, config)
        entries, config, source = folder.entries, folder.config, None
    else:
        folder, entries, source = None, read_checkpoint(path), path
    try:
        loaded = build_model(entries, config, use_ema=use_ema, dtype=dtype, device=device, source=source)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if vae is not None:
        swap_vae(loaded, Path(vae))
    del entries  # the model now holds the only reference to each weight, so packing frees them one by one
    if folder is not None:
        loaded.config_source = folder.config_source
        loaded.skipped.update(folder.skipped)
    if pack:
        model = loaded.model
        for part in (model.model.diffusion_model, model.first_stage_model):
            pack_convolutions(part, release=lambda tensor: release_file_pages(tensor, path))
    return loaded


def build_model(
    entries: Mapping[str, object],
    config: str | Path | ModelConfig | None = None,
    *,
    use_ema: bool | None = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    source: str | Path | None = None,
) -> LoadedModel:
    """Build the model of ``config`` (when None: the YAML beside ``source``, else detected from the weights,
    see :func:`config_reference`) on the meta device, without allocating weights, and load the file's
    entries into it strictly (``assign=True``: the model holds the file's tensors, so a memory-mapped file is
    not copied). ``dtype`` None keeps the file's dtype. ``use_ema``: the UNet's weights from the file's LitEma
    copy (``model_ema.*``); None: when the file has one (:attr:`LoadedModel.ema` says which were loaded).

    ``source``: the file the entries were memory-mapped from, if any; weights cast to another dtype or moved
    to another device then give back their file pages one at a time (:func:`release_file_pages`), so the
    peak is the new copy plus one tensor, not both copies; so do the SD1 text encoder's entries that were
    copied (:func:`copied_text_entries`)."""
    sorted_ = sort_entries(entries)
    if sorted_.unknown:
        raise CheckpointError(describe_keys(sorted_.unknown, "unexpected entries"))
    use_ema = bool(sorted_.ema) if use_ema is None else use_ema
    weights = apply_ema(sorted_) if use_ema else sorted_.weights
    if not use_ema and sorted_.ema:
        sorted_.skipped["EMA copy (load it with use_ema)"] = list(sorted_.ema)
    config, how = resolve_config(weights, config, source)
    model = check_fit(weights, entries, config)
    model.load_state_dict(weights, strict=True, assign=True)
    release = (lambda tensor: release_file_pages(tensor, source)) if source is not None else None
    if release is not None:
        for tensor in copied_text_entries(entries, weights):
            release(tensor)
    _cast(model, torch.device(device), dtype, release)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, config=config, skipped=sorted_.skipped, config_source=how, ema=use_ema)


def copied_text_entries(entries: Mapping[str, object], weights: Mapping[str, Tensor]) -> list[Tensor]:
    """The SD1 text encoder's file tensors that the model does not hold: its separate q, k and v projections,
    read once to build our merged ``in_proj`` (a copy), and the skipped position ids."""
    held = {id(tensor) for tensor in weights.values()}
    return [
        value
        for key, value in entries.items()
        if key.startswith(SD1_TEXT_PREFIX) and isinstance(value, Tensor) and id(value) not in held
    ]


def _cast(
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype | None,
    release: Callable[[Tensor], None] | None,
) -> None:
    """``model.to(device, dtype)`` (floating-point tensors take ``dtype``), one tensor at a time, handing each
    replaced tensor to ``release``."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        source = tensor.data
        target_dtype = dtype if dtype is not None and source.is_floating_point() else source.dtype
        moved = source.to(device=device, dtype=target_dtype)
        if moved is not source:
            tensor.data = moved
            if release is not None:
                release(source)
