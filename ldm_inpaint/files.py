"""Writing output files so that nothing is half-written or lost.

Every output is written to a hidden temporary file in its folder, ``.NAME.PID.partial``, flushed to disk, and
only then given its name: hard-linked to a new name (never over an existing file, even one that appeared
meanwhile) or renamed over the old file where a file is meant to be replaced (a study's grid, its exported
tables). A process killed at any instant leaves either the complete file or none under the final name; the
temporary files of killed processes are removed by :func:`remove_stale_partials`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ldm_inpaint.errors import LdmInpaintError

_PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.partial")


def sha256_file(path: str | Path, chunk_size: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """Hex sha256 of a file; of a folder, the sha256 of its files' relative paths and sha256s, one
    ``SHA256  PATH`` line each in sorted order (``sha256sum`` format)."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    lines = "".join(f"{sha256_file(p)}  {p.relative_to(path).as_posix()}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def partial_path(path: Path) -> Path:
    """The temporary name of ``path`` while this process writes it."""
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], *, replace: bool = False) -> bool:
    """Write ``path`` through ``write(file)`` in one step. ``replace``: the new file takes the place of an
    existing one; otherwise an existing ``path`` is left alone and False returned (nothing written).
    Errors of ``write`` and of the file system propagate, with no temporary file left behind."""
    path = Path(path)
    temporary = partial_path(path)
    try:
        with temporary.open("xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temporary, path)
            return True
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink(missing_ok=True)


def write_new_text(path: str | Path, text: str) -> bool:
    """:func:`write_atomic` of UTF-8 text to a new file; False if ``path`` exists already."""
    return write_atomic(path, lambda file: file.write(text.encode("utf-8")))


def replace_text(path: str | Path, text: str) -> None:
    """:func:`write_atomic` of UTF-8 text, replacing ``path`` if it exists."""
    write_atomic(path, lambda file: file.write(text.encode("utf-8")), replace=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(folder: str | Path) -> list[Path]:
    """Delete the ``.NAME.PID.partial`` files in ``folder`` whose process is gone (a run killed while it
    wrote); returns them. Files of running processes are left to them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _PARTIAL.fullmatch(path.name)
        if match and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_output_folder(folder: str | Path, needed_bytes: int = 0) -> Path:
    """Create ``folder`` if missing and check, before any expensive work, that files can be written there and
    that about ``needed_bytes`` are free; remove the partial files of killed runs. Raises
    :class:`~ldm_inpaint.errors.LdmInpaintError` saying what is wrong."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LdmInpaintError(f"output folder {folder}: expected a folder, found a file; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise LdmInpaintError(
            f"output folder {folder}: cannot write there ({error.strerror or error})"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise LdmInpaintError(
            f"output folder {folder}: the outputs need about {needed_bytes / 2**20:.0f} MiB, only "
            f"{free / 2**20:.0f} MiB are free; free some space or choose another folder"
        )
    remove_stale_partials(folder)
    return folder
