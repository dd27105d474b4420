"""A swapped VAE (``--vae FILE``): the fine-tuned autoencoders users put in place of a model's own, such as
Stability AI's ft-EMA and ft-MSE (``vae-ft-mse-840000-ema-pruned.ckpt``).

Accepted, read without running code (:mod:`~ldm_inpaint.checkpoint_files`):

- a VAE file in the original layout (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``),
  as Stability AI ships them; the autoencoder's training-loss weights (``loss.*``: discriminator, LPIPS) and
  an EMA's counters are skipped by name;
- a whole checkpoint, of which the ``first_stage_model.*`` part is taken (the rest is named as skipped);
- a diffusers ``vae/`` folder (``config.json`` and its weights), or a diffusers VAE file on its own.

The loader (:func:`ldm_inpaint.checkpoint.load_model`) then checks the weights as strictly as a checkpoint's:
every weight of the model's autoencoder with its shape, as dense floating point, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ldm_inpaint.checkpoint_files import read_checkpoint
from ldm_inpaint.errors import CheckpointError
from ldm_inpaint.formats.diffusers import read_component, vae_from_diffusers, weight_files
from ldm_inpaint.weight_checks import check_weights

if TYPE_CHECKING:
    from ldm_inpaint.checkpoint import LoadedModel

VAE_PREFIX = "first_stage_model."
_SKIPPED = {
    "loss.": "autoencoder training-loss weights (discriminator, LPIPS)",
    "model_ema.": "EMA counters",
}


def _own_keys(entries: Mapping[str, object]) -> tuple[dict[str, object], dict[str, list[str]]]:
    """A file's VAE entries relative to the autoencoder, and what was skipped, by kind."""
    skipped: dict[str, list[str]] = {}
    if any(key.startswith(VAE_PREFIX) for key in entries):
        kept = {
            key.removeprefix(VAE_PREFIX): value
            for key, value in entries.items()
            if key.startswith(VAE_PREFIX)
        }
        others = [key for key in entries if not key.startswith(VAE_PREFIX)]
        if others:
            skipped["entries of a whole checkpoint besides its VAE"] = others
        return kept, skipped
    kept = {}
    for key, value in entries.items():
        if not isinstance(value, Tensor):
            skipped.setdefault("training state (not tensors)", []).append(key)
            continue
        kind = next((kind for prefix, kind in _SKIPPED.items() if key.startswith(prefix)), None)
        if kind is None:
            kept[key] = value
        else:
            skipped.setdefault(kind, []).append(key)
    return kept, skipped


def read_vae(path: Path, vae: nn.Module, levels: int) -> tuple[dict[str, object], dict[str, list[str]]]:
    """The entries of ``path`` for the autoencoder ``vae`` (of ``levels`` resolutions) under its keys, and
    what was skipped, by kind; the caller checks them strictly."""
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        return vae_from_diffusers(read_component(weight_files(folder, "vae"), "vae"), vae, levels, folder), {}
    kept, skipped = _own_keys(read_checkpoint(path))
    if any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in kept):
        tensors = {key: value for key, value in kept.items() if isinstance(value, Tensor)}
        return vae_from_diffusers(tensors, vae, levels, path), skipped
    return kept, skipped


def swap_vae(loaded: LoadedModel, path: Path) -> None:
    """Replace the model's VAE weights by those of ``path`` (kept in the model's dtype and device), checked as
    strictly as a checkpoint's; what was skipped is added to ``loaded.skipped``."""
    autoencoder = loaded.model.first_stage_model
    weights, skipped = read_vae(path, autoencoder, len(loaded.config.autoencoder.ch_mult))
    try:
        check_weights(autoencoder, weights, loaded.config)
    except CheckpointError as error:
        raise CheckpointError(f"--vae {path}: {error}") from None
    reference = next(autoencoder.parameters())
    with torch.no_grad():
        autoencoder.load_state_dict({key: value.to(reference) for key, value in weights.items()}, strict=True)
    loaded.skipped.update({f"{kind} in --vae {path.name}": keys for kind, keys in skipped.items()})
