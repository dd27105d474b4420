"""``ldm-inpaint convert`` and ``ldm-inpaint inspect`` on tiny random checkpoints laid out like the originals
(a Lightning wrapper, a full LitEma copy, the usual extras); full-size layouts in the slow tests."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from ldm_inpaint.checkpoint import (
    OUR_TEXT_PREFIX,
    SCHEDULE_KEYS,
    SD1_TEXT_PREFIX,
    ema_key,
    load_model,
    to_file_layout,
)
from ldm_inpaint.checkpoint_files import read_checkpoint, write_checkpoint
from ldm_inpaint.cli import main
from ldm_inpaint.config import ModelConfig, load_config
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.files import sha256_file
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.random_weights import random_checkpoint

from .conftest import FULL_CONFIGS, MANIFESTS, TINY_CONFIGS

POSITION_IDS = SD1_TEXT_PREFIX + "embeddings.position_ids"
PREFIXES = {
    "UNet": "model.diffusion_model.",
    "VAE": "first_stage_model.",
    "text encoder": "cond_stage_model.",
}


@dataclass
class Source:
    """A training-style checkpoint file and what went into it."""

    family: str
    config_path: Path
    config: ModelConfig
    weights: dict[str, Tensor]  # random_checkpoint: weights in the file layout + the 12 schedule buffers
    ema: dict[str, Tensor]
    extras: dict[str, Tensor]
    path: Path

    @property
    def tensors(self) -> dict[str, Tensor]:
        return {**self.weights, **self.ema, **self.extras}


@pytest.fixture(scope="module", params=["v1", "v2"])
def source(request, tmp_path_factory) -> Source:
    config = load_config(TINY_CONFIGS[request.param])
    weights = random_checkpoint(config, seed=4)
    ema = {ema_key(key): value + 1.0 for key, value in weights.items() if key.startswith("model.")}
    extras = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(7, dtype=torch.int),
    }
    if config.text_encoder.layout == "openai":
        extras[POSITION_IDS] = torch.arange(77)[None]
    path = tmp_path_factory.mktemp(request.param) / "training.ckpt"
    torch.save({"state_dict": {**weights, **ema, **extras}, "global_step": 840000, "epoch": 3}, path)
    return Source(request.param, TINY_CONFIGS[request.param], config, weights, ema, extras, path)


def run(capsys, *args: object) -> tuple[int, str, list[str]]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def convert(capsys, source: Source, destination: Path, *options: str) -> dict[str, object]:
    code, out, err = run(
        capsys, "convert", source.path, destination, "--config", source.config_path, *options
    )
    assert code == 0, err
    assert out == f"{sha256_file(destination)}  {destination}\n"
    return read_checkpoint(destination)


def assert_same_tensors(actual: dict[str, object], expected: dict[str, Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def assert_one_error_line(code: int, err: list[str], message: str) -> None:
    assert code != 0
    assert len(err) == 1 and err[0].startswith("ldm-inpaint: error: "), err
    assert message in err[0]


def test_round_trip_ckpt_safetensors_ckpt_is_bit_exact(source: Source, tmp_path: Path, capsys):
    middle, back = tmp_path / "model.safetensors", tmp_path / "model.ckpt"
    assert_same_tensors(convert(capsys, source, middle), source.tensors)
    assert_same_tensors(convert(capsys, Source(**{**vars(source), "path": middle}), back), source.tensors)
    assert list(torch.load(back, weights_only=True)) == ["state_dict"]
    assert middle.stat().st_mode & 0o777 == back.stat().st_mode & 0o777


def test_lightning_state_is_left_out_with_a_note(source: Source, tmp_path: Path, capsys):
    code, _, err = run(capsys, "convert", source.path, tmp_path / "m.ckpt", "--config", source.config_path)
    assert code == 0
    assert "ldm-inpaint: left out 2 Lightning training state (not tensors; only tensors are written): " in (
        "\n".join(err)
    )
    assert "global_step" not in read_checkpoint(tmp_path / "m.ckpt")


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_converts_floating_weights_only(source: Source, tmp_path: Path, capsys, name, dtype):
    path = tmp_path / f"model-{name}.safetensors"
    converted = convert(capsys, source, path, "--dtype", name)
    for key, value in source.tensors.items():
        if value.is_floating_point() and key not in SCHEDULE_KEYS:
            assert converted[key].dtype == dtype and torch.equal(converted[key], value.to(dtype)), key
        else:
            assert converted[key].dtype == value.dtype and torch.equal(converted[key], value), key
    assert converted["model_ema.num_updates"].dtype == torch.int32
    assert load_model(path, source.config).model.dtype == dtype


def test_ema_replaces_model_weights_and_drops_the_copy(source: Source, tmp_path: Path, capsys):
    path = tmp_path / "ema.ckpt"
    converted = convert(capsys, source, path, "--ema")
    shadowed = {
        key: source.ema[ema_key(key)] if key.startswith("model.") else v for key, v in source.weights.items()
    }
    assert_same_tensors(converted, {**shadowed, **source.extras})
    key = "model.diffusion_model.out.2.bias"
    assert torch.equal(converted[key], source.weights[key] + 1.0)
    loaded = load_model(path, source.config).model.state_dict()
    assert torch.equal(loaded[key], source.weights[key] + 1.0)


def test_prune_keeps_exactly_the_inference_keys(source: Source, tmp_path: Path, capsys):
    converted = convert(capsys, source, tmp_path / "pruned.safetensors", "--prune")
    assert_same_tensors(converted, source.weights)
    left_out = set(source.tensors) - set(converted)
    assert left_out == set(source.ema) | set(source.extras)


def test_result_loads_and_keeps_the_original_text_layout(source: Source, tmp_path: Path, capsys):
    path = tmp_path / "model.safetensors"
    converted = convert(capsys, source, path, "--prune")
    text_keys = [key for key in converted if key.startswith("cond_stage_model.")]
    if source.family == "v1":
        assert text_keys and all(key.startswith(SD1_TEXT_PREFIX) for key in text_keys)
    else:
        assert text_keys and all(key.startswith(OUR_TEXT_PREFIX) for key in text_keys)
    loaded = load_model(path, source.config)
    weights = {key: value for key, value in converted.items() if key not in SCHEDULE_KEYS}
    assert_same_tensors(to_file_layout(loaded.model.state_dict(), source.config), weights)
    assert list(loaded.skipped) == ["DDPM schedule buffers (recomputed from the config)"]


def test_existing_destination_is_never_overwritten(source: Source, tmp_path: Path, capsys):
    destination = tmp_path / "taken.safetensors"
    destination.write_bytes(b"keep me")
    code, out, err = run(capsys, "convert", source.path, destination, "--config", source.config_path)
    assert_one_error_line(code, err, f"output {destination} already exists; it is never overwritten")
    assert out == "" and destination.read_bytes() == b"keep me"
    # A file that appears while converting is not replaced either (the final step is os.link).
    with pytest.raises(LdmInpaintError, match="already exists"):
        write_checkpoint({"x": torch.zeros(2)}, destination)
    assert destination.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]


def test_failed_write_leaves_no_file(source: Source, tmp_path: Path, capsys, monkeypatch):
    def disk_full(obj: object, file: Path) -> None:
        Path(file).write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    destination = tmp_path / "out.ckpt"
    code, _, err = run(capsys, "convert", source.path, destination, "--config", source.config_path)
    assert_one_error_line(code, err, f"cannot write {destination}: No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """A v1 tiny checkpoint with no EMA copy and one entry nobody knows."""
    path = tmp_path_factory.mktemp("plain") / "odd.ckpt"
    torch.save({**random_checkpoint(load_config(TINY_CONFIGS["v1"])), "something_else": torch.zeros(1)}, path)
    return path


@pytest.mark.parametrize(
    ("case", "options", "message"),
    [
        ("missing", [], "checkpoint not found: "),
        ("text", [], "or a safetensors file, found neither"),
        ("plain", ["--ema"], "EMA weights requested, but the file has no 'model_ema.*' copy"),
        ("plain", [], "1 unexpected entries (something_else): not written without --prune"),
        ("plain", ["--config", TINY_CONFIGS["v2"]], "does not match config 'v2-inpainting-tiny'"),
        ("plain", ["--config", "no-such-config"], "config file not found: no-such-config"),
        (
            "undetectable",
            ["--prune"],
            "cannot detect the model: UNet has 9 input channels and context width 32",
        ),
    ],
)
def test_bad_input_is_one_error_line(plain: Path, tmp_path: Path, capsys, case, options, message):
    sources = {"missing": tmp_path / "absent.ckpt", "text": tmp_path / "notes.ckpt", "plain": plain}
    (tmp_path / "notes.ckpt").write_text("hello, I am text\n")
    if case != "undetectable" and "--config" not in options:
        options = [*options, "--config", TINY_CONFIGS["v1"]]
    destination = tmp_path / "out.safetensors"
    code, out, err = run(capsys, "convert", sources.get(case, plain), destination, *options)
    assert_one_error_line(code, err, message)
    assert out == "" and not destination.exists()


def test_bad_destination_suffix(plain: Path, tmp_path: Path, capsys):
    code, _, err = run(capsys, "convert", plain, tmp_path / "out.bin", "--config", TINY_CONFIGS["v1"])
    assert_one_error_line(code, err, "expected a name ending in .ckpt or .safetensors")


def test_prune_drops_unknown_entries(plain: Path, tmp_path: Path, capsys):
    path = tmp_path / "clean.ckpt"
    code, _, err = run(capsys, "convert", plain, path, "--prune", "--config", TINY_CONFIGS["v1"])
    assert code == 0
    assert "ldm-inpaint: left out 1 unexpected entries (pruned): something_else" in err
    assert "something_else" not in read_checkpoint(path)


def _parameter_counts(weights: dict[str, Tensor]) -> dict[str, int]:
    counts = {
        name: sum(value.numel() for key, value in weights.items() if key.startswith(prefix))
        for name, prefix in PREFIXES.items()
    }
    return {**counts, "total": sum(counts.values())}


def test_inspect_text_report(source: Source, capsys):
    code, out, _ = run(capsys, "inspect", source.path, "--config", source.config_path)
    assert code == 0
    lines = out.splitlines()
    assert f"sha256      {sha256_file(source.path)}" in lines
    assert f"size        {source.path.stat().st_size:,} bytes" in lines
    assert (
        f"config      {source.config.name} (given): SD{source.family[1]} inpainting, eps-prediction" in lines
    )
    for name, count in _parameter_counts(source.weights).items():
        assert f"  {name:<14}{count:>15,}  ({count:,})" in lines
    assert f"EMA copy    {len(source.ema)} tensors, one for every model.* weight" in lines
    assert "  2 Lightning training state: global_step, epoch" in lines
    assert "schedule    12 of 12 buffers stored; alphas_cumprod matches the config" in lines
    with torch.device("meta"):
        expected = len(LatentDiffusion(source.config).state_dict())
    keys = (
        f"keys        all {expected} weights present with their shapes as dense floating point, nothing else"
    )
    assert keys in lines


def test_inspect_json_reports_mismatches_without_failing(tmp_path: Path, capsys):
    config = load_config(TINY_CONFIGS["v1"])
    weights = random_checkpoint(config, seed=2)
    broken = {
        key: value.half() if key.startswith("first_stage_model.") else value for key, value in weights.items()
    }
    del broken["model.diffusion_model.out.2.weight"]
    broken["first_stage_model.quant_conv.bias"] = torch.zeros(5, dtype=torch.float16)
    broken["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    broken["mystery"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    save_file(broken, path)
    code, out, _ = run(capsys, "inspect", path, "--config", TINY_CONFIGS["v1"], "--json")
    assert code == 0
    report = json.loads(out)
    assert report["sha256"] == sha256_file(path) and report["size_bytes"] == path.stat().st_size
    counted = {key: value for key, value in broken.items() if key != "mystery"}
    assert report["parameters"] == _parameter_counts(counted)
    assert report["config_parameters"] == _parameter_counts(weights)
    float16 = sum(key.startswith("first_stage_model.") for key in broken)
    assert report["dtypes"] == {"float32": len(broken) - float16, "float16": float16}
    assert report["unknown"] == ["mystery"]
    assert report["keys"]["ok"] is False
    assert "1 missing (model.diffusion_model.out.2.weight)" in report["keys"]["detail"]
    assert "1 mis-shaped (first_stage_model.quant_conv.bias (5,) vs (8,))" in report["keys"]["detail"]
    assert report["schedule"]["ok"] is False and "differs from config" in report["schedule"]["detail"]
    assert report["ema"] == {"ok": None, "detail": "none"}


def test_inspect_without_a_detectable_config_still_reports(source: Source, capsys):
    code, out, _ = run(capsys, "inspect", source.path, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["config"] is None and "cannot detect the model" in report["config_problem"]
    assert report["keys"]["ok"] is None and report["parameters"] == _parameter_counts(source.weights)
    assert report["extras"]["DDPM schedule buffers (recomputed from the config)"] == list(SCHEDULE_KEYS)


def test_inspect_bad_file_is_one_error_line(tmp_path: Path, capsys):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"\x00" * 64)
    code, out, err = run(capsys, "inspect", path)
    assert_one_error_line(code, err, "or a safetensors file, found neither")
    assert out == ""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_full_size_fp16_pruned_safetensors_is_detected_and_matches_the_manifest(
    family, tmp_path: Path, capsys
):
    config = load_config(FULL_CONFIGS[family])
    weights = random_checkpoint(config, seed=0)
    source = tmp_path / "full.ckpt"
    torch.save({"state_dict": weights, "global_step": 1}, source)
    expected_counts = _parameter_counts(weights)
    del weights
    destination = tmp_path / "full-fp16.safetensors"
    code, _, err = run(capsys, "convert", source, destination, "--dtype", "fp16", "--prune")
    assert code == 0, err
    assert f"ldm-inpaint: config {config.name} (detected from the checkpoint)" in err
    manifest = json.loads(MANIFESTS[family].read_text())
    converted = read_checkpoint(destination)
    assert {key: list(value.shape) for key, value in converted.items()} == {
        key: shape for key, (shape, _) in manifest.items()
    }
    code, out, _ = run(capsys, "inspect", destination, "--json")
    report = json.loads(out)
    assert report["config"] == config.name and report["config_source"] == "detected from the checkpoint"
    assert report["parameters"] == expected_counts == report["config_parameters"]
    assert report["keys"]["ok"] and report["schedule"]["ok"]
    assert report["dtypes"] == {"float16": len(manifest) - len(SCHEDULE_KEYS), "float32": len(SCHEDULE_KEYS)}
    assert math.isclose(destination.stat().st_size, 2 * expected_counts["total"], rel_tol=0.01)
