"""The ``lora`` key of a study: which LoRA files a cell's run merges into the checkpoint's weights.

A value is ``none`` (or null, or an empty list), one ``FILE[:WEIGHT]`` (weight default 1), or a list of them
(stacked). Paths in a spec are taken from the spec's folder. A cell is identified by each file's sha256 and
weight, not by its path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.files import sha256_file
from ldm_inpaint.lora.files import parse_lora_argument

LORA = "lora"
NONE = "none"


@dataclass(frozen=True)
class LoRARef:
    """A LoRA file, the weight its update is applied at, and the file's sha256."""

    path: Path
    weight: float
    sha256: str


def lora_refs(value: object, base: Path, what: str = LORA) -> tuple[LoRARef, ...]:
    """A spec or command-line value as the LoRAs it names (``()``: none); LdmInpaintError if it names none
    properly or a file is missing."""
    items = [] if value is None or value == NONE else value if isinstance(value, list) else [value]
    refs = []
    for item in items:
        if not isinstance(item, str | Path) or str(item) in ("", NONE):
            raise LdmInpaintError(f"{what}: expected none, FILE[:WEIGHT] or a list of them, found {value!r}")
        path, weight = parse_lora_argument(str(item))
        path = base / path
        if not path.is_file():
            raise LdmInpaintError(f"{what}: LoRA file not found: {path}")
        refs.append(LoRARef(path, weight, sha256_file(path)))
    return tuple(refs)


def lora_label(refs: tuple[LoRARef, ...]) -> str:
    """As grid labels show it: ``none`` or ``NAME:WEIGHT+...``."""
    return "+".join(f"{ref.path.name}:{ref.weight:g}" for ref in refs) or NONE


def lora_spec(refs: tuple[LoRARef, ...]) -> str | list[str]:
    """As a resolved spec writes it: ``none`` or a list of ``ABSOLUTE_PATH:WEIGHT``."""
    return [f"{ref.path.resolve()}:{ref.weight!r}" for ref in refs] if refs else NONE


def lora_identity(refs: tuple[LoRARef, ...]) -> list[dict[str, object]]:
    """What identifies the LoRAs' effect on a result: each file's sha256 and weight, in order."""
    return [{"sha256": ref.sha256, "weight": ref.weight} for ref in refs]


def lora_row(refs: tuple[LoRARef, ...]) -> dict[str, str | None]:
    """The results columns: ``lora`` (``ABSOLUTE_PATH:WEIGHT; ...``) and ``lora_sha256``; None for none."""
    if not refs:
        return {LORA: None, "lora_sha256": None}
    return {
        LORA: "; ".join(f"{ref.path.resolve()}:{ref.weight:g}" for ref in refs),
        "lora_sha256": "; ".join(ref.sha256 for ref in refs),
    }
