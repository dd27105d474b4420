"""``ldm-inpaint inspect``: what a checkpoint file or model folder holds and how it fits a config (detected or
given), checked with the loader's own strict checks; mismatches are reported, not raised."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm_inpaint.checkpoint import (
    SCHEDULE_KEYS,
    SortedEntries,
    apply_ema,
    check_schedule,
    resolve_config,
    sort_entries,
)
from ldm_inpaint.checkpoint_files import file_format, is_model_folder, read_checkpoint
from ldm_inpaint.command import Parser, checkpoint_argument
from ldm_inpaint.config import ModelConfig
from ldm_inpaint.errors import CheckpointError, LdmInpaintError, LoRAError
from ldm_inpaint.files import sha256_file
from ldm_inpaint.formats.diffusers import read_folder
from ldm_inpaint.lora.files import read_lora
from ldm_inpaint.lora.names import UNET_PREFIX
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.tools import fail
from ldm_inpaint.weight_checks import check_weights, preview_keys

# Parameter-count groups of ``inspect``, by key prefix (our layout).
COMPONENTS = {
    "UNet": "model.diffusion_model.",
    "VAE": "first_stage_model.",
    "text encoder": "cond_stage_model.",
}
LORA_PREFIXES = ("lora_unet_", "lora_te_", "unet.", "text_encoder.")
VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "loss.")
FILE_FORMATS = {"torch": "PyTorch zip (torch.save)", "safetensors": "safetensors"}


@dataclass
class Check:
    """One check of ``inspect``: ``ok`` None when there was nothing to check."""

    ok: bool | None
    detail: str


@dataclass
class Report:
    """Everything ``inspect`` finds in a file."""

    path: str
    format: str
    holds: str  # a model, or what else: a LoRA, a VAE
    files: list[str]  # the files read (a folder's weight files)
    size_bytes: int
    sha256: str | None  # of a single file
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


def other_content(entries: Mapping[str, object], path: Path) -> str | None:
    """What a file that is not a model holds, in words (a LoRA, a VAE), with the option that uses it; None
    for anything else (a model, or entries for the strict checks to name)."""
    keys = list(entries)
    if keys and all(key.startswith(LORA_PREFIXES) for key in keys):
        try:
            lora = read_lora(path)
        except LoRAError as error:
            return f"LoRA-like entries that do not read as a LoRA ({error})"
        unet = sum(name.startswith(UNET_PREFIX) for name in lora.modules)
        ranks = sorted({module.rank for module in lora.modules.values()})
        style = "diffusers (PEFT)" if any(".lora_A." in key for key in keys) else "kohya / AUTOMATIC1111"
        return (
            f"a LoRA, {style} names: {len(lora.modules)} modules ({unet} UNet, {len(lora.modules) - unet} "
            f"text encoder), rank {', '.join(map(str, ranks))}; use it with --lora"
        )
    tensors = [key for key, value in entries.items() if isinstance(value, Tensor)]
    if tensors and all(key.startswith(VAE_PREFIXES) for key in tensors):
        return f"a VAE ({len(tensors)} tensors); use it with --vae"
    return None


def inspect_checkpoint(path: str | Path, config: str | Path | None = None) -> Report:
    """Read ``path`` and report its contents and how it fits ``config`` (detected when None). Mismatches are
    reported, not raised; only an unreadable file or config file is an error."""
    path = Path(path)
    folder = read_folder(path, config) if is_model_folder(path) else None
    entries = read_checkpoint(path) if folder is None else folder.entries
    try:
        sorted_ = sort_entries(entries)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    dtypes = Counter(
        str(value.dtype).removeprefix("torch.") for value in entries.values() if isinstance(value, Tensor)
    )
    unchecked = Check(None, "not checked (no config)")
    files = [path] if folder is None else [p for paths in folder.files.values() for p in paths]
    report = Report(
        path=str(path),
        format=FILE_FORMATS.get(file_format(path), file_format(path)) if folder is None else folder.format,
        holds=(None if folder else other_content(entries, path)) or "a Stable Diffusion model",
        files=[str(p) for p in files],
        size_bytes=sum(p.stat().st_size for p in files),
        sha256=sha256_file(path) if folder is None else None,
        config=None,
        config_source="detected" if config is None else "given",
        config_problem=None,
        family=None,
        parameters=_parameter_counts(sorted_.weights),
        config_parameters=None,
        dtypes=dict(dtypes.most_common()),
        extras={**sorted_.skipped, **(folder.skipped if folder else {})},
        unknown=sorted_.unknown,
        ema=_ema_check(sorted_),
        keys=unchecked,
        schedule_buffers=sum(key in entries for key in SCHEDULE_KEYS),
        schedule=unchecked,
    )
    if report.holds != "a Stable Diffusion model":
        report.config_problem = "not a model"
        return report
    try:
        resolved, report.config_source = resolve_config(
            sorted_.weights, folder and folder.config or config, path
        )
        if folder is not None:
            report.config_source = folder.config_source
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
        f"path        {report.path}",
        f"format      {report.format}",
        f"holds       {report.holds}",
        *(f"  {name}" for name in report.files if len(report.files) > 1),
        f"size        {report.size_bytes:,} bytes",
        f"sha256      {report.sha256 or 'n/a (several files)'}",
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
    parser.add_argument(
        "path",
        type=checkpoint_argument,
        help="checkpoint (.ckpt/.pt/.pth or .safetensors, a diffusers or ppdiffusers model folder, or 'demo')",
    )
    parser.add_argument("--config", help="YAML config or bundled name (default: detected)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = inspect_checkpoint(args.path, args.config)
    except LdmInpaintError as error:
        return fail(error)
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0
