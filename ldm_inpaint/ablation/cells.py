"""A study's cells: one run each, identified by a hash of everything that decides its result, and the
resolved spec that runs the study again."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ldm_inpaint import options
from ldm_inpaint.ablation.lora_axis import LORA, LoRARef, lora_identity, lora_spec
from ldm_inpaint.ablation.study import CHECKPOINT, CheckpointRef, Pair, Study
from ldm_inpaint.checkpoint import config_beside
from ldm_inpaint.checkpoint_files import folder_root
from ldm_inpaint.config import load_config
from ldm_inpaint.files import sha256_path, write_new_text


@dataclass(frozen=True)
class Cell:
    """One run: a pair, a checkpoint, the LoRAs merged into it, every parameter; ``position`` is its swept
    values, in sweep order."""

    pair: Pair
    checkpoint: CheckpointRef
    checkpoint_sha256: str
    parameters: dict[str, object]
    position: tuple[object, ...]
    hash: str
    loras: tuple[LoRARef, ...] = ()
    setting: str = ""  # the hash of everything but the pair: one per evaluated setting (--eval-data)


def checkpoint_identity(ref: CheckpointRef, use_ema: bool) -> dict[str, object]:
    """What identifies a checkpoint's results: its file's sha256, its config's contents (the given one, else
    the YAML beside the file; None: detected from the weights, which the sha256 fixes), EMA."""
    config = None
    reference = ref.config if ref.config is not None else config_beside(ref.path)
    if reference is not None:
        config = {key: value for key, value in asdict(load_config(reference)).items() if key != "name"}
    return {"sha256": sha256_path(folder_root(ref.path)), "config": config, "use_ema": use_ema}


def cell_hash(identity: dict[str, object]) -> str:
    """12 hex digits of the sha256 of the canonical JSON of everything that decides a cell's result."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def expand(study: Study, precision: str) -> list[Cell]:
    """Every cell of the study, grouped by checkpoint (in axis order), then by pair, then in sweep order."""
    cells = []
    for ref in study.checkpoints:
        checkpoint = checkpoint_identity(ref, study.use_ema)
        sha256 = checkpoint["sha256"]
        for pair in study.pairs:
            for position in itertools.product(*study.sweep.values()):
                values = dict(zip(study.sweep, position, strict=True))
                if values.get(CHECKPOINT, ref) != ref:
                    continue
                parameters = {
                    name: values[name] if name in values else study.fixed[name] for name in options.SWEEPABLE
                }
                identity = {
                    "parameters": parameters,
                    "checkpoint": checkpoint,
                    "pair": pair.identity,
                    "precision": precision,
                }
                loras = values.get(LORA, study.fixed.get(LORA, ()))
                if loras:  # studies without LoRAs keep the hashes they always had
                    identity[LORA] = lora_identity(loras)
                setting = cell_hash({key: value for key, value in identity.items() if key != "pair"})
                cells.append(
                    Cell(pair, ref, sha256, parameters, position, cell_hash(identity), loras, setting)
                )
    return cells


def resolved_spec(study: Study) -> dict[str, object]:
    """The study as a spec with absolute paths and every fixed value, for ``--spec``."""

    def checkpoint(ref: CheckpointRef) -> dict[str, object]:
        config = str(Path(ref.config).resolve()) if ref.config and Path(ref.config).exists() else ref.config
        return {"path": str(ref.path.resolve()), "config": config}

    spec: dict[str, object] = {}
    if CHECKPOINT in study.fixed:
        spec[CHECKPOINT] = checkpoint(study.fixed[CHECKPOINT])
    spec["use_ema"] = study.use_ema
    spec["resize_mask"] = study.resize_mask
    spec["pairs"] = [
        {"image": str(pair.image_path.resolve()), "mask": str(pair.mask_path.resolve())}
        for pair in study.pairs
    ]
    spec["fixed"] = {
        name: lora_spec(value) if name == LORA else value
        for name, value in study.fixed.items()
        if name != CHECKPOINT
    }
    convert = {CHECKPOINT: checkpoint, LORA: lora_spec}
    spec["sweep"] = {
        key: [convert.get(key, lambda value: value)(value) for value in values]
        for key, values in study.sweep.items()
    }
    return spec


def write_spec(study: Study, out: Path) -> Path:
    """``out/spec-<hash>.yaml``, named after its contents: running the same study again reuses the file."""
    text = "# ldm-inpaint ablate: the resolved study; run it again with --spec this-file --out FOLDER\n"
    text += yaml.safe_dump(resolved_spec(study), sort_keys=False, allow_unicode=True, width=1000)
    path = out / f"spec-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"
    write_new_text(path, text)
    return path
