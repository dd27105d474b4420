"""Reading checkpoint files without running their code and without letting a small file cost gigabytes.

The format is read from the file's first bytes, not from its name: a PyTorch zip (``torch.save``, the
original ``.ckpt``), safetensors, or a legacy (pre-1.6) PyTorch pickle, which is refused. Before anything is
loaded, what the file's metadata would make us read or allocate is bounded: the pickle's size (a zip entry
may inflate a thousandfold), the safetensors header's size and its tensor count. A torch file is then loaded
with ``torch.load(weights_only=True, mmap=True)`` after its pickle was scanned for code objects; pickled
Lightning objects (callback states) become inert stand-ins, and any other code object is refused by name.

Written files (``convert``) appear whole or not at all, and never over an existing file
(:func:`write_checkpoint`).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ldm_inpaint.errors import CheckpointError, LdmInpaintError
from ldm_inpaint.files import partial_path, write_new_text

# The most a checkpoint's metadata may make us read: the pickle of a torch zip (SD's is ~0.2 MB, a
# Lightning training checkpoint's a few MB), a safetensors header (SD's is ~0.1 MB), and the tensor count
# (SD with an EMA copy: ~2,500).
MAX_PICKLE_BYTES = 64 * 2**20
MAX_HEADER_BYTES = 64 * 2**20
MAX_TENSORS = 100_000
# Pickled Lightning objects (callback states) are rebuilt as inert stand-ins: no code of theirs runs.
_INERT_GLOBAL_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
# The magic number of the legacy (pre-1.6, non-zip) torch.save format, pickled as a long after protocol 2.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError)


def file_format(path: Path) -> str:
    """``"torch"`` (a zip), ``"safetensors"``, ``"legacy-torch"`` or ``"unknown"``, from the first bytes."""
    with path.open("rb") as file:
        head = file.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy-torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


# Checkpoints that ship with the package, by name: ``--ckpt demo`` is the small model that
# ``scripts/train_demo.py`` trains offline (its config beside it as demo.yaml).
BUNDLED_CHECKPOINTS = {"demo": ("demo", "demo.safetensors")}


def checkpoint_path(value: str | Path) -> Path:
    """A checkpoint argument as a path: a bundled name (:data:`BUNDLED_CHECKPOINTS`) when no file of that name
    exists, else the path itself."""
    path = Path(value)
    if str(value) in BUNDLED_CHECKPOINTS and not path.exists():
        bundled = Path(str(resources.files("ldm_inpaint").joinpath(*BUNDLED_CHECKPOINTS[str(value)])))
        if not bundled.is_file():
            raise CheckpointError(
                f"{value!r}: this installation has no bundled {value} model ({bundled} is missing); "
                "train it with scripts/train_demo.py, or give a checkpoint file"
            )
        return bundled
    return path


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a folder that :func:`read_folder` reads (or a cache folder of one)."""
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "snapshots").is_dir())


def folder_root(path: Path) -> Path:
    """The model folder ``path`` stands for: itself, or a cache folder's snapshot of ``refs/main`` (or its
    only snapshot)."""
    if (path / "model_index.json").is_file() or not (path / "snapshots").is_dir():
        return path
    ref = path / "refs" / "main"
    if ref.is_file():
        snapshot = path / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted(p for p in (path / "snapshots").iterdir() if p.is_dir())
    if len(snapshots) != 1:
        raise CheckpointError(
            f"{path}: a Hugging Face cache folder with {len(snapshots)} snapshots and no usable refs/main; "
            "give the snapshot folder itself (snapshots/REVISION)"
        )
    return snapshots[0]


def read_checkpoint(path: str | Path) -> dict[str, object]:
    """All top-level entries of a checkpoint file (PyTorch zip or safetensors; a safetensors file whatever its
    name), the
        ``state_dict`` wrapper of Lightning checkpoints unwrapped (its sibling entries are returned under their
        own names)."""
    path = Path(path)
    if path.is_dir():
        diffusers = (
            " (a diffusers-format folder: it has model_index.json)"
            if (path / "model_index.json").exists()
            else ""
        )
        raise CheckpointError(
            f"{path}: expected a checkpoint file (.ckpt or .safetensors), found a folder{diffusers}"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    kind = file_format(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "legacy-torch":
        raise CheckpointError(
            f"{path}: a legacy (before PyTorch 1.6) pickle checkpoint, which cannot be read without running "
            "its code; load it once in a trusted environment and save it again with torch.save or as "
            ".safetensors"
        )
    if kind != "torch":
        raise CheckpointError(
            f"{path}: expected a PyTorch checkpoint (a zip written by torch.save) or a safetensors file, found "
            "neither (the first bytes match no known format)"
        )
    if path.suffix == ".safetensors":
        # torch.load takes any path ending in .safetensors for a safetensors file
        raise CheckpointError(
            f"{path}: a PyTorch checkpoint (a zip written by torch.save) named .safetensors; rename it to .ckpt"
        )
    loaded = _torch_load(path)
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(loaded).__name__}")
    if "state_dict" in loaded:
        inner = loaded["state_dict"]
        if not isinstance(inner, Mapping):
            raise CheckpointError(f"{path}: 'state_dict' entry is a {type(inner).__name__}, expected a dict")
        outer = {key: value for key, value in loaded.items() if key != "state_dict"}
        return {**outer, **inner}
    return dict(loaded)


def _read_safetensors(path: Path) -> dict[str, object]:
    size = path.stat().st_size
    with path.open("rb") as file:
        (header_bytes,) = struct.unpack("<Q", file.read(8))
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: a safetensors header of {header_bytes:,} bytes in a file of {size:,}; expected at most "
                f"{min(MAX_HEADER_BYTES, size - 8):,}: the file is damaged or not a safetensors file"
            )
        try:
            header = json.loads(file.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    tensors = len(header) - ("__metadata__" in header)
    if tensors > MAX_TENSORS:
        raise CheckpointError(
            f"{path}: declares {tensors:,} tensors; expected at most {MAX_TENSORS:,} (an SD checkpoint has "
            "about 1,200): refused before reading them"
        )
    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(error)})") from error


def _check_zip(path: Path) -> None:
    """The zip's entries are stored (torch reads them in place) and its pickle is of a bounded size."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path}: a damaged zip ({first_line(error)}); download it again") from None
    compressed = [entry.filename for entry in entries if entry.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(
            f"{path}: a zip whose entries are compressed ({compressed[0]}, ...); torch.save writes them "
            "stored: use the original file, or unzip it and zip it again without compression (zip -0)"
        )
    pickles = [entry for entry in entries if entry.filename.endswith("data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(
            f"{path}: expected a zip written by torch.save (one data.pkl), found {len(pickles)} data.pkl entries"
        )
    if pickles[0].file_size > MAX_PICKLE_BYTES:
        raise CheckpointError(
            f"{path}: its pickle is {pickles[0].file_size:,} bytes; expected at most {MAX_PICKLE_BYTES:,} "
            "(an SD checkpoint's is about 0.2 MB): refused before reading it"
        )


class _InertObject:
    """Stand-in for a pickled training-state object: accepts any state, does nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


def _inert_class(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return type(name, (_InertObject,), {"__module__": module, "__qualname__": name})


def _torch_load(path: Path) -> object:
    """``torch.load`` restricted to tensors and plain containers (plus inert Lightning stand-ins)."""
    _check_zip(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except _LOAD_ERRORS as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(error)})") from error
    refused = [name for name in unsafe if not name.startswith(_INERT_GLOBAL_PREFIXES)]
    if refused:
        raise CheckpointError(
            f"{path}: refused to load: the pickle names code objects {refused[:5]}; a checkpoint should hold "
            "only tensors and plain containers (nothing from this file was executed)"
        )
    stand_ins = [_inert_class(name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _LOAD_ERRORS as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(error)})") from error


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------- writing

OUTPUT_SUFFIXES = (".ckpt", ".safetensors")


def check_destination(path: Path, with_config: bool = False) -> None:
    """``path`` can be a new checkpoint file: a known suffix, not taken, in an existing folder; with
    ``with_config``, its config's name (:func:`write_with_config`) is not taken either."""
    if path.suffix not in OUTPUT_SUFFIXES:
        raise LdmInpaintError(f"output {path}: expected a name ending in .ckpt or .safetensors")
    if path.exists():
        raise LdmInpaintError(f"output {path} already exists; it is never overwritten")
    if with_config and path.with_suffix(".yaml").exists():
        raise LdmInpaintError(
            f"{path.with_suffix('.yaml')} already exists: it would be the new checkpoint's config and is "
            "never overwritten; choose another output name"
        )
    if not path.parent.is_dir():
        raise LdmInpaintError(f"output folder {path.parent} does not exist")


def write_checkpoint(tensors: Mapping[str, Tensor], path: Path, *, replace: bool = False) -> None:
    """Write ``tensors`` to ``path`` (format by suffix) through a hidden temporary file in the same folder,
    hard-linked to ``path`` at the end: a crash leaves no partial ``path``, and ``os.link`` refuses an existing
    name, so nothing is ever overwritten, even by a file that appeared meanwhile. ``replace``: the new file
    takes the place of an existing one in one step (a training run's ``last.ckpt``)."""
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
        (os.replace if replace else os.link)(temporary, path)
    except FileExistsError:
        raise LdmInpaintError(f"output {path} already exists; it is never overwritten") from None
    except (OSError, RuntimeError, ValueError) as error:
        raise LdmInpaintError(f"cannot write {path}: {error}") from error
    finally:
        temporary.unlink(missing_ok=True)


def write_with_config(tensors: Mapping[str, Tensor], path: Path, config_yaml: str | None) -> Path | None:
    """:func:`write_checkpoint`, after ``config_yaml`` (if any) was written as ``path`` with ``.yaml``, which
    is returned: the checkpoint never appears without its config, and the config of a checkpoint that was
    not written is removed again."""
    if config_yaml is None:
        write_checkpoint(tensors, path)
        return None
    config_file = path.with_suffix(".yaml")
    if not write_new_text(config_file, config_yaml):
        raise LdmInpaintError(f"{config_file} already exists; it is never overwritten")
    try:
        write_checkpoint(tensors, path)
    except BaseException:
        config_file.unlink()
        raise
    return config_file
