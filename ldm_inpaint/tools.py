"""``ldm-inpaint convert`` (format, dtype, EMA, pruning, inpaint-ifying, model folders to one file); its
sibling ``inspect`` is :mod:`ldm_inpaint.inspection`.

It reads a file through :mod:`ldm_inpaint.checkpoint` (safe reading, Lightning unwrapping, sorting of the
entries, EMA naming, config detection), or a diffusers / ppdiffusers folder through
:mod:`ldm_inpaint.formats.diffusers`, and checks it with the loader's own strict checks. It writes
the ORIGINAL key layout (SD1's text encoder stays in transformers' names), so its output still loads in the
original repositories, and it writes tensors only:

- ``.ckpt`` output is ``torch.save({"state_dict": tensors})``, what the original scripts read
  (``pl_sd["state_dict"]``) and what ``torch.load(weights_only=True)`` accepts;
- non-tensor entries (Lightning's ``global_step``, ``epoch``, ``optimizer_states``, ``callbacks``, ...) are
  left out, with a note, whatever the output format: safetensors cannot hold them, and a rule that depends on
  the format would make ``.ckpt -> .safetensors -> .ckpt`` lossy;
- ``--dtype`` converts floating tensors only, and never the 12 DDPM schedule buffers: they are the config's
  constants, rounding them moves the original code's sampling, and the loader's schedule cross-check refuses
  bf16-rounded ones (relative error up to 2^-8) and fp16-rounded ones stored as fp32;
- ``--to-inpainting`` expands a text-to-image checkpoint to the 9-channel inpainting layout
  (:mod:`ldm_inpaint.inpaintify`), writing its config beside it when the weights would not be detected as it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ldm_inpaint.checkpoint import (
    SCHEDULE_KEYS,
    SortedEntries,
    apply_ema,
    build_model,
    check_fit,
    resolve_config,
    sort_entries,
    to_file_layout,
)
from ldm_inpaint.checkpoint_files import (
    check_destination,
    is_model_folder,
    read_checkpoint,
    write_checkpoint,
    write_with_config,
)
from ldm_inpaint.command import Parser, checkpoint_argument
from ldm_inpaint.config import ModelConfig
from ldm_inpaint.devices import PRECISIONS
from ldm_inpaint.errors import CheckpointError, LdmInpaintError
from ldm_inpaint.files import remove_stale_partials, sha256_file
from ldm_inpaint.formats.diffusers import read_folder
from ldm_inpaint.inpaintify import INPAINTING_CHANNELS, inpaintify
from ldm_inpaint.weight_checks import preview_keys

# ---------------------------------------------------------------------------------------------------- convert


@dataclass
class Conversion:
    """What ``convert`` wrote, and what it left out (reason -> keys)."""

    path: Path
    sha256: str
    config: ModelConfig
    config_source: str  # which config, how found
    left_out: dict[str, list[str]]
    expanded: list[str] = field(default_factory=list)  # --to-inpainting: the keys expanded
    config_file: Path | None = None  # --to-inpainting: the config written beside ``path``
    notes: dict[str, list[str]] = field(default_factory=dict)  # a folder's skipped or filled entries


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


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    dtype: torch.dtype | None = None,
    use_ema: bool = False,
    prune: bool = False,
    config: str | Path | None = None,
    to_inpainting: bool = False,
) -> Conversion:
    """Convert ``source`` into a new file ``destination`` (see the module docstring), checked strictly
    against ``config`` (None: the YAML beside ``source``, else detected) before anything is written.
    ``to_inpainting``: ``config`` is the source's, the result has its inpainting variant, whose YAML, when
    written, is ``destination`` with the suffix ``.yaml``, never an existing file either."""
    source, destination = Path(source), Path(destination)
    check_destination(destination, with_config=to_inpainting)
    remove_stale_partials(destination.parent)
    folder = read_folder(source, config) if is_model_folder(source) else None
    if folder is not None:
        entries, config = folder.entries, folder.config
    else:
        entries = read_checkpoint(source)
    inpainting = None
    try:
        if to_inpainting:
            inpainting = inpaintify(entries, config, source, destination.stem)
            entries, config = inpainting.entries, inpainting.config
        sorted_ = sort_entries(entries)
        resolved, found = resolve_config(sorted_.weights, config, source)
        how = folder.config_source if folder is not None else found
        weights = apply_ema(sorted_) if use_ema else sorted_.weights
        check_fit(weights, entries, resolved)
        file_weights = to_file_layout(weights, resolved)
        kept, left_out = select_entries(entries, sorted_, file_weights, ema_applied=use_ema, prune=prune)
        tensors = cast_floats(kept, dtype)
        build_model(tensors, resolved)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None
    notes = {} if folder is None else folder.skipped
    if inpainting is None:
        write_checkpoint(tensors, destination)
        return Conversion(destination, sha256_file(destination), resolved, how, left_out, notes=notes)
    written = write_with_config(tensors, destination, inpainting.config_yaml)
    sha256 = sha256_file(destination)
    return Conversion(
        destination, sha256, resolved, inpainting.config_source, left_out, inpainting.expanded, written
    )


def convert_main(argv: Sequence[str]) -> int:
    """``ldm-inpaint convert SRC DST``: prints ``<sha256>  DST`` (``sha256sum`` format) on success."""
    parser = Parser(
        prog="ldm-inpaint convert",
        description="Convert a checkpoint between .ckpt and .safetensors, dtypes, EMA and pruned forms. The "
        "result keeps the original key layout, is checked against the config and never overwrites a file.",
    )
    parser.add_argument(
        "source",
        type=checkpoint_argument,
        help="checkpoint to read (.ckpt/.pt/.pth or .safetensors, a diffusers or ppdiffusers model folder, or "
        "'demo')",
    )
    parser.add_argument(
        "destination", type=Path, help="new file; its suffix (.ckpt or .safetensors) picks the format"
    )
    parser.add_argument(
        "--dtype", choices=sorted(PRECISIONS), help="convert floating weights (default: keep)"
    )
    parser.add_argument("--ema", action="store_true", help="put the EMA copy (model_ema.*) into model.*")
    parser.add_argument("--prune", action="store_true", help="keep only the inference weights + schedule")
    parser.add_argument(
        "--to-inpainting",
        action="store_true",
        help="expand a 4-channel text-to-image checkpoint to the 9-channel inpainting layout (new channels "
        "zero, as the original fine-tunes began); its config is written as DST with .yaml when the weights "
        "would not be detected as it (v models, custom configs)",
    )
    parser.add_argument(
        "--config",
        help="YAML config or bundled name of SRC (default: SRC's name with .yaml beside it, else detected)",
    )
    args = parser.parse_args(argv)
    try:
        result = convert_checkpoint(
            args.source,
            args.destination,
            dtype=PRECISIONS.get(args.dtype),
            use_ema=args.ema,
            prune=args.prune,
            config=args.config,
            to_inpainting=args.to_inpainting,
        )
    except LdmInpaintError as error:
        return fail(error)
    print(f"ldm-inpaint: config {result.config.name} ({result.config_source})", file=sys.stderr)
    if result.expanded:
        print(
            f"ldm-inpaint: expanded to {INPAINTING_CHANNELS} input channels, the new ones zero: "
            + preview_keys(result.expanded),
            file=sys.stderr,
        )
    if result.config_file is not None:
        print(f"ldm-inpaint: wrote its config {result.config_file}", file=sys.stderr)
    for kind, keys in result.notes.items():
        print(f"ldm-inpaint: {len(keys)} {kind}: {preview_keys(keys)}", file=sys.stderr)
    for reason, keys in result.left_out.items():
        print(f"ldm-inpaint: left out {len(keys)} {reason}: {preview_keys(keys)}", file=sys.stderr)
    print(f"{result.sha256}  {result.path}")
    return 0


def fail(error: LdmInpaintError) -> int:
    print(f"ldm-inpaint: error: {error}", file=sys.stderr)
    return 2
