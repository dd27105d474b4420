"""A study: what ``ldm-inpaint ablate`` runs, from a YAML spec and the command line (the command line wins).

A study is checkpoints x image/mask pairs x the product of the swept values, every other option fixed. Swept
and fixed keys are the sweepable fields of :class:`~ldm_inpaint.options.InpaintOptions` (their values parsed
and checked by :mod:`ldm_inpaint.options`, their defaults its defaults) and ``checkpoint``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from ldm_inpaint import image_io, options
from ldm_inpaint.ablation.lora_axis import LORA, lora_label, lora_refs
from ldm_inpaint.checkpoint_files import is_model_folder
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.files import sha256_file
from ldm_inpaint.options import InpaintOptions, OptionError
from ldm_inpaint.pairs import find_pairs

CHECKPOINT = "checkpoint"
SWEEPABLE = (CHECKPOINT, LORA, *options.SWEEPABLE)


class SpecError(LdmInpaintError):
    """A study that cannot run: unknown keys, values of the wrong type, missing files."""


def option_key(name: str) -> str:
    """A swept or fixed key's option name (``scale`` is ``guidance_scale``), or ``lora``; SpecError for an
    unknown one."""
    if name == LORA:
        return name
    key = options.ALIASES.get(name, name)
    if key not in options.SWEEPABLE:
        raise SpecError(f"unknown parameter {name!r}; allowed: {', '.join(SWEEPABLE)}")
    return key


def coerce(name: str, value: object) -> object:
    """``value`` (from YAML, or a command-line string) as a value of option ``name``; SpecError if it is not
    one. Strings are parsed for numbers and booleans; text options take strings only."""
    try:
        return options.parse_value(option_key(name), value)
    except OptionError as error:
        raise SpecError(str(error)) from None


def _value(name: str, value: object, base: Path) -> object:
    """A fixed or swept value of ``name``: the LoRAs of a ``lora`` value (paths from ``base``), else
    :func:`coerce`."""
    if option_key(name) != LORA:
        return coerce(name, value)
    try:
        return lora_refs(value, base)
    except LdmInpaintError as error:
        raise SpecError(str(error)) from None


def format_value(value: object) -> str:
    """A value as the grid labels show it."""
    if isinstance(value, tuple):
        return lora_label(value)
    if isinstance(value, CheckpointRef):
        return value.path.name
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "none"
    return '""' if value == "" else str(value)


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


class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``): a spec needs none, and a few bytes of nested aliases
    can stand for gigabytes once expanded (a "billion laughs")."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecError(
                f"line {event.start_mark.line + 1}: expected plain values, found the alias *{event.anchor}; "
                "write the value out"
            )
        return super().compose_node(parent, index)


SPEC_KEYS = ("checkpoint", "config", "use_ema", "pairs", "resize_mask", "fixed", "sweep")


def read_spec(path: Path) -> dict[str, Any]:
    """The YAML spec as a dict, its top-level keys checked (see ``examples/ablation.yaml``)."""
    try:
        spec = yaml.load(path.read_text(encoding="utf-8"), Loader=_SpecLoader)
    except (OSError, UnicodeDecodeError) as error:
        raise SpecError(f"cannot read the spec {path}: {error}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"the spec {path} is not valid YAML: {error}") from None
    except SpecError as error:
        raise SpecError(f"spec {path}: {error}") from None
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


def _sweep_key(key: str) -> str:
    """A swept key's name: ``checkpoint`` or an option name."""
    if key == CHECKPOINT:
        return key
    try:
        return option_key(key)
    except SpecError as error:
        raise SpecError(f"sweep: {error}") from None


def _sweep_values(key: str, values: object, base: Path, config: str | None) -> list[object]:
    _sweep_key(key)
    if not isinstance(values, list) or not values:
        raise SpecError(f"sweep {key}: expected a non-empty list of values, found {values!r}")
    converted = [
        _checkpoint_ref(v, base, config) if key == CHECKPOINT else _value(key, v, base) for v in values
    ]
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
            return key.strip(), yaml.load(values, Loader=_SpecLoader)
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
    if CHECKPOINT in spec_fixed:
        raise SpecError("fixed: give the checkpoint as 'checkpoint:' at the top of the spec")
    both = [key for key in spec_fixed if option_key(key) in {_sweep_key(name) for name in spec_sweep}]
    if both:
        raise SpecError(f"{', '.join(both)}: given both as fixed and as swept; keep one")
    config = _config_ref(spec.get("config"), base)
    defaults = InpaintOptions()
    fixed: dict[str, object] = {LORA: (), **{name: getattr(defaults, name) for name in options.SWEEPABLE}}
    fixed.update({option_key(key): _value(key, value, base) for key, value in spec_fixed.items()})
    sweep = {_sweep_key(key): _sweep_values(key, values, base, config) for key, values in spec_sweep.items()}

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
    if options.RANDOM_SEED in [fixed.get("seed"), *sweep.get("seed", [])]:
        raise SpecError(
            f"seed: expected fixed seeds (a study resumes its cells by their options), found "
            f"{options.RANDOM_SEED}; give seeds, e.g. --sweep seed=1,2,3"
        )
    for key in sweep:
        fixed.pop(key, None)
    use_ema = args.use_ema if args.use_ema is not None else _boolean(spec.get("use_ema", False), "use_ema")
    resize_mask = args.resize_mask
    if resize_mask is None:
        resize_mask = _boolean(spec.get("resize_mask", False), "resize_mask")
    study = Study(_read_pairs(args, spec, base, resize_mask), fixed, sweep, use_ema, resize_mask)
    for ref in study.checkpoints:
        if not (ref.path.is_file() or is_model_folder(ref.path)):
            raise SpecError(
                f"checkpoint not found: {ref.path} (a checkpoint file or a diffusers model folder)"
            )
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
    if args.lora:
        fixed[LORA] = _value(LORA, args.lora, Path())
        sweep.pop(LORA, None)
    for name in options.SWEEPABLE:
        value = getattr(args, name)
        if value is not None:
            fixed[name] = value
            sweep.pop(name, None)
    for option in args.sweep or []:
        key, values = _parse_sweep_option(option)
        config = configs[0] if len(configs) == 1 else None
        sweep[_sweep_key(key)] = _sweep_values(key, values, Path(), config)
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
    paths, problems = find_pairs(source)
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
