"""Loading real-format files into our modules: layouts, extras, EMA, detection, and every kind of bad file."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_inpaint.checkpoint import (
    SD1_TEXT_PREFIX,
    copied_text_entries,
    detect_config,
    ema_key,
    load_model,
    sort_entries,
)
from ldm_inpaint.checkpoint_files import read_checkpoint
from ldm_inpaint.cli import main
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import CheckpointError
from ldm_inpaint.files import sha256_file
from ldm_inpaint.random_weights import random_checkpoint

from .conftest import TINY_CONFIGS


@pytest.fixture(scope="module", params=["v1", "v2"])
def tiny(request):
    config = load_config(TINY_CONFIGS[request.param])
    return config, random_checkpoint(config, seed=1)


def _weights_equal(model: torch.nn.Module, file_weights: dict, config) -> None:
    from ldm_inpaint.checkpoint import to_file_layout

    ours = to_file_layout(model.state_dict(), config)
    for key, value in ours.items():
        assert torch.equal(value, file_weights[key].to(value.dtype)), key


def test_plain_ckpt_loads_every_weight(tiny, tmp_path: Path):
    config, weights = tiny
    path = tmp_path / "model.ckpt"
    torch.save(weights, path)
    loaded = load_model(path, config)
    _weights_equal(loaded.model, weights, config)
    assert list(loaded.skipped) == ["DDPM schedule buffers (recomputed from the config)"]
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_lightning_wrapper_and_real_extras(tiny, tmp_path: Path):
    config, weights = tiny
    extras = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(10, dtype=torch.int),
    }
    if config.text_encoder.layout == "openai":
        extras[SD1_TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {**weights, **extras}, "global_step": 840000, "epoch": 3}, path)
    loaded = load_model(path, config)
    _weights_equal(loaded.model, weights, config)
    skipped = {key for keys in loaded.skipped.values() for key in keys}
    assert set(extras) | {"global_step", "epoch"} <= skipped


def test_safetensors_fp16_keeps_or_converts_dtype(tiny, tmp_path: Path):
    config, weights = tiny
    path = tmp_path / "model-fp16.safetensors"
    save_file({key: value.half().contiguous() for key, value in weights.items()}, path)
    assert load_model(path, config).model.dtype == torch.float16
    loaded = load_model(path, config, dtype=torch.float32)
    assert loaded.model.dtype == torch.float32
    _weights_equal(loaded.model, {k: v.half() for k, v in weights.items()}, config)


def test_full_ema_copy_on_request(tiny, tmp_path: Path):
    config, weights = tiny
    ema = {ema_key(key): value + 1.0 for key, value in weights.items() if key.startswith("model.")}
    path = tmp_path / "ema.ckpt"
    torch.save({**weights, **ema, "model_ema.decay": torch.tensor(0.9999)}, path)
    plain = load_model(path, config)
    _weights_equal(plain.model, weights, config)
    assert len(plain.skipped["EMA copy (load it with use_ema)"]) == len(ema)
    with_ema = load_model(path, config, use_ema=True).model
    key = "model.diffusion_model.out.2.bias"
    assert torch.equal(with_ema.state_dict()[key], weights[key] + 1.0)
    assert ema_key(key) == "model_ema.diffusion_modelout2bias"


def test_ema_requested_but_absent(tiny, tmp_path: Path):
    config, weights = tiny
    path = tmp_path / "plain.ckpt"
    torch.save(weights, path)
    with pytest.raises(CheckpointError, match="no 'model_ema.\\*' copy"):
        load_model(path, config, use_ema=True)


def test_missing_unexpected_and_misshaped_keys_are_named(tiny, tmp_path: Path):
    config, weights = tiny
    broken = dict(weights)
    del broken["model.diffusion_model.out.2.weight"]
    broken["model.diffusion_model.extra.weight"] = torch.zeros(3)
    broken["first_stage_model.quant_conv.bias"] = torch.zeros(5)
    path = tmp_path / "broken.ckpt"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as error:
        load_model(path, config)
    message = str(error.value)
    assert f"does not match config {config.name!r}" in message
    assert "1 missing (model.diffusion_model.out.2.weight)" in message
    assert "1 unexpected (model.diffusion_model.extra.weight)" in message
    assert "1 mis-shaped (first_stage_model.quant_conv.bias (5,) vs (8,))" in message


def test_unknown_top_level_entry(tiny, tmp_path: Path):
    config, weights = tiny
    path = tmp_path / "odd.ckpt"
    torch.save({**weights, "something_else": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="1 unexpected entries \\(something_else\\)"):
        load_model(path, config)


def test_schedule_buffers_cross_check_the_config(tiny, tmp_path: Path):
    config, weights = tiny
    path = tmp_path / "other-schedule.ckpt"
    torch.save({**weights, "alphas_cumprod": torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)}, path)
    with pytest.raises(CheckpointError, match="DDPM schedule \\(alphas_cumprod\\) differs from config"):
        load_model(path, config)


def test_text_to_image_layout_of_another_family_is_refused(tmp_path: Path):
    v1, v2 = (load_config(TINY_CONFIGS[f]) for f in ("v1", "v2"))
    path = tmp_path / "v2.ckpt"
    torch.save(random_checkpoint(v2), path)
    with pytest.raises(CheckpointError, match="does not match config 'v1-inpainting-tiny'"):
        load_model(path, v1)


def _fake(shape_in: int, context: int) -> dict[str, torch.Tensor]:
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, shape_in, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(
            320, context
        ),
    }


@pytest.mark.parametrize(
    ("in_channels", "context", "name"),
    [
        (9, 768, "v1-inpainting-inference"),
        (9, 1024, "v2-inpainting-inference"),
        (4, 768, "v1-inference"),
        (4, 1024, "v2-inference"),
    ],
)
def test_detect_config(in_channels, context, name):
    assert detect_config(_fake(in_channels, context)) == name


def test_detect_config_failures():
    with pytest.raises(CheckpointError, match="UNet has 8 input channels and context width 768"):
        detect_config(_fake(8, 768))
    with pytest.raises(CheckpointError, match="is this a Stable Diffusion checkpoint"):
        detect_config({"encoder.weight": torch.zeros(3)})


def test_not_a_checkpoint(tmp_path: Path):
    path = tmp_path / "notes.ckpt"
    path.write_text("hello, I am text\n")
    with pytest.raises(CheckpointError, match="or a safetensors file, found neither"):
        read_checkpoint(path)
    fake_st = tmp_path / "notes.safetensors"
    fake_st.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="or a safetensors file, found neither"):
        read_checkpoint(fake_st)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "absent.ckpt")


def test_truncated_files(tiny, tmp_path: Path):
    _, weights = tiny
    for suffix, save in ((".ckpt", torch.save), (".safetensors", save_file)):
        whole = tmp_path / f"whole{suffix}"
        save(weights, whole)
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
        with pytest.raises(
            CheckpointError, match="a damaged zip .*download it again|not a readable safetensors"
        ):
            read_checkpoint(cut)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_unexecuted(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load: the pickle names code objects"):
        read_checkpoint(path)
    assert not marker.exists()


def test_pickled_lightning_objects_become_inert(tiny, tmp_path: Path, monkeypatch):
    config, weights = tiny
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.best_model_path = "/somewhere"

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    path = tmp_path / "lightning-objects.ckpt"
    torch.save({"state_dict": weights, "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)
    loaded = load_model(path, config)
    assert "callbacks" in loaded.skipped["Lightning training state"]


def test_sha256_file(tmp_path: Path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"plain text, not a checkpoint", "or a safetensors file, found neither"),
        (None, "refused to load"),
    ],
)
def test_cli_bad_checkpoint_is_one_clear_line(tmp_path: Path, capsys, content, message):
    path = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"payload": _Exploit(tmp_path / "pwned")}, path)
    else:
        path.write_bytes(content)
    image = tmp_path / "image.png"
    mask = tmp_path / "mask.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    Image.new("L", (64, 64)).save(mask)
    code = main(["--ckpt", str(path), "--image", str(image), "--mask", str(mask), "--outdir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert [line for line in err if line.startswith("ldm-inpaint: error:")] == [err[-1]]
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_text_to_image_checkpoints_load_too(family: str, tmp_path: Path) -> None:
    """A 4-channel (text-to-image) layout of either family loads strictly like the inpainting one."""
    from dataclasses import replace

    inpainting = load_config(TINY_CONFIGS[family])
    config = replace(inpainting, unet=replace(inpainting.unet, in_channels=4), conditioning_key="crossattn")
    assert not config.is_inpainting
    path = tmp_path / "t2i.safetensors"
    save_file(random_checkpoint(config, seed=4), path)
    loaded = load_model(path, config)
    assert loaded.model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 4
    with pytest.raises(CheckpointError, match="mis-shaped \\(model.diffusion_model.input_blocks.0.0.weight"):
        load_model(path, inpainting)


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_copied_text_entries_are_sd1_projections_merged_into_in_proj(family: str) -> None:
    """What loading gives back the file pages of: SD1's separate q, k, v projections (weight and bias per
    layer), which the model holds merged; SD2's file holds in_proj as it is."""
    config = load_config(TINY_CONFIGS[family])
    entries = random_checkpoint(config, seed=1)
    copied = copied_text_entries(entries, sort_entries(entries).weights)
    expected = [
        value
        for key, value in entries.items()
        if key.startswith(SD1_TEXT_PREFIX) and key.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj")
    ]
    assert len(copied) == (6 * config.text_encoder.layers if family == "v1" else 0)
    assert [id(tensor) for tensor in copied] == [id(tensor) for tensor in expected]


LEAN_IMPORTS = """
import sys
from ldm_inpaint.checkpoint import build_model
from ldm_inpaint.config import load_config
from ldm_inpaint.random_weights import random_checkpoint
from ldm_inpaint.tokenizer import tokenize

config = load_config(sys.argv[1])
build_model(random_checkpoint(config), config)
tokenize(["a cat"], pad_token=0)
print(" ".join(name for name in ("open_clip", "torchvision", "torch._dynamo") if name in sys.modules))
"""


def test_loading_and_tokenizing_import_neither_open_clip_nor_dynamo() -> None:
    """In a fresh interpreter: open_clip's package (its model zoo and torchvision, 0.27 GiB resident) and
    torch._dynamo (0.17 GiB, imported by nn.Embedding's init on the meta device) stay out of a load."""
    command = [sys.executable, "-c", LEAN_IMPORTS, str(TINY_CONFIGS["v1"])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
