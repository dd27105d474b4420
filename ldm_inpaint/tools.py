"""Checkpoint tools: ``ldm-inpaint convert`` (format, dtype, EMA, pruning) and ``ldm-inpaint inspect``.

Both read a file through :mod:`ldm_inpaint.checkpoint` (safe reading, Lightning unwrapping, sorting of the
entries, EMA naming, config detection) and check it with the loader's own strict checks. ``convert`` writes
the ORIGINAL key layout (SD1's text encoder stays in transformers' names), so its output still loads in the
original repositories, and it writes tensors only:

- ``.ckpt`` output is ``torch.save({"state_dict": tensors})``, what the original scripts read
  (``pl_sd["state_dict"]``) and what ``torch.load(weights_only=True)`` accepts;
- non-tensor entries (Lightning's ``global_step``, ``epoch``, ``optimizer_states``, ``callbacks``, ...) are
  left out, with a note, whatever the output format: safetensors cannot hold them, and a rule that depends on
  the format would make ``.ckpt -> .safetensors -> .ckpt`` lossy;
- ``--dtype`` converts floating tensors only, and never the 12 DDPM schedule buffers: they are the config's
  constants, rounding them moves the original code's sampling, and the loader's schedule cross-check refuses
  bf16-rounded ones (relative error up to 2^-8) and fp16-rounded ones stored as fp32.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ldm_inpaint.checkpoint import (
    SCHEDULE_KEYS,
    SortedEntries,
    apply_ema,
    build_model,
    check_fit,
    check_schedule,
    check_weights,
    preview_keys,
    resolve_config,
    sort_entries,
    to_file_layout,
)
from ldm_inpaint.checkpoint_files import read_checkpoint
from ldm_inpaint.command import Parser
from ldm_inpaint.config import ModelConfig
from ldm_inpaint.devices import PRECISIONS
from ldm_inpaint.errors import CheckpointError, LdmInpaintError
from ldm_inpaint.files import partial_path, remove_stale_partials, sha256_file
from ldm_inpaint.models.latent_diffusion import LatentDiffusion

OUTPUT_SUFFIXES = (".ckpt", ".safetensors")
# Parameter-count groups of ``inspect``, by key prefix (our layout).
COMPONENTS = {
    "UNet": "model.diffusion_model.",
    "VAE": "first_stage_model.",
    "text encoder": "cond_stage_model.",
}


# ---------------------------------------------------------------------------------------------------- convert


@dataclass
class Conversion:
    """What ``convert`` wrote, and what it left out (reason -> keys)."""

    path: Path
    sha256: str
    config: ModelConfig
    detected: bool
    left_out: dict[str, list[str]]


def select_entries(
    entries: Mapping[str, object],
    sorted_: SortedEntries,
    weights: Mapping[str, Tensor],
    *,
    ema_applied: bool = False,
    prune: bool = False,
) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """The tensors to write, in the file's order, and what is left out (reason -> keys).

    Kept: ``weights`` (the model weights in the file layout, the EMA copy already in ``model.*`` if
    ``ema_applied``) and, unless ``prune``, every other tensor entry except an applied EMA copy; ``prune`` keeps
    only the schedule buffers besides the weights. Entries nobody knows are an error unless ``prune`` drops them.
    """
    if sorted_.unknown and not prune:
        raise CheckpointError(
            f"{len(sorted_.unknown)} unexpected entries ({preview_keys(sorted_.unknown)}): not written without "
            "--prune, which keeps only the inference weights"
        )
    kept = dict(weights)
    left_out: dict[str, list[str]] = {}
    if sorted_.unknown:
        left_out["unexpected entries (pruned)"] = sorted_.unknown
    if sorted_.ema:
        if ema_applied or prune:
            reason = "its values are now in model.*" if ema_applied else "pruned"
            left_out[f"EMA copy ({reason})"] = list(sorted_.ema)
        else:
            kept.update(sorted_.ema)
    for kind, keys in sorted_.skipped.items():
        for key in keys:
            if not isinstance(entries[key], Tensor):
                left_out.setdefault(f"{kind} (not tensors; only tensors are written)", []).append(key)
            elif prune and key not in SCHEDULE_KEYS:
                left_out.setdefault(f"{kind} (pruned)", []).append(key)
            else:
                kept[key] = entries[key]
    order = {key: index for index, key in enumerate(entries)}
    return dict(sorted(kept.items(), key=lambda item: order.get(item[0], len(order)))), left_out


def cast_floats(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Floating tensors to ``dtype`` (None: unchanged); integer tensors and the schedule buffers as they are."""
    return {
        key: value.to(dtype)
        if dtype is not None and value.is_floating_point() and key not in SCHEDULE_KEYS
        else value
        for key, value in tensors.items()
    }


def _check_destination(path: Path) -> None:
    if path.suffix not in OUTPUT_SUFFIXES:
        raise LdmInpaintError(f"output {path}: expected a name ending in .ckpt or .safetensors")
    if path.exists():
        raise LdmInpaintError(f"output {path} already exists; it is never overwritten")
    if not path.parent.is_dir():
        raise LdmInpaintError(f"output folder {path.parent} does not exist")


def write_checkpoint(tensors: Mapping[str, Tensor], path: Path) -> None:
    """Write ``tensors`` to ``path`` (format by suffix) through a hidden temporary file in the same folder,
    hard-linked to ``path`` at the end: a crash leaves no partial ``path``, and ``os.link`` refuses an existing
    name, so nothing is ever overwritten, even by a file that appeared meanwhile."""
    temporary = partial_path(path)
    try:
        temporary.touch()
        if path.suffix == ".safetensors":
            # safetensors creates files readable by their owner only; keep the usual mode, as torch.save does
            mode = temporary.stat().st_mode
            save_file(
                {key: value.contiguous() for key, value in tensors.items()}, temporary, {"format": "pt"}
            )
            temporary.chmod(mode)
        else:
            torch.save({"state_dict": dict(tensors)}, temporary)
        os.link(temporary, path)
    except FileExistsError:
        raise LdmInpaintError(f"output {path} already exists; it is never overwritten") from None
    except (OSError, RuntimeError, ValueError) as error:
        raise LdmInpaintError(f"cannot write {path}: {error}") from error
    finally:
        temporary.unlink(missing_ok=True)


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    dtype: torch.dtype | None = None,
    use_ema: bool = False,
    prune: bool = False,
    config: str | Path | None = None,
) -> Conversion:
    """Convert ``source`` into a new file ``destination`` (see the module docstring), checked strictly
    against ``config`` (detected when None) before anything is written."""
    source, destination = Path(source), Path(destination)
    _check_destination(destination)
    remove_stale_partials(destination.parent)
    entries = read_checkpoint(source)
    try:
        sorted_ = sort_entries(entries)
        resolved, detected = resolve_config(sorted_.weights, config)
        weights = apply_ema(sorted_) if use_ema else sorted_.weights
        check_fit(weights, entries, resolved)
        file_weights = to_file_layout(weights, resolved)
        kept, left_out = select_entries(entries, sorted_, file_weights, ema_applied=use_ema, prune=prune)
        tensors = cast_floats(kept, dtype)
        build_model(tensors, resolved)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    write_checkpoint(tensors, destination)
    return Conversion(destination, sha256_file(destination), resolved, detected, left_out)


def convert_main(argv: Sequence[str]) -> int:
    """``ldm-inpaint convert SRC DST``: prints ``<sha256>  DST`` (``sha256sum`` format) on success."""
    parser = Parser(
        prog="ldm-inpaint convert",
        description="Convert a checkpoint between .ckpt and .safetensors, dtypes, EMA and pruned forms. The "
        "result keeps the original key layout, is checked against the config and never overwrites a file.",
    )
    parser.add_argument("source", type=Path, help="checkpoint to read (.ckpt/.pt/.pth or .safetensors)")
    parser.add_argument(
        "destination", type=Path, help="new file; its suffix (.ckpt or .safetensors) picks the format"
    )
    parser.add_argument(
        "--dtype", choices=sorted(PRECISIONS), help="convert floating weights (default: keep)"
    )
    parser.add_argument("--ema", action="store_true", help="put the EMA copy (model_ema.*) into model.*")
    parser.add_argument("--prune", action="store_true", help="keep only the inference weights + schedule")
    parser.add_argument("--config", help="YAML config or bundled name (default: detected)")
    args = parser.parse_args(argv)
    try:
        result = convert_checkpoint(
            args.source,
            args.destination,
            dtype=PRECISIONS.get(args.dtype),
            use_ema=args.ema,
            prune=args.prune,
            config=args.config,
        )
    except LdmInpaintError as error:
        return _fail(error)
    how = "detected from the checkpoint" if result.detected else "given"
    print(f"ldm-inpaint: config {result.config.name} ({how})", file=sys.stderr)
    for reason, keys in result.left_out.items():
        print(f"ldm-inpaint: left out {len(keys)} {reason}: {preview_keys(keys)}", file=sys.stderr)
    print(f"{result.sha256}  {result.path}")
    return 0


# ---------------------------------------------------------------------------------------------------- inspect


@dataclass
class Check:
    """One check of ``inspect``: ``ok`` None when there was nothing to check."""

    ok: bool | None
    detail: str


@dataclass
class Report:
    """Everything ``inspect`` finds in a file."""

    path: str
    size_bytes: int
    sha256: str
    config: str | None
    config_source: str
    config_problem: str | None
    family: str | None
    parameters: dict[str, int]
    config_parameters: dict[str, int] | None
    dtypes: dict[str, int]
    extras: dict[str, list[str]]
    unknown: list[str]
    ema: Check
    keys: Check
    schedule_buffers: int
    schedule: Check


def _parameter_counts(tensors: Mapping[str, Tensor]) -> dict[str, int]:
    counts = {
        name: sum(value.numel() for key, value in tensors.items() if key.startswith(prefix))
        for name, prefix in COMPONENTS.items()
    }
    return {**counts, "total": sum(counts.values())}


def _family(config: ModelConfig) -> str:
    generation = "SD1" if config.text_encoder.layout == "openai" else "SD2"
    kind = "inpainting" if config.is_inpainting else "text-to-image"
    return f"{generation} {kind}, {config.parameterization}-prediction"


def _run_check(passed: str, check: Callable[..., object], *args: object) -> Check:
    """``check(*args)`` as a :class:`Check`: its error message if it raises, else ``passed``."""
    try:
        check(*args)
    except CheckpointError as error:
        return Check(False, str(error))
    return Check(True, passed)


def _ema_check(sorted_: SortedEntries) -> Check:
    if not sorted_.ema:
        return Check(None, "none")
    return _run_check(f"{len(sorted_.ema)} tensors, one for every model.* weight", apply_ema, sorted_)


def inspect_checkpoint(path: str | Path, config: str | Path | None = None) -> Report:
    """Read ``path`` and report its contents and how it fits ``config`` (detected when None). Mismatches are
    reported, not raised; only an unreadable file or config file is an error."""
    path = Path(path)
    entries = read_checkpoint(path)
    try:
        sorted_ = sort_entries(entries)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    dtypes = Counter(
        str(value.dtype).removeprefix("torch.") for value in entries.values() if isinstance(value, Tensor)
    )
    unchecked = Check(None, "not checked (no config)")
    report = Report(
        path=str(path),
        size_bytes=path.stat().st_size,
        sha256=sha256_file(path),
        config=None,
        config_source="detected" if config is None else "given",
        config_problem=None,
        family=None,
        parameters=_parameter_counts(sorted_.weights),
        config_parameters=None,
        dtypes=dict(dtypes.most_common()),
        extras=sorted_.skipped,
        unknown=sorted_.unknown,
        ema=_ema_check(sorted_),
        keys=unchecked,
        schedule_buffers=sum(key in entries for key in SCHEDULE_KEYS),
        schedule=unchecked,
    )
    try:
        resolved, _ = resolve_config(sorted_.weights, config)
    except CheckpointError as error:
        report.config_problem = str(error)
        return report
    with torch.device("meta"):
        model = LatentDiffusion(resolved)
    expected = model.state_dict()
    report.config = resolved.name
    report.family = _family(resolved)
    report.config_parameters = _parameter_counts(expected)
    passed = f"all {len(expected)} weights present with their shapes as dense floating point, nothing else"
    report.keys = _run_check(passed, check_weights, model, sorted_.weights, resolved)
    if "alphas_cumprod" in entries:
        report.schedule = _run_check("alphas_cumprod matches the config", check_schedule, entries, resolved)
    else:
        report.schedule = Check(None, "no alphas_cumprod stored, nothing to check")
    return report


def format_report(report: Report) -> str:
    """The report as plain text, one fact per line."""
    if report.config is None:
        config = f"none ({report.config_problem})"
    else:
        config = f"{report.config} ({report.config_source}): {report.family}"
    expected = report.config_parameters
    lines = [
        f"file        {report.path}",
        f"size        {report.size_bytes:,} bytes",
        f"sha256      {report.sha256}",
        f"config      {config}",
        "parameters  in the file" + ("  (config)" if expected else ""),
        *(
            f"  {name:<14}{count:>15,}" + (f"  ({expected[name]:,})" if expected else "")
            for name, count in report.parameters.items()
        ),
        "dtypes      " + ", ".join(f"{count} {name}" for name, count in report.dtypes.items()),
        "extras      " + ("none" if not report.extras else "skipped when loading:"),
        *(f"  {len(keys)} {kind}: {preview_keys(keys, 3)}" for kind, keys in report.extras.items()),
        f"unknown     {len(report.unknown)} entries"
        + (f": {preview_keys(report.unknown)}" if report.unknown else ""),
        f"EMA copy    {report.ema.detail}",
        f"keys        {report.keys.detail}",
        f"schedule    {report.schedule_buffers} of {len(SCHEDULE_KEYS)} buffers stored; {report.schedule.detail}",
    ]
    return "\n".join(lines)


def inspect_main(argv: Sequence[str]) -> int:
    """``ldm-inpaint inspect PATH``: a readable report (or ``--json``); exit 0 even when the file does not fit."""
    parser = Parser(
        prog="ldm-inpaint inspect",
        description="Report what a checkpoint holds and how it fits a config (detected or given).",
    )
    parser.add_argument("path", type=Path, help="checkpoint (.ckpt/.pt/.pth or .safetensors)")
    parser.add_argument("--config", help="YAML config or bundled name (default: detected)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = inspect_checkpoint(args.path, args.config)
    except LdmInpaintError as error:
        return _fail(error)
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0


def _fail(error: LdmInpaintError) -> int:
    print(f"ldm-inpaint: error: {error}", file=sys.stderr)
    return 2
