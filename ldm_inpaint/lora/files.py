"""LoRA files: reading kohya / AUTOMATIC1111 and diffusers (PEFT) files, writing kohya files.

kohya's format (sd-scripts ``networks/lora.py``; read by AUTOMATIC1111, ComfyUI and diffusers' loaders), one
module per name (:mod:`ldm_inpaint.lora.names`), three entries each:

- ``NAME.lora_down.weight``: A, (r, in) or, for a convolution, (r, in, kh, kw);
- ``NAME.lora_up.weight``: B, (out, r) or (out, r, 1, 1);
- ``NAME.alpha``: a scalar; the update is ``(alpha / r) * B A``. Without it (or 0), alpha = r (scale 1), as
  kohya, ComfyUI and diffusers read such files.

diffusers' own format (PEFT) names modules by dotted paths under ``unet.`` / ``text_encoder.`` with
``lora_A.weight`` (A) and ``lora_B.weight`` (B); its alphas come as ``PATH.alpha`` entries or in the
``lora_adapter_metadata`` of the safetensors header (``unet.lora_alpha`` over ``unet.r``). Such files are read
by converting each path to the kohya name it has (dots to ``_``), so both formats resolve through the same
names. Everything else (LoHa, LoKr, DoRA, ... entries; keys of unknown modules) is refused by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from ldm_inpaint.checkpoint_files import file_format, read_checkpoint
from ldm_inpaint.errors import CheckpointError, LoRAError
from ldm_inpaint.files import sha256_file, write_atomic
from ldm_inpaint.lora.names import TEXT_PREFIX, UNET_PREFIX, Target

_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
_PEFT_COMPONENTS = {"unet": UNET_PREFIX, "text_encoder": TEXT_PREFIX}
# Entries of other adapter kinds (LyCORIS, DoRA, ...), named in the refusal.
_OTHER_KINDS = {
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "lora_mid": "LoCon with a Tucker core",
    "dora_scale": "DoRA",
    "oft_": "OFT",
    "a1.": "GLoRA",
    "diff": "full weight difference",
    "w_norm": "norm layer",
    "b_norm": "norm layer",
}
_PREVIEW = 3


@dataclass(frozen=True)
class ModuleWeights:
    """One module of a LoRA file: A (``down``), B (``up``) and alpha (None: not stored, i.e. the rank)."""

    down: Tensor
    up: Tensor
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of ``B A``."""
        return (self.alpha or self.rank) / self.rank

    def fitted(self, name: str, weight_shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """A and B shaped for a weight of ``weight_shape`` (a 1x1 convolution and a linear layer take each
        other's A and B); LoRAError unless they fit it."""
        down, up = self.down, self.up
        if len(weight_shape) == 4 and weight_shape[2:] == (1, 1) and down.ndim == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]
        elif len(weight_shape) == 2 and down.ndim == 4 and down.shape[2:] == (1, 1):
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        fits = (
            down.ndim == len(weight_shape)
            and up.ndim == down.ndim
            and up.shape[1] == down.shape[0]
            and up.shape[0] == weight_shape[0]
            and tuple(down.shape[1:]) == tuple(weight_shape[1:])
            and all(side == 1 for side in up.shape[2:])
        )
        if not fits:
            raise LoRAError(
                f"LoRA module {name}: lora_down {tuple(self.down.shape)} and lora_up {tuple(self.up.shape)} do "
                f"not fit the model's weight {tuple(weight_shape)}; the LoRA was made for another model "
                "(e.g. SD1 vs SD2)"
            )
        return down, up


@dataclass(frozen=True)
class LoRAFile:
    """A LoRA file read and checked: its modules by kohya name (PEFT paths converted), its sha256."""

    path: Path
    sha256: str
    modules: dict[str, ModuleWeights]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Resolved:
    """A module of a LoRA file and the weight it changes."""

    name: str
    target: Target
    weights: ModuleWeights


def _preview(keys: list[str]) -> str:
    more = f" and {len(keys) - _PREVIEW} more" if len(keys) > _PREVIEW else ""
    return ", ".join(keys[:_PREVIEW]) + more


def _split(key: str) -> tuple[str, str, dict[str, str]] | None:
    """A file key -> (kohya module name, part, the format's parts), or None for a key of neither format."""
    if key.startswith("lora_"):
        module, _, part = key.partition(".")
        return module, part, _KOHYA_PARTS
    component, _, rest = key.partition(".")
    if component not in _PEFT_COMPONENTS:
        return None
    for part in _PEFT_PARTS:
        if rest.endswith("." + part):
            path = rest[: -len(part) - 1]
            if component == "text_encoder" and not path.startswith("text_model."):
                path = "text_model." + path  # transformers >= 5.6 saves CLIPTextModel without the level
            return _PEFT_COMPONENTS[component] + path.replace(".", "_"), part, _PEFT_PARTS
    return key, rest, _PEFT_PARTS


def _metadata(path: Path) -> dict[str, str]:
    """The safetensors header's metadata (nothing for a torch file)."""
    if file_format(path) != "safetensors":
        return {}
    with safe_open(path, "pt") as file:
        return dict(file.metadata() or {})


def _peft_alphas(path: Path, metadata: dict[str, str]) -> dict[str, float]:
    """Per component (``unet``, ``text_encoder``), the ``lora_alpha`` of a diffusers file's adapter metadata,
    where it holds one alpha for all modules and one rank (no per-module patterns)."""
    if "lora_adapter_metadata" not in metadata:
        return {}
    try:
        adapter = json.loads(metadata["lora_adapter_metadata"])
    except json.JSONDecodeError as error:
        raise LoRAError(f"{path}: the diffusers adapter metadata is not valid JSON ({error})") from None
    alphas = {}
    for component in _PEFT_COMPONENTS:
        if f"{component}.lora_alpha" not in adapter:
            continue
        if adapter.get(f"{component}.alpha_pattern") or adapter.get(f"{component}.rank_pattern"):
            raise LoRAError(
                f"{path}: per-module ranks or alphas (alpha_pattern, rank_pattern) in the diffusers metadata "
                "are not supported; save the LoRA in kohya's format"
            )
        alphas[component] = float(adapter[f"{component}.lora_alpha"])
    return alphas


def _entries(path: Path) -> dict[str, Tensor]:
    try:
        entries = read_checkpoint(path)
    except CheckpointError as error:
        raise LoRAError(f"LoRA file: {error}") from None
    not_tensors = [key for key, value in entries.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise LoRAError(f"{path}: expected only tensors in a LoRA file, found {_preview(not_tensors)}")
    return entries


def read_lora(path: str | Path) -> LoRAFile:
    """Read a kohya or diffusers (PEFT) LoRA file (safetensors, or a torch zip); LoRAError, naming the keys,
    for anything that is not a LoRA module's A, B or alpha."""
    path = Path(path)
    entries = _entries(path)
    parts: dict[str, dict[str, Tensor]] = {}
    unknown, other_kinds = [], {}
    for key, tensor in entries.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        module, part, known_parts = split
        kind = known_parts.get(part)
        if kind is None:
            kinds = [name for marker, name in _OTHER_KINDS.items() if marker in part]
            if kinds:
                other_kinds.setdefault(kinds[0], []).append(key)
            else:
                unknown.append(key)
            continue
        parts.setdefault(module, {})[kind] = tensor
    if other_kinds:
        kind, keys = next(iter(other_kinds.items()))
        raise LoRAError(
            f"{path}: {kind} entries ({_preview(keys)}); only LoRA (lora_down / lora_up / alpha) is supported"
        )
    if unknown:
        raise LoRAError(
            f"{path}: {len(unknown)} key(s) that are not LoRA entries ({_preview(unknown)}); expected "
            "NAME.lora_down.weight, NAME.lora_up.weight, NAME.alpha (kohya) or unet./text_encoder. "
            "PATH.lora_A.weight / .lora_B.weight (diffusers)"
        )
    if not parts:
        raise LoRAError(f"{path}: holds no LoRA modules")
    metadata = _metadata(path)
    peft_alphas = _peft_alphas(path, metadata)
    modules = {}
    for name, found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "lora_down" if "down" not in found else "lora_up"
            raise LoRAError(f"{path}: LoRA module {name} has no {missing} weight")
        alpha = found.get("alpha")
        component = "unet" if name.startswith(UNET_PREFIX) else "text_encoder"
        modules[name] = ModuleWeights(
            found["down"], found["up"], peft_alphas.get(component) if alpha is None else alpha.item()
        )
    return LoRAFile(path, sha256_file(path), modules, metadata)


def resolve(lora: LoRAFile, targets: dict[str, Target], component: str | None = None) -> dict[str, Resolved]:
    """Each module of ``lora`` with the weight it changes (``targets`` from :mod:`~ldm_inpaint.lora.names`);
    LoRAError naming the modules that name none (with ``component``, ``"unet"`` or ``"text"``: that lie
    outside it)."""
    if component is not None:
        prefix = UNET_PREFIX if component == "unet" else TEXT_PREFIX
        elsewhere = [name for name in lora.modules if not name.startswith(prefix)]
        if elsewhere:
            raise LoRAError(
                f"{lora.path}: {len(elsewhere)} module(s) outside the {component} ({_preview(elsewhere)}); "
                f"only the {component} is adapted here"
            )
    unknown = [name for name in lora.modules if name not in targets]
    if unknown:
        raise LoRAError(
            f"{lora.path}: {len(unknown)} of {len(lora.modules)} LoRA module(s) name no module of this model "
            f"({_preview(unknown)}); is it a LoRA for another model (e.g. SDXL)?"
        )
    return {name: Resolved(name, targets[name], weights) for name, weights in lora.modules.items()}


def write_lora(
    path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str], *, replace: bool = False
) -> Path:
    """Write ``tensors`` (kohya entries) as a safetensors file with ``metadata``: atomically, and never over
    an existing file (LoRAError) unless ``replace`` (a training run's latest file)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoRAError(f"LoRA output {path}: expected a name ending in .safetensors")
    data = save(
        {key: value.detach().contiguous().cpu() for key, value in tensors.items()},
        {"format": "pt", **metadata},
    )
    try:
        written = write_atomic(path, lambda file: file.write(data), replace=replace)
    except OSError as error:
        raise LoRAError(f"LoRA output {path}: {error.strerror or error}") from None
    if not written:
        raise LoRAError(f"LoRA output {path} already exists; it is never overwritten")
    return path


def parse_lora_argument(text: str) -> tuple[Path, float]:
    """``FILE[:WEIGHT]`` (the weight, default 1, multiplies the LoRA's update) -> (path, weight)."""
    name, colon, weight = text.rpartition(":")
    try:
        value = float(weight) if colon and name else None
    except ValueError:
        value = None  # a colon that is part of the file name
    if value is None:
        return Path(text), 1.0
    if not math.isfinite(value):
        raise LoRAError(f"LoRA {text!r}: expected FILE[:WEIGHT] with a finite weight, found {weight}")
    return Path(name), value


def describe(lora: LoRAFile, weight: float) -> str:
    """``NAME:WEIGHT (sha256 PREFIX)``, as PNG metadata and results rows record a LoRA."""
    return f"{lora.path.name}:{weight:g} (sha256 {lora.sha256[:12]})"
