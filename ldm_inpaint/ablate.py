"""``ldm-inpaint ablate``: sweep inpainting parameters and checkpoints over image/mask pairs.

A study is checkpoints x pairs x the product of the swept values, with every other parameter fixed. It comes
from a small YAML spec (``ldm_inpaint/configs/ablations/example.yaml``), from the command line, or both (the command line
wins). Each cell is one inpainting run of one sample. Under ``--out``:

- ``cells/<pair>-<hash>-NNNNN.png``: the result, its parameters in PNG text chunks;
- ``results.jsonl`` and ``results.csv``, appended to: one row per cell and attempt with every parameter, the
  checkpoint's sha256, the wall time, the number of UNet evaluations, and the mean absolute change of the
  pixels (in [0, 1]) outside the mask (how well the known region is kept) and inside it;
- ``grid-<pair>[-pN]-NNNNN.png``: labelled grids (the first swept key down the rows, the second across the
  columns; one key: across; one grid per value combination of any further keys);
- ``spec-<hash>.yaml``: the resolved study, which ``--spec`` runs again.

A cell's hash covers everything that decides its result: every parameter, the contents (sha256) of the
checkpoint, image and mask files, the config, EMA and precision. A cell with an ``ok`` row whose image exists
is finished and skipped when the study runs again; failed cells are tried again. Nothing is overwritten.
Shared work is done once: pairs are read once, each checkpoint is loaded once into one pipeline and its cells
run together, through the pipeline's caches of text contexts and masked-image latents.
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import itertools
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from ldm_inpaint import __version__, image_io
from ldm_inpaint.checkpoint import load_model, sha256_file
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.models.packing import can_pack
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.samplers import SAMPLERS
from ldm_inpaint.tools import DTYPES as PRECISIONS

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

PROG = "ldm-inpaint ablate"
CHECKPOINT = "checkpoint"


class SpecError(LdmInpaintError):
    """A study that cannot run: unknown keys, values of the wrong type, missing files."""


# ------------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Parameter:
    """One parameter of a cell: its value type, default (the ``ldm-inpaint`` command's), the pipeline
    keyword it feeds, and its allowed values. ``optional``: None ("none") is allowed too."""

    kind: type
    default: object
    keyword: str
    help: str
    choices: tuple[str, ...] = ()
    optional: bool = False


PARAMETERS: dict[str, Parameter] = {
    "prompt": Parameter(str, "", "prompt", "text prompt"),
    "negative_prompt": Parameter(str, "", "negative_prompt", "negative prompt"),
    "sampler": Parameter(str, "ddim", "sampler", "sampler", choices=tuple(sorted(SAMPLERS))),
    "steps": Parameter(int, 50, "steps", "sampling steps"),
    "scale": Parameter(float, 7.5, "guidance_scale", "classifier-free guidance scale"),
    "eta": Parameter(float, 0.0, "eta", "injected noise (DDIM eta; the ancestral samplers' noise scale)"),
    "seed": Parameter(int, 42, "seed", "seed of the start noise"),
    "strength": Parameter(float, 1.0, "strength", "start from the original latent noised to this level"),
    "mask_grow": Parameter(int, 0, "mask_grow", "dilate the mask by this many pixels"),
    "mask_blur": Parameter(float, 0.0, "mask_blur", "Gaussian sigma (px) of the paste-back edge"),
    "mask_mode": Parameter(str, "nearest", "mask_mode", "mask to latent size", choices=("max", "nearest")),
    "paste_back": Parameter(bool, False, "paste_back", "keep the original pixels outside the mask"),
    "crop_to_mask": Parameter(
        int, None, "crop_to_mask", "inpaint only the box around the mask (+ this padding)", optional=True
    ),
    "long_prompts": Parameter(bool, False, "long_prompts", "encode text beyond 75 tokens in extra windows"),
}
SWEEPABLE = (CHECKPOINT, *PARAMETERS)
_KIND_NAMES = {int: "an integer", float: "a finite number", str: "text", bool: "true or false"}
_BOOLEAN_TEXT = dict.fromkeys(("true", "yes", "on", "1"), True) | dict.fromkeys(
    ("false", "no", "off", "0"), False
)


def coerce(name: str, value: object) -> object:
    """``value`` (from YAML, or a command-line string) as a value of parameter ``name``; SpecError if it is
    not one. Strings are parsed for numbers and booleans; text parameters take strings only."""
    if name not in PARAMETERS:
        raise SpecError(f"unknown parameter {name!r}; allowed: {', '.join(SWEEPABLE)}")
    parameter = PARAMETERS[name]
    if parameter.optional and (
        value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
    ):
        return None
    try:
        converted = _convert(parameter.kind, value)
    except (TypeError, ValueError):
        expected = _KIND_NAMES[parameter.kind] + (" or none" if parameter.optional else "")
        raise SpecError(f"{name}: expected {expected}, found {value!r}") from None
    if parameter.choices and converted not in parameter.choices:
        raise SpecError(f"{name}: expected one of {', '.join(parameter.choices)}, found {value!r}")
    return converted


def _convert(kind: type, value: object) -> object:
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if kind is bool and text not in _BOOLEAN_TEXT:
            raise ValueError(value)
        value = _BOOLEAN_TEXT[text] if kind is bool else kind(text)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is float and is_number and math.isfinite(value):
        return float(value)
    raise TypeError(value)


def format_value(value: object) -> str:
    """A value as the grid labels show it."""
    if isinstance(value, CheckpointRef):
        return value.path.name
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "none"
    return '""' if value == "" else str(value)


# ---------------------------------------------------------------------------------------------------- studies


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint file and its config (a YAML path or bundled name; None: detected from the weights)."""

    path: Path
    config: str | None = None


@dataclass
class Pair:
    """An image and its mask, read once: (1, 3, H, W) in [-1, 1] and (1, 1, H, W) in {0, 1}."""

    name: str
    image_path: Path
    mask_path: Path
    image: Tensor
    mask: Tensor
    identity: dict[str, object]


@dataclass
class Study:
    """What to run: every parameter not swept in ``fixed``; swept keys in order (rows, columns, pages)."""

    pairs: list[Pair]
    fixed: dict[str, object]
    sweep: dict[str, list[object]]
    use_ema: bool = False
    resize_mask: bool = False

    @property
    def checkpoints(self) -> list[CheckpointRef]:
        return self.sweep[CHECKPOINT] if CHECKPOINT in self.sweep else [self.fixed[CHECKPOINT]]


@dataclass(frozen=True)
class Cell:
    """One run: a pair, a checkpoint, every parameter; ``position`` is its swept values, in sweep order."""

    pair: Pair
    checkpoint: CheckpointRef
    checkpoint_sha256: str
    parameters: dict[str, object]
    position: tuple[object, ...]
    hash: str


SPEC_KEYS = ("checkpoint", "config", "use_ema", "pairs", "resize_mask", "fixed", "sweep")


def read_spec(path: Path) -> dict[str, Any]:
    """The YAML spec as a dict, its top-level keys checked (see ``ldm_inpaint/configs/ablations/example.yaml``)."""
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(f"cannot read the spec {path}: {error}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"the spec {path} is not valid YAML: {error}") from None
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        raise SpecError(f"spec {path}: expected a mapping with keys {', '.join(SPEC_KEYS)}, found {spec!r}")
    unknown = [key for key in spec if key not in SPEC_KEYS]
    if unknown:
        raise SpecError(
            f"spec {path}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(SPEC_KEYS)}"
        )
    return spec


def _mapping(spec: dict[str, Any], key: str) -> dict[str, Any]:
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        raise SpecError(f"{key}: expected a mapping of parameter names to values, found {value!r}")
    return value


def _boolean(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{what}: expected true or false, found {value!r}")
    return value


def _config_ref(config: object, base: Path) -> str | None:
    """A config as given (path or bundled name), a path taken relative to ``base`` when it exists there."""
    if config is None:
        return None
    if not isinstance(config, str | Path):
        raise SpecError(f"config: expected a YAML path or a bundled config name, found {config!r}")
    return str(base / config) if (base / config).exists() else str(config)


def _checkpoint_ref(value: object, base: Path, config: str | None) -> CheckpointRef:
    """``path`` or ``{path: ..., config: ...}``, relative to ``base``; ``config`` when none is given."""
    if isinstance(value, dict) and set(value) <= {"path", "config"} and "path" in value:
        path, config = value["path"], _config_ref(value.get("config"), base) or config
    else:
        path = value
    if not isinstance(path, str | Path):
        raise SpecError(
            f"checkpoint: expected a file path or {{path: FILE, config: CONFIG}}, found {value!r}"
        )
    return CheckpointRef(base / path, config)


def _sweep_values(key: str, values: object, base: Path, config: str | None) -> list[object]:
    if key not in SWEEPABLE:
        raise SpecError(f"sweep: unknown parameter {key!r}; allowed: {', '.join(SWEEPABLE)}")
    if not isinstance(values, list) or not values:
        raise SpecError(f"sweep {key}: expected a non-empty list of values, found {values!r}")
    converted = [_checkpoint_ref(v, base, config) if key == CHECKPOINT else coerce(key, v) for v in values]
    if len(set(map(repr, converted))) != len(converted):
        raise SpecError(f"sweep {key}: expected distinct values, found {values!r}")
    return converted


def _parse_sweep_option(text: str) -> tuple[str, list[object]]:
    """``KEY=V1,V2,...`` or ``KEY=[V1, "V2, with a comma"]`` (a YAML list) from ``--sweep``."""
    key, sep, values = text.partition("=")
    if not sep or not values:
        raise SpecError(f"--sweep: expected KEY=V1,V2,... (keys: {', '.join(SWEEPABLE)}), found {text!r}")
    if values.lstrip().startswith("["):
        try:
            return key.strip(), yaml.safe_load(values)
        except yaml.YAMLError as error:
            raise SpecError(f"--sweep {key}: not a YAML list: {values!r} ({error})") from None
    return key.strip(), [value.strip() for value in values.split(",")]


def build_study(args: argparse.Namespace) -> Study:
    """The study of a spec file and the command line; the command line wins. Relative paths in a spec are
    taken from the spec's folder. Reads every pair (checking paths and sizes) and checks every checkpoint
    path and config; nothing is loaded."""
    spec = read_spec(args.spec) if args.spec else {}
    base = args.spec.parent if args.spec else Path()
    spec_fixed, spec_sweep = _mapping(spec, "fixed"), _mapping(spec, "sweep")
    both = [key for key in spec_fixed if key in spec_sweep]
    if both:
        raise SpecError(f"{', '.join(both)}: given both as fixed and as swept; keep one")
    if CHECKPOINT in spec_fixed:
        raise SpecError("fixed: give the checkpoint as 'checkpoint:' at the top of the spec")
    config = _config_ref(spec.get("config"), base)
    fixed: dict[str, object] = {name: parameter.default for name, parameter in PARAMETERS.items()}
    fixed.update({key: coerce(key, value) for key, value in spec_fixed.items()})
    sweep = {key: _sweep_values(key, values, base, config) for key, values in spec_sweep.items()}

    checkpoints = spec.get(CHECKPOINT)
    if checkpoints is not None and CHECKPOINT in sweep:
        raise SpecError("give the checkpoints either as 'checkpoint:' or under 'sweep:', not both")
    if isinstance(checkpoints, list):
        refs = _sweep_values(CHECKPOINT, checkpoints, base, config)
        if len(refs) > 1:
            sweep = {CHECKPOINT: refs, **sweep}
        else:
            fixed[CHECKPOINT] = refs[0]
    elif checkpoints is not None:
        fixed[CHECKPOINT] = _checkpoint_ref(checkpoints, base, config)

    sweep = _apply_command_line(args, fixed, sweep)
    if CHECKPOINT not in fixed and CHECKPOINT not in sweep:
        raise SpecError("no checkpoint: give --ckpt, or 'checkpoint:' in the spec")
    for key in sweep:
        fixed.pop(key, None)
    use_ema = args.use_ema if args.use_ema is not None else _boolean(spec.get("use_ema", False), "use_ema")
    resize_mask = args.resize_mask
    if resize_mask is None:
        resize_mask = _boolean(spec.get("resize_mask", False), "resize_mask")
    study = Study(_read_pairs(args, spec, base, resize_mask), fixed, sweep, use_ema, resize_mask)
    for ref in study.checkpoints:
        if not ref.path.is_file():
            raise SpecError(f"checkpoint not found: {ref.path}")
        if ref.config is not None:
            load_config(ref.config)
    return study


def _apply_command_line(
    args: argparse.Namespace, fixed: dict[str, object], sweep: dict[str, list[object]]
) -> dict[str, list[object]]:
    """Command-line values over the spec's, into ``fixed``; returns the new sweep. A fixed value unsweeps its
    key, ``--sweep`` replaces a key's values in place (a new key goes last), several ``--ckpt`` form the
    checkpoint axis (the first axis, unless the spec placed it)."""
    sweep = dict(sweep)
    configs = [str(config) for config in args.config or []]
    if args.ckpt:
        if len(configs) not in (0, 1, len(args.ckpt)):
            raise SpecError(
                f"--config: expected one, or one per --ckpt ({len(args.ckpt)}), found {len(configs)}"
            )
        if len(configs) <= 1:
            configs = (configs or [None]) * len(args.ckpt)
        refs = [CheckpointRef(Path(path), config) for path, config in zip(args.ckpt, configs, strict=True)]
        if len(refs) == 1:
            fixed[CHECKPOINT] = refs[0]
            sweep.pop(CHECKPOINT, None)
        elif CHECKPOINT in sweep:
            sweep[CHECKPOINT] = refs
        else:
            sweep = {CHECKPOINT: refs, **sweep}
    elif configs:
        if len(configs) != 1:
            raise SpecError(f"--config: expected one config for the spec's checkpoints, found {len(configs)}")
        if CHECKPOINT in fixed:
            fixed[CHECKPOINT] = replace(fixed[CHECKPOINT], config=configs[0])
        if CHECKPOINT in sweep:
            sweep[CHECKPOINT] = [replace(ref, config=configs[0]) for ref in sweep[CHECKPOINT]]
    for name in PARAMETERS:
        value = getattr(args, name)
        if value is not None:
            fixed[name] = coerce(name, value)
            sweep.pop(name, None)
    for option in args.sweep or []:
        key, values = _parse_sweep_option(option)
        config = configs[0] if len(configs) == 1 else None
        sweep[key] = _sweep_values(key, values, Path(), config)
    return sweep


def _read_pairs(args: argparse.Namespace, spec: dict[str, Any], base: Path, resize_mask: bool) -> list[Pair]:
    """The (image, mask) pairs of ``--image/--mask``, ``--batch`` or the spec's ``pairs:``, read and checked."""
    images, masks_ = args.image or [], args.mask or []
    if (images or masks_) and args.batch:
        raise SpecError("give pairs either as --image/--mask or as --batch, not both")
    if images or masks_:
        if len(images) != len(masks_):
            raise SpecError(
                f"--image and --mask come in pairs: found {len(images)} image(s), {len(masks_)} mask(s)"
            )
        paths = list(zip(images, masks_, strict=True))
    elif args.batch:
        paths = _batch(args.batch)
    elif "pairs" in spec:
        paths = _spec_pairs(spec["pairs"], base)
    else:
        raise SpecError("no image/mask pairs: give --image/--mask, --batch, or 'pairs:' in the spec")
    pairs = [_read_pair(Path(image), Path(mask), resize_mask) for image, mask in paths]
    names = [pair.name for pair in pairs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SpecError(
            f"pairs are named after their images, which must differ: found {', '.join(duplicates)} twice"
        )
    return pairs


def _batch(source: Path) -> list[tuple[Path, Path]]:
    paths, problems = image_io.find_pairs(source)
    if problems:
        raise SpecError(f"{len(problems)} problem(s) with the pairs of {source}: " + "; ".join(problems))
    return paths


def _spec_pairs(value: object, base: Path) -> list[tuple[Path, Path]]:
    """``pairs:`` is a folder / list file (as ``--batch``) or a list of ``{image: PATH, mask: PATH}``."""
    if isinstance(value, str):
        return _batch(base / value)
    if not isinstance(value, list) or not value:
        raise SpecError(
            f"pairs: expected a folder, a list file or a list of {{image, mask}}, found {value!r}"
        )
    paths = []
    for item in value:
        if not (isinstance(item, dict) and set(item) == {"image", "mask"}):
            raise SpecError(f"pairs: expected {{image: PATH, mask: PATH}}, found {item!r}")
        paths.append((base / item["image"], base / item["mask"]))
    return paths


def _read_pair(image_path: Path, mask_path: Path, resize_mask: bool) -> Pair:
    image, mask = image_io.load_image(image_path), image_io.load_image(mask_path)
    if resize_mask:
        mask = image_io.resize_mask(mask, image.size)
    image_io.check_same_size(image, mask)
    identity = {
        "image_sha256": sha256_file(image_path),
        "mask_sha256": sha256_file(mask_path),
        "resize_mask": resize_mask,
    }
    tensors = image_io.image_to_tensor(image), image_io.mask_to_tensor(mask)
    return Pair(image_path.stem, image_path, mask_path, *tensors, identity)


def _checkpoint_identity(ref: CheckpointRef, use_ema: bool) -> dict[str, object]:
    """What identifies a checkpoint's results: its file's sha256, its config's contents (None: detected from
    the weights, which the sha256 fixes), EMA."""
    config = None
    if ref.config is not None:
        config = {key: value for key, value in asdict(load_config(ref.config)).items() if key != "name"}
    return {"sha256": sha256_file(ref.path), "config": config, "use_ema": use_ema}


def cell_hash(identity: dict[str, object]) -> str:
    """12 hex digits of the sha256 of the canonical JSON of everything that decides a cell's result."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def expand(study: Study, precision: str) -> list[Cell]:
    """Every cell of the study, grouped by checkpoint (in axis order), then by pair, then in sweep order."""
    cells = []
    for ref in study.checkpoints:
        checkpoint_identity = _checkpoint_identity(ref, study.use_ema)
        sha256 = checkpoint_identity["sha256"]
        for pair in study.pairs:
            for position in itertools.product(*study.sweep.values()):
                values = dict(zip(study.sweep, position, strict=True))
                if values.get(CHECKPOINT, ref) != ref:
                    continue
                parameters = {
                    name: values[name] if name in values else study.fixed[name] for name in PARAMETERS
                }
                identity = {
                    "parameters": parameters,
                    "checkpoint": checkpoint_identity,
                    "pair": pair.identity,
                    "precision": precision,
                }
                cells.append(Cell(pair, ref, sha256, parameters, position, cell_hash(identity)))
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
    spec["fixed"] = {name: value for name, value in study.fixed.items() if name != CHECKPOINT}
    spec["sweep"] = {
        key: [checkpoint(value) if key == CHECKPOINT else value for value in values]
        for key, values in study.sweep.items()
    }
    return spec


def write_spec(study: Study, out: Path) -> Path:
    """``out/spec-<hash>.yaml``, named after its contents: running the same study again reuses the file."""
    text = "# ldm-inpaint ablate: the resolved study; run it again with --spec this-file --out FOLDER\n"
    text += yaml.safe_dump(resolved_spec(study), sort_keys=False, allow_unicode=True, width=1000)
    path = out / f"spec-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"
    if not path.exists():
        path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- results

COLUMNS = (
    "hash",
    "status",
    "error",
    "pair",
    "image",
    "mask",
    "resize_mask",
    CHECKPOINT,
    "checkpoint_sha256",
    "config",
    "use_ema",
    "precision",
    "device",
    *PARAMETERS,
    "cell_image",
    "wall_seconds",
    "unet_evaluations",
    "steps_taken",
    "change_outside",
    "change_inside",
    "finished_at",
    "software",
)


class Results:
    """The append-only result files of a study folder, ``results.jsonl`` and ``results.csv`` (same rows)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.jsonl, self.csv = out / "results.jsonl", out / "results.csv"
        self.rows: dict[str, list[dict[str, object]]] = {}  # hash -> its rows, oldest first
        if self.csv.exists():
            with self.csv.open(newline="", encoding="utf-8") as file:
                header = next(csv.reader(file), [])
            if tuple(header) != COLUMNS:
                raise SpecError(
                    f"{self.csv} has other columns than this version writes; use a new --out folder"
                )
        if self.jsonl.exists():
            for number, line in enumerate(self.jsonl.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict):
                    self.rows.setdefault(str(row.get("hash")), []).append(row)
                elif line.strip():
                    warnings.warn(
                        f"{self.jsonl} line {number} is not a JSON object (cut short?): ignored", stacklevel=2
                    )

    def finished(self, cell: Cell) -> bool:
        """True if the cell has an ``ok`` row and its image file exists."""
        row = self.latest(cell)
        return row is not None and row["status"] == "ok"

    def latest(self, cell: Cell) -> dict[str, object] | None:
        """The cell's last ``ok`` row whose image exists, else its last failed attempt, else None."""
        rows = self.rows.get(cell.hash, [])
        for row in reversed(rows):
            if row.get("status") == "ok" and (self.out / str(row.get("cell_image"))).is_file():
                return row
        failed = [row for row in rows if row.get("status") != "ok"]
        return failed[-1] if failed else None

    def append(self, row: dict[str, object]) -> None:
        new_csv = not self.csv.exists()
        with self.jsonl.open("a", encoding="utf-8") as file:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
        with self.csv.open("a", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS)
            if new_csv:
                writer.writeheader()
            writer.writerow({key: "" if row[key] is None else row[key] for key in COLUMNS})
        self.rows.setdefault(str(row["hash"]), []).append(row)


def mask_change(original: Tensor, result: Tensor, mask: Tensor) -> tuple[float | None, float | None]:
    """Mean absolute change of the pixels (values in [0, 1], over pixels and channels) outside and inside the
    mask, None for an empty region. ``original`` and ``result`` (1, 3, H, W) in [-1, 1], ``mask`` (1, 1, H, W)."""
    change = (result.float().clamp(-1, 1) - original.float().clamp(-1, 1)).abs() / 2
    inside = (mask >= 0.5).expand_as(change)  # (1, 1, H, W) -> (1, 3, H, W)
    outside_values, inside_values = change[~inside], change[inside]
    return tuple(
        values.mean().item() if values.numel() else None for values in (outside_values, inside_values)
    )


# ---------------------------------------------------------------------------------------------------- running


@dataclass
class Runner:
    """Runs a study's cells into ``out``: one pipeline per checkpoint, a row per attempt."""

    study: Study
    out: Path
    device: str
    precision: str
    results: Results

    def base_row(self, cell: Cell) -> dict[str, object]:
        return {
            "hash": cell.hash,
            "status": "failed",
            "error": None,
            "pair": cell.pair.name,
            "image": str(cell.pair.image_path.resolve()),
            "mask": str(cell.pair.mask_path.resolve()),
            "resize_mask": self.study.resize_mask,
            CHECKPOINT: str(cell.checkpoint.path.resolve()),
            "checkpoint_sha256": cell.checkpoint_sha256,
            "config": cell.checkpoint.config,
            "use_ema": self.study.use_ema,
            "precision": self.precision,
            "device": self.device,
            **cell.parameters,
            "cell_image": None,
            "wall_seconds": None,
            "unet_evaluations": None,
            "steps_taken": None,
            "change_outside": None,
            "change_inside": None,
            "finished_at": None,
            "software": f"ldm-inpaint {__version__}",
        }

    def record(self, row: dict[str, object], **updates: object) -> None:
        self.results.append(
            {**row, **updates, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        )

    def run(self, cells: list[Cell]) -> None:
        """Every unfinished cell, checkpoint by checkpoint; a checkpoint without work is not loaded."""
        pending = [cell for cell in cells if not self.results.finished(cell)]
        with tqdm(
            total=len(cells), initial=len(cells) - len(pending), unit="cell", desc="ablate", file=sys.stderr
        ) as bar:
            for ref in self.study.checkpoints:
                todo = [cell for cell in pending if cell.checkpoint == ref]
                if todo:
                    self.run_checkpoint(ref, todo, bar)
                    gc.collect()  # the checkpoint's pipeline is gone: free it before loading the next
                    if torch.device(self.device).type == "cuda":
                        torch.cuda.empty_cache()

    def run_checkpoint(self, ref: CheckpointRef, cells: list[Cell], bar: tqdm) -> None:
        try:
            dtype = PRECISIONS[self.precision]
            loaded = load_model(
                ref.path,
                ref.config,
                use_ema=self.study.use_ema,
                dtype=dtype,
                device=self.device,
                pack=can_pack(self.device, dtype),
            )
        except (LdmInpaintError, RuntimeError, OSError) as error:
            for cell in cells:
                self.record(self.base_row(cell), error=f"cannot load the checkpoint: {error}")
                bar.update(1)
            return
        how = "detected from the checkpoint" if loaded.detected else "given"
        bar.write(f"{PROG}: {ref.path.name}: config {loaded.config.name} ({how})", file=sys.stderr)
        pipeline = InpaintPipeline(loaded.model)
        for cell in cells:
            bar.set_postfix_str(f"{cell.pair.name} {cell.hash}")
            self.run_cell(pipeline, cell, self.base_row(cell) | {"config": pipeline.config.name})
            bar.update(1)

    def run_cell(self, pipeline: InpaintPipeline, cell: Cell, row: dict[str, object]) -> None:
        keywords = {PARAMETERS[name].keyword: value for name, value in cell.parameters.items()}
        start = time.perf_counter()
        try:
            result = pipeline(cell.pair.image, cell.pair.mask, **keywords)
        except (LdmInpaintError, RuntimeError) as error:
            self.record(row, error=str(error), wall_seconds=time.perf_counter() - start)
            return
        wall_seconds = time.perf_counter() - start
        outside, inside = mask_change(cell.pair.image, result.images, cell.pair.mask)
        metadata = {key: str(value) for key, value in row.items() if value is not None and key != "status"}
        png = image_io.save_png(
            result.to_pil()[0], self.out / "cells", f"{cell.pair.name}-{cell.hash}", metadata
        )
        self.record(
            row,
            status="ok",
            cell_image=png.relative_to(self.out).as_posix(),
            wall_seconds=wall_seconds,
            unet_evaluations=result.unet_evaluations,
            steps_taken=result.steps_taken,
            change_outside=outside,
            change_inside=inside,
        )


# ------------------------------------------------------------------------------------------------------ grids


def _caption(row: dict[str, object] | None, cell: Cell) -> tuple[str, str]:
    if row is None or row["status"] != "ok":
        return cell.hash, "FAILED"
    first = f"{cell.hash} {row['unet_evaluations']} ev {row['wall_seconds']:.1f} s"
    inside = "-" if row["change_inside"] is None else f"{row['change_inside']:.3f}"
    outside = "-" if row["change_outside"] is None else f"{row['change_outside']:.3f}"
    return first, f"out {outside} in {inside}"


def write_grids(study: Study, cells: list[Cell], results: Results, out: Path) -> list[Path]:
    """One grid per pair and value combination of the third and further swept keys; returns their paths."""
    axes = list(study.sweep.items())
    row_axis = axes[0] if len(axes) >= 2 else None
    column_axis = axes[1] if len(axes) >= 2 else (axes[0] if axes else None)
    row_values = row_axis[1] if row_axis else [None]
    column_values = column_axis[1] if column_axis else [None]
    pages = list(itertools.product(*(values for _, values in axes[2:])))
    by_position = {(cell.pair.name, cell.position): cell for cell in cells}
    written = []
    for pair in study.pairs:
        for number, page in enumerate(pages, start=1):
            grid_cells = [
                [
                    by_position[(pair.name, _position(len(axes), row, column, page))]
                    for column in column_values
                ]
                for row in row_values
            ]
            tiles = [[_tile(cell, results.latest(cell), out) for cell in line] for line in grid_cells]
            page_text = ", ".join(
                f"{key}={format_value(value)}" for (key, _), value in zip(axes[2:], page, strict=True)
            )
            title = f"{pair.name} ({pair.image_path.name})" + (f" | {page_text}" if page_text else "")
            grid = image_io.draw_grid(
                title,
                _labels(row_axis),
                _labels(column_axis),
                tiles,
                (pair.image.shape[-1], pair.image.shape[-2]),
            )
            metadata = {
                "pair": pair.name,
                "rows": row_axis[0] if row_axis else "",
                "columns": column_axis[0] if column_axis else "",
                "page": page_text,
                "cells": " ".join(cell.hash for line in grid_cells for cell in line),
                "software": f"ldm-inpaint {__version__}",
            }
            stem = f"grid-{pair.name}" + (f"-p{number}" if len(pages) > 1 else "")
            written.append(image_io.save_png(grid, out, stem, metadata))
    return written


def _labels(axis: tuple[str, list[object]] | None) -> tuple[str, list[str]] | None:
    return None if axis is None else (axis[0], [format_value(value) for value in axis[1]])


def _position(axes: int, row: object, column: object, page: tuple[object, ...]) -> tuple[object, ...]:
    """A cell's swept values from its grid row, column and page (one axis: the columns; none: one cell)."""
    if axes >= 2:
        return (row, column, *page)
    return (column,) if axes == 1 else ()


def _tile(
    cell: Cell, row: dict[str, object] | None, out: Path
) -> tuple[PILImage | None, tuple[str, str], str]:
    if row is not None and row["status"] == "ok":
        return image_io.load_image(out / str(row["cell_image"])).convert("RGB"), _caption(row, cell), ""
    return None, _caption(row, cell), f"failed: {row['error'] if row else 'not run'}"


# -------------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Sweep sampling parameters and checkpoints over image/mask pairs: one labelled grid per "
        "pair, one CSV/JSON row per cell. Re-running skips finished cells.",
        epilog=f"sweepable keys: {', '.join(SWEEPABLE)}. Values given here override the spec's.",
    )
    parser.add_argument(
        "--spec", type=Path, help="YAML study (see ldm_inpaint/configs/ablations/example.yaml)"
    )
    parser.add_argument("--out", type=Path, required=True, help="study folder (created; re-running resumes)")
    parser.add_argument(
        "--ckpt", type=Path, action="append", help="checkpoint; give it several times for a checkpoint axis"
    )
    parser.add_argument(
        "--config",
        action="append",
        help="YAML config for all checkpoints, or one per --ckpt (default: detected)",
    )
    parser.add_argument("--use-ema", action=argparse.BooleanOptionalAction, help="load the model_ema.* copy")
    parser.add_argument(
        "--image", type=Path, action="append", help="image to inpaint (repeatable, with --mask)"
    )
    parser.add_argument("--mask", type=Path, action="append", help="its mask: white = repaint")
    parser.add_argument(
        "--batch", type=Path, help="folder of X.png + X_mask.png pairs, or a text file of pairs"
    )
    parser.add_argument(
        "--resize-mask",
        action=argparse.BooleanOptionalAction,
        help="resize masks of another size to the image",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help='swept values, in grid order (rows, columns, pages); a YAML list for values with commas: KEY=["a, b", c]',
    )
    fixed = parser.add_argument_group("fixed parameters (default: the ldm-inpaint command's)")
    for name, parameter in PARAMETERS.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{parameter.help} (default {format_value(parameter.default)})"
        if parameter.kind is bool:
            fixed.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            fixed.add_argument(flag, dest=name, metavar=name.upper(), help=help_text)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--precision", default="fp32", choices=sorted(PRECISIONS), help="weights/compute dtype"
    )
    return parser


def ablate_main(argv: Sequence[str] | None = None) -> int:
    """``ldm-inpaint ablate``: 0 if every cell succeeded, 1 if any failed, 2 for a study that cannot run."""
    args = build_parser().parse_args(argv)
    try:
        study = build_study(args)
        cells = expand(study, args.precision)
        results = Results(args.out)
        args.out.mkdir(parents=True, exist_ok=True)
        spec_path = write_spec(study, args.out)
        done = sum(results.finished(cell) for cell in cells)
        shape = " x ".join(
            [f"{len(study.pairs)} pair(s)", *(f"{len(values)} {key}" for key, values in study.sweep.items())]
        )
        print(
            f"{PROG}: {len(cells)} cells ({shape}); {done} finished before, {len(cells) - done} to run",
            file=sys.stderr,
        )
        precision = "" if args.precision == "fp32" else f" --precision {args.precision}"
        print(
            f"{PROG}: reproduce with: ldm-inpaint ablate --spec {spec_path} --out {args.out}{precision}",
            file=sys.stderr,
        )
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        Runner(study, args.out, device, args.precision, results).run(cells)
        for path in write_grids(study, cells, results, args.out):
            print(path)
    except LdmInpaintError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(results.jsonl)
    print(results.csv)
    failed = [(cell, results.latest(cell)) for cell in cells if not results.finished(cell)]
    if failed:
        print(f"{PROG}: {len(failed)} of {len(cells)} cell(s) failed:", file=sys.stderr)
        for cell, row in failed:
            print(f"  {cell.pair.name} {cell.hash}: {row['error'] if row else 'not run'}", file=sys.stderr)
        return 1
    return 0
