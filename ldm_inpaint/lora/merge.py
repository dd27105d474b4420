"""LoRAs at inference: each file's update merged into the model's weights, undone bit for bit.

``W = W0 + sum_i w_i * (alpha_i / r_i) * B_i A_i`` over the files applied with weights ``w_i`` (computed in
float32, rounded once to the weight's dtype), so sampling costs what it costs without a LoRA. The original
tensors are kept aside (on the CPU) while the LoRAs are merged; :meth:`MergedLoRAs.remove` puts them back,
so the model is exactly what it was, whatever the dtype. Every file is read, resolved and checked against the
model before any weight changes: a file that does not fit leaves the model untouched.

Weights are read and written through each module's ``state_dict`` / ``load_state_dict``, as kohya's
``merge_to`` does, so packed convolutions (:mod:`ldm_inpaint.models.packing`) take a merged weight like plain
ones (they repack it on their next call); a q, k or v module of the text encoder changes its third of the
stacked ``in_proj_weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm_inpaint.errors import LoRAError
from ldm_inpaint.lora import names
from ldm_inpaint.lora.files import LoRAFile, Resolved, describe, read_lora, resolve
from ldm_inpaint.lora.network import weight_delta
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.models.packing import PackedConv2d


@dataclass(frozen=True)
class AppliedLoRA:
    """One file as applied: its weight and how many of its modules changed the UNet and the text encoder."""

    lora: LoRAFile
    weight: float
    unet_modules: int
    text_modules: int

    def describe(self) -> str:
        """``NAME:WEIGHT (sha256 PREFIX)``."""
        return describe(self.lora, self.weight)


@dataclass
class _Backup:
    module: nn.Module
    parameter: str
    original: Tensor


class MergedLoRAs:
    """LoRA files merged into a model (:func:`apply_loras`); :meth:`remove` restores its weights exactly."""

    def __init__(self, applied: list[AppliedLoRA], backups: list[_Backup]) -> None:
        self.applied = applied
        self._backups = backups

    @property
    def changes_text_encoder(self) -> bool:
        return any(item.text_modules for item in self.applied)

    def describe(self) -> str:
        """Every file as ``NAME:WEIGHT (sha256 PREFIX)``, joined by ``; ``."""
        return "; ".join(item.describe() for item in self.applied)

    def remove(self) -> None:
        """Put the original weights back (bit-identical); a second call does nothing."""
        for backup in reversed(self._backups):
            _set(backup.module, backup.parameter, backup.original)
        self._backups.clear()


def _set(module: nn.Module, parameter: str, value: Tensor) -> None:
    state = module.state_dict()
    state[parameter] = value
    module.load_state_dict(state, strict=True)


def _components(model: LatentDiffusion) -> dict[str, nn.Module]:
    return {"unet": model.model.diffusion_model, "text": model.cond_stage_model.model}


def apply_loras(model: LatentDiffusion, loras: Sequence[tuple[LoRAFile, float]]) -> MergedLoRAs:
    """Merge each ``(file, weight)`` into ``model`` (see the module docstring). LoRAError, before any
    weight changes, for a module that names nothing in the model or does not fit its weight."""
    components = _components(model)
    targets = {**names.unet_targets(components["unet"]), **names.text_targets(components["text"])}
    # (component, module path, parameter) -> [(module of a file, its weight)], in the order given
    groups: dict[tuple[str, str, str], list[tuple[Resolved, float]]] = {}
    applied = []
    for lora, weight in loras:
        resolved = list(resolve(lora, targets).values())
        for found in resolved:
            module = components[found.target.component].get_submodule(found.target.module)
            found.weights.fitted(found.name, _shape(module, found.target))  # raises before anything changes
            key = (found.target.component, found.target.module, found.target.parameter)
            groups.setdefault(key, []).append((found, weight))
        counts = [sum(found.target.component == c for found in resolved) for c in ("unet", "text")]
        applied.append(AppliedLoRA(lora, weight, *counts))
    merged = MergedLoRAs(applied, [])
    try:
        with torch.no_grad():
            for (component, path, parameter), items in groups.items():
                module = components[component].get_submodule(path)
                original = module.state_dict()[parameter]
                delta = torch.zeros(original.shape, dtype=torch.float32, device=original.device)
                for found, weight in items:
                    down, up = found.weights.fitted(found.name, _shape(module, found.target))
                    scale = weight * found.weights.scale
                    _rows(delta, found.target.part).add_(
                        weight_delta(down.to(delta.device), up.to(delta.device), scale)
                    )
                merged._backups.append(_Backup(module, parameter, original.to("cpu", copy=True)))
                _set(module, parameter, (original.float() + delta).to(original.dtype))
    except BaseException:
        merged.remove()  # out of memory, interrupted: the weights changed so far are put back
        raise
    return merged


def _rows(weight: Tensor, part: int | None) -> Tensor:
    """The whole weight, or its ``part``-th third of rows (q, k, v of a stacked ``in_proj``)."""
    return weight if part is None else weight.chunk(3)[part]


def _shape(module: nn.Module, target: names.Target) -> tuple[int, ...]:
    """The shape of the weight (or the third of it) that ``target`` changes."""
    if isinstance(module, PackedConv2d):
        return module.weight_shape
    shape = tuple(getattr(module, target.parameter).shape)
    if target.part is None:
        return shape
    if shape[0] % 3:
        raise LoRAError(
            f"{target.module}.{target.parameter}: expected q, k and v stacked in thirds, found {shape}"
        )
    return (shape[0] // 3, *shape[1:])


# A LoRA to apply: a file (at weight 1) or (file, weight).
LoRASource = str | Path | tuple[str | Path, float]


def read_loras(sources: Sequence[LoRASource]) -> list[tuple[LoRAFile, float]]:
    """Each source's file read and checked (:func:`~ldm_inpaint.lora.files.read_lora`), with its weight."""
    pairs = [(source, 1.0) if isinstance(source, str | Path) else source for source in sources]
    return [(read_lora(path), float(weight)) for path, weight in pairs]


class LoRASet:
    """The LoRA files merged into one model now (none at first); :meth:`set` replaces them."""

    def __init__(self, model: LatentDiffusion) -> None:
        self.model = model
        self._merged: MergedLoRAs | None = None

    @property
    def applied(self) -> list[AppliedLoRA]:
        return [] if self._merged is None else list(self._merged.applied)

    def describe(self) -> str:
        """``NAME:WEIGHT (sha256 PREFIX)`` of each file, joined by ``; `` ("" for none)."""
        return "" if self._merged is None else self._merged.describe()

    def set(self, sources: Sequence[LoRASource]) -> bool:
        """Restore the original weights, then merge ``sources`` (``()``: none). Returns whether the text
        encoder's weights changed. A file that cannot be read or does not fit raises LoRAError with the
        previous LoRAs still merged."""
        loras = read_loras(sources)
        previous = self._merged
        if previous is not None:
            previous.remove()
            self._merged = None
        try:
            self._merged = apply_loras(self.model, loras) if loras else None
        except LoRAError:
            if previous is not None:
                self._merged = apply_loras(self.model, [(a.lora, a.weight) for a in previous.applied])
            raise
        touched = [merged for merged in (previous, self._merged) if merged is not None]
        return any(merged.changes_text_encoder for merged in touched)
