"""Checkpoint files read by what they are, not by their names, with bounded metadata, and weights that are
not weights refused at load, by ``inspect`` and by ``convert``; every refusal one message that says what the
file is and what to do."""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ldm_inpaint.checkpoint_files as checkpoint_files
from ldm_inpaint.checkpoint import load_model
from ldm_inpaint.checkpoint_files import file_format, read_checkpoint
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import CheckpointError
from ldm_inpaint.inspection import inspect_checkpoint
from ldm_inpaint.random_weights import random_checkpoint
from ldm_inpaint.tools import convert_checkpoint

from .conftest import TINY_CONFIGS

TENSORS = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}


def same(loaded: dict, expected: dict) -> bool:
    return loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_files_are_read_by_content_whatever_their_name(tmp_path: Path) -> None:
    safetensors_named_ckpt = tmp_path / "model.ckpt"
    save_file(TENSORS, safetensors_named_ckpt)
    zip_named_safetensors = tmp_path / "model.safetensors"
    torch.save(TENSORS, zip_named_safetensors)
    assert (
        file_format(safetensors_named_ckpt) == "safetensors" and file_format(zip_named_safetensors) == "torch"
    )
    assert same(read_checkpoint(safetensors_named_ckpt), TENSORS)
    # torch.load reads any *.safetensors path as safetensors: the message says what the file is instead
    with pytest.raises(CheckpointError, match=r"a PyTorch checkpoint \(a zip written by torch.save\) named "):
        read_checkpoint(zip_named_safetensors)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda path: torch.save(TENSORS, path, _use_new_zipfile_serialization=False),
            "a legacy (before PyTorch 1.6) pickle checkpoint, which cannot be read without running its code",
        ),
        (lambda path: path.write_bytes(b"hello, world" * 10), "found neither"),
        (lambda path: path.write_bytes(b""), "found neither"),
    ],
)
def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "model.ckpt"
    make(path)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        read_checkpoint(path)


def test_a_recompressed_zip_says_so(tmp_path: Path) -> None:
    original, recompressed = tmp_path / "original.ckpt", tmp_path / "model.ckpt"
    torch.save(TENSORS, original)
    with (
        zipfile.ZipFile(original) as source,
        zipfile.ZipFile(recompressed, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry))
    with pytest.raises(CheckpointError, match=r"entries are compressed .*zip it again without compression"):
        read_checkpoint(recompressed)


def test_a_pickle_over_the_bound_is_refused_before_it_is_read(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.ckpt"
    torch.save(TENSORS, path)
    monkeypatch.setattr(checkpoint_files, "MAX_PICKLE_BYTES", 100)
    with pytest.raises(CheckpointError, match=r"its pickle is [\d,]+ bytes; expected at most 100"):
        read_checkpoint(path)


def test_safetensors_headers_are_bounded(tmp_path: Path, monkeypatch) -> None:
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(
        CheckpointError, match=r"a safetensors header of 1,000,000,000,000 bytes in a file of 10"
    ):
        read_checkpoint(lying)
    many = tmp_path / "many.safetensors"
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(20)}
    text = json.dumps(header).encode()
    many.write_bytes(struct.pack("<Q", len(text)) + text + bytes(80))
    monkeypatch.setattr(checkpoint_files, "MAX_TENSORS", 10)
    with pytest.raises(CheckpointError, match="declares 20 tensors; expected at most 10"):
        read_checkpoint(many)


def test_a_folder_is_called_a_folder(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(
        CheckpointError, match="found a folder .a diffusers-format folder: it has model_index.json"
    ):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("spoil", "found"),
    [
        (lambda t: t.to(torch.int64), "int64, strided, cpu"),
        (lambda t: t.to(torch.complex64), "complex64, strided, cpu"),
        (lambda t: t.to_sparse(), "float32, sparse_coo, cpu"),
        (lambda t: torch.empty_like(t, device="meta"), "float32, strided, meta"),
    ],
)
def test_tensors_that_are_not_weights_are_refused_everywhere(tmp_path: Path, spoil, found: str) -> None:
    config = load_config(TINY_CONFIGS["v1"])
    weights = random_checkpoint(config, seed=1)
    key = "model.diffusion_model.out.2.bias"
    weights[key] = spoil(weights[key])
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": weights}, path)
    expected = (
        f"expected dense floating-point weights on a real device, found 1 other tensors ({key} ({found}))"
    )
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_model(path, TINY_CONFIGS["v1"])
    report = inspect_checkpoint(path, TINY_CONFIGS["v1"])
    assert report.keys.ok is False and found in report.keys.detail
    with pytest.raises(CheckpointError, match="dense floating-point"):
        convert_checkpoint(path, tmp_path / "out.safetensors", config=TINY_CONFIGS["v1"])
    assert not (tmp_path / "out.safetensors").exists()
