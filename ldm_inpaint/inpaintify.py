"""Inpaint-ifying a text-to-image checkpoint: the 9-channel layout SD's inpainting models were tuned from.

The SD inpainting models began as text-to-image checkpoints whose UNet was given five more input channels:
``LatentFinetuneDiffusion.init_from_ckpt`` (Stability-AI/stablediffusion, ``ldm/models/diffusion/ddpm.py``,
``keep_finetune_dims=4``) replaces the first convolution's weight
``model.diffusion_model.input_blocks.0.0.weight`` by zeros of the new shape ``[C, 9, 3, 3]`` with the old
``[:, :4]`` copied in, keeps its bias, and expands the LitEma shadow of that weight the same way. The
inpainting UNet's input is ``cat(x_t, mask, masked-image latent)`` (4 + 1 + 4 channels,
:mod:`ldm_inpaint.conditioning`); with zero weights on the five new channels c,

    conv_in_9(cat(x_t, c)) = W[:, :4] * x_t + 0 * c + b = conv_in_4(x_t),

so the result predicts what the text-to-image model did, whatever the mask and image: the starting point of
the inpainting fine-tune, not an inpainting model yet.

Its config is the source's with the three settings that set the original inpainting configs apart (model
target ``LatentInpaintDiffusion``, ``conditioning_key: hybrid``, UNet ``in_channels: 9``), everything else
(``parameterization`` included) as it was. When the weights alone would be detected as another config (a v
model is detected as eps; a custom config as none), that config is written as YAML beside the checkpoint,
AUTOMATIC1111's convention, which :func:`~ldm_inpaint.checkpoint.config_reference` follows.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import Tensor

from ldm_inpaint.checkpoint import config_reference, detect_config, ema_key, sort_entries
from ldm_inpaint.config import ModelConfig, load_config, parse_config, read_raw_config
from ldm_inpaint.errors import CheckpointError, ConfigError

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
KEEP_FINETUNE_DIMS = 4  # the original's keep_finetune_dims: the noisy latent's channels keep their weights
INPAINTING_CHANNELS = 9  # x_t (4) + mask (1) + masked-image latent (4)
INPAINTING_TARGET = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"


@dataclass
class Inpaintified:
    """A checkpoint's entries in the inpainting layout, with their config."""

    entries: dict[str, object]
    expanded: list[str]  # the keys whose tensors were expanded
    config: ModelConfig
    config_source: str  # which config, and how found, for messages
    config_yaml: str | None  # to write beside the checkpoint; None: the weights are detected as ``config``


def expand_conv_in(weight: Tensor) -> Tensor:
    """``[C, 4, kh, kw]`` -> ``[C, 9, kh, kw]``: zeros with ``weight`` in ``[:, :4]``, in its dtype."""
    expanded = weight.new_zeros((weight.shape[0], INPAINTING_CHANNELS, *weight.shape[2:]))
    expanded[:, :KEEP_FINETUNE_DIMS] = weight
    return expanded


def _shape(value: object) -> str:
    return str(list(value.shape)) if isinstance(value, Tensor) else f"a {type(value).__name__}"


def _check_text_to_image(weight: object) -> None:
    expected = f"expected a text-to-image SD UNet, whose {CONV_IN} is [C, {KEEP_FINETUNE_DIMS}, 3, 3]"
    if not isinstance(weight, Tensor) or weight.ndim != 4:
        found = "none" if weight is None else _shape(weight)
        raise CheckpointError(f"{expected}; found {found}: is this a Stable Diffusion checkpoint?")
    if weight.shape[1] == INPAINTING_CHANNELS:
        raise CheckpointError(
            f"already an inpainting checkpoint ({CONV_IN} has {INPAINTING_CHANNELS} input channels); "
            "--to-inpainting expands a 4-channel text-to-image checkpoint: convert this one without it"
        )
    if weight.shape[1] != KEEP_FINETUNE_DIMS:
        raise CheckpointError(f"{expected}; found {_shape(weight)}")


def expand_entries(entries: Mapping[str, object]) -> tuple[dict[str, object], list[str]]:
    """Every entry as it is (the same objects, in the same order) except the UNet's first convolution
    weight and its LitEma shadow, which :func:`expand_conv_in` expands; and the keys expanded."""
    weight = entries.get(CONV_IN)
    _check_text_to_image(weight)
    keys = [CONV_IN]
    shadow = entries.get(ema_key(CONV_IN))
    if shadow is not None:
        if not isinstance(shadow, Tensor) or shadow.shape != weight.shape:
            raise CheckpointError(
                f"the EMA copy {ema_key(CONV_IN)} is {_shape(shadow)}, "
                f"expected the shape of {CONV_IN}, {list(weight.shape)}"
            )
        keys.append(ema_key(CONV_IN))
    return {key: expand_conv_in(value) if key in keys else value for key, value in entries.items()}, keys


def inpainting_config(raw: Any, name: str) -> dict[str, Any]:
    """The original-schema config (parsed YAML) of the inpainting variant of the text-to-image config
    ``raw`` (called ``name`` in messages): model target ``LatentInpaintDiffusion``, ``conditioning_key:
    hybrid``, UNet ``in_channels: 9``, everything else as in ``raw``, which is not changed."""
    source = parse_config(raw, name)
    if source.is_inpainting or source.unet.in_channels != KEEP_FINETUNE_DIMS:
        raise ConfigError(
            f"config {name} is a {source.unet.in_channels}-channel {source.conditioning_key} config; "
            "--to-inpainting needs the source's text-to-image config "
            f"({KEEP_FINETUNE_DIMS} channels, crossattn)"
        )
    derived = copy.deepcopy(dict(raw))
    model = derived["model"]
    model["target"] = INPAINTING_TARGET
    model["params"]["conditioning_key"] = "hybrid"
    model["params"]["unet_config"]["params"]["in_channels"] = INPAINTING_CHANNELS
    return derived


def config_yaml(raw: Mapping[str, Any], source_name: str) -> str:
    """``raw`` as a YAML file, under a comment that says where it came from."""
    header = (
        f"# The inpainting variant of {source_name}, written by `ldm-inpaint convert --to-inpainting`:\n"
        "# model target LatentInpaintDiffusion, conditioning_key hybrid, UNet in_channels "
        f"{INPAINTING_CHANNELS}; the rest as it was.\n"
        "# A checkpoint loads with the .yaml of its name beside it (ldm-inpaint, AUTOMATIC1111's web UI).\n"
    )
    return header + OmegaConf.to_yaml(OmegaConf.create(raw))


def _detected(weights: Mapping[str, Tensor]) -> ModelConfig | None:
    """The bundled config the weights are detected as, if any."""
    try:
        return load_config(detect_config(weights))
    except CheckpointError:
        return None


def inpaintify(
    entries: Mapping[str, object],
    config: str | Path | None,
    checkpoint: str | Path,
    name: str,
) -> Inpaintified:
    """The entries of ``checkpoint`` in the inpainting layout (:func:`expand_entries`) and its config: the
    inpainting variant of the source's config (``config``, else the YAML beside ``checkpoint``, else
    detected). That variant is the bundled config the result is detected as when they agree (SD1 ->
    ``v1-inpainting-inference``, SD2 eps -> ``v2-inpainting-inference``); otherwise it is called ``name`` and
    comes with its YAML text, to be written beside the new checkpoint."""
    expanded, keys = expand_entries(entries)
    weights = sort_entries(entries).weights
    reference, how = config_reference(weights, config, checkpoint)
    raw, source_name = read_raw_config(reference)
    derived = inpainting_config(raw, source_name)
    variant = parse_config(derived, name)
    detected = _detected({**weights, CONV_IN: expanded[CONV_IN]})
    source = f"the inpainting variant of {source_name}, {how}"
    if detected is not None and replace(detected, name=name) == variant:
        return Inpaintified(expanded, keys, detected, source, None)
    return Inpaintified(expanded, keys, variant, source, config_yaml(derived, source_name))
