"""diffusers-format folders, as diffusers' own conversion writes them from a random original-layout checkpoint,
read back into the original layout: every tensor identical, the same pixels as the checkpoint, strict
accounting of what is missing or left over, the other weight files users have (.bin, fp16 variants, shards,
older names, Hugging Face cache folders), ``convert`` and ``inspect`` of a folder, and ppdiffusers' Paddle
folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_inpaint.checkpoint import load_model
from ldm_inpaint.cli import main as ldm_inpaint
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import CheckpointError
from ldm_inpaint.formats.diffusers import UNUSED_OPENCLIP, detect_folder_config, read_folder
from ldm_inpaint.inspection import inspect_checkpoint
from ldm_inpaint.options import InpaintOptions
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.random_weights import random_checkpoint
from scripts.benchmarking.diffusers_files import diffusers_pipeline

from .conftest import FULL_CONFIGS, TINY_CONFIGS

MODEL_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
UNET_FILE = Path("unet") / "diffusion_pytorch_model.safetensors"
VAE_FILE = Path("vae") / "diffusion_pytorch_model.safetensors"


def write_folder(config: Path, folder: Path, seed: int = 0) -> tuple[dict, Path]:
    """A random original-layout checkpoint of ``config`` (saved beside the folder) and the diffusers folder
    that diffusers' conversion writes from it."""
    checkpoint = random_checkpoint(load_config(config), seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": checkpoint}, folder.with_suffix(".ckpt"))
    diffusers_pipeline(config, checkpoint).save_pretrained(folder)
    return checkpoint, folder


@pytest.fixture(scope="module", params=["v1", "v2"])
def written(request, tmp_path_factory) -> tuple[str, dict, Path]:
    version = request.param
    folder = tmp_path_factory.mktemp("diffusers") / version
    checkpoint, folder = write_folder(TINY_CONFIGS[version], folder)
    return version, checkpoint, folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def assert_original_tensors(entries: dict, checkpoint: dict, filled: list[str]) -> None:
    """Every model weight of ``checkpoint`` is in ``entries`` unchanged, but the ``filled`` ones (zeros)."""
    weights = [key for key in checkpoint if key.startswith(MODEL_PREFIXES)]
    assert set(entries) == set(checkpoint)
    for key in weights:
        expected = torch.zeros_like(checkpoint[key]) if key in filled else checkpoint[key]
        assert torch.equal(entries[key], expected), key
    for key in set(checkpoint) - set(weights):  # the DDPM buffers, from the scheduler config
        assert torch.equal(entries[key], checkpoint[key].float()), key


def test_a_folder_written_by_diffusers_loads_back_to_the_original_tensors(written) -> None:
    version, checkpoint, folder = written
    read = read_folder(folder, TINY_CONFIGS[version])
    filled = read.skipped.get(UNUSED_OPENCLIP, [])
    assert_original_tensors(read.entries, checkpoint, filled)
    assert read.format == "diffusers folder"
    if version == "v1":
        assert filled == []
    else:  # SD2: only what it never runs (the last block, the projection, the logit scale) is absent
        layers = load_config(TINY_CONFIGS[version]).text_encoder.layers
        assert filled and all(
            f"resblocks.{layers - 1}." in key or key.endswith(("text_projection", "logit_scale"))
            for key in filled
        )


def test_a_folder_inpaints_what_its_checkpoint_inpaints(written) -> None:
    version, _, folder = written
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    options = InpaintOptions(prompt="a red door", steps=3, guidance_scale=4.0)
    from_file = InpaintPipeline.from_checkpoint(folder.with_suffix(".ckpt"), TINY_CONFIGS[version])
    from_folder = InpaintPipeline.from_checkpoint(folder, TINY_CONFIGS[version])
    expected = from_file(image, mask, options, seed=3).images
    assert torch.equal(from_folder(image, mask, options, seed=3).images, expected)


def test_bin_fp16_sharded_and_older_files_are_read(written, tmp_path: Path) -> None:
    version, checkpoint, folder = written
    folder = copy_of(folder, tmp_path)
    unet = load_file(folder / UNET_FILE)
    (folder / UNET_FILE).unlink()
    torch.save(unet, folder / "unet" / "diffusion_pytorch_model.bin")
    vae = load_file(folder / VAE_FILE)
    (folder / VAE_FILE).unlink()
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    older = {}
    for key, value in vae.items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        older[key] = value
    save_file(older, folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")
    (folder / "text_encoder" / "model.safetensors").unlink()
    text = {"text_model." + key: value for key, value in text.items()}
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    names = sorted(text)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({key: text[key] for key in keys}, folder / "text_encoder" / shard)
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    index = folder / "text_encoder" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    read = read_folder(folder, TINY_CONFIGS[version])
    assert_original_tensors(read.entries, checkpoint, read.skipped.get(UNUSED_OPENCLIP, []))
    assert read.skipped["text-encoder position ids (implied by position)"] == ["embeddings.position_ids"]
    assert [path.name for path in read.files["text_encoder"]] == sorted(shards)


def test_a_bin_file_that_would_run_code_is_refused(written, tmp_path: Path) -> None:
    version, _, folder = written
    folder = copy_of(folder, tmp_path)
    (folder / UNET_FILE).unlink()
    torch.save({"weights": Path("x")}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pathlib"):
        read_folder(folder, TINY_CONFIGS[version])


def test_a_hugging_face_cache_folder_is_its_snapshot_of_main(written, tmp_path: Path) -> None:
    version, checkpoint, folder = written
    cache = tmp_path / "models--org--model"
    shutil.copytree(folder, cache / "snapshots" / "abc123")
    (cache / "snapshots" / "0ld").mkdir()
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123\n")
    loaded = load_model(cache, TINY_CONFIGS[version])
    assert torch.equal(
        loaded.model.state_dict()["model.diffusion_model.out.2.weight"],
        checkpoint["model.diffusion_model.out.2.weight"],
    )
    (cache / "refs" / "main").unlink()
    with pytest.raises(CheckpointError, match="2 snapshots and no usable refs/main"):
        load_model(cache, TINY_CONFIGS[version])


def test_missing_and_unexpected_weights_are_named(written, tmp_path: Path) -> None:
    version, _, folder = written
    folder = copy_of(folder, tmp_path)
    unet = load_file(folder / UNET_FILE)
    del unet["conv_in.bias"]
    unet["extra.weight"] = torch.zeros(1)
    save_file(unet, folder / UNET_FILE)
    with pytest.raises(CheckpointError, match=r"1 missing \(conv_in.bias\); 1 unexpected \(extra.weight\)"):
        read_folder(folder, TINY_CONFIGS[version])
    (folder / UNET_FILE).unlink()
    with pytest.raises(
        CheckpointError, match="no weights; expected one of diffusion_pytorch_model.safetensors"
    ):
        read_folder(folder, TINY_CONFIGS[version])


def test_the_scheduler_must_fit_the_config(written, tmp_path: Path) -> None:
    version, _, folder = written
    folder = copy_of(folder, tmp_path)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(CheckpointError, match=r"prediction\) = .*'v'\), config .* has .*'eps'\)"):
        read_folder(folder, TINY_CONFIGS[version])


@pytest.mark.parametrize(
    ("in_channels", "context", "prediction", "name"),
    [
        (9, 768, "epsilon", "v1-inpainting-inference"),
        (9, 1024, "epsilon", "v2-inpainting-inference"),
        (4, 768, "epsilon", "v1-inference"),
        (4, 1024, "epsilon", "v2-inference"),
        (4, 1024, "v_prediction", "v2-inference-v"),
    ],
)
def test_the_config_is_detected_from_the_unet_and_scheduler_configs(
    tmp_path: Path, in_channels: int, context: int, prediction: str, name: str
) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    unet = {"in_channels": in_channels, "cross_attention_dim": context}
    (tmp_path / "unet" / "config.json").write_text(json.dumps(unet))
    scheduler = {"prediction_type": prediction}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    assert detect_folder_config(tmp_path) == name
    scheduler["prediction_type"] = "v_prediction"
    if name not in ("v2-inference", "v2-inference-v"):  # v models: SD2 text-to-image only
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
        with pytest.raises(CheckpointError, match="Pass --config"):
            detect_folder_config(tmp_path)


def test_convert_writes_the_folder_as_an_original_checkpoint(written, tmp_path: Path, capsys) -> None:
    version, checkpoint, folder = written
    out = tmp_path / "converted.ckpt"
    status = ldm_inpaint(["convert", str(folder), str(out), "--config", str(TINY_CONFIGS[version])])
    assert status == 0
    written_state = torch.load(out, weights_only=True)["state_dict"]
    filled = [key for key in written_state if key not in checkpoint]
    assert filled == []
    unused = read_folder(folder, TINY_CONFIGS[version]).skipped.get(UNUSED_OPENCLIP, [])
    assert_original_tensors(written_state, checkpoint, unused)
    err = capsys.readouterr().err
    assert ("filled with zeros" in err) == (version == "v2")
    assert ldm_inpaint(["convert", str(folder), str(out), "--config", str(TINY_CONFIGS[version])]) == 2


def test_inspect_reports_a_folder(written) -> None:
    version, _, folder = written
    report = inspect_checkpoint(folder, TINY_CONFIGS[version])
    assert report.format == "diffusers folder"
    assert report.keys.ok and report.sha256 is None
    assert {Path(path).parent.name for path in report.files} == {"unet", "vae", "text_encoder"}
    assert report.size_bytes == sum(Path(path).stat().st_size for path in report.files)


def test_the_cli_takes_a_folder_and_refuses_other_folders(written, tmp_path: Path, capsys) -> None:
    version, _, folder = written
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (120, 30, 30)).save(image)
    Image.new("L", (64, 64), 255).save(mask)
    common = [
        "--image",
        str(image),
        "--mask",
        str(mask),
        "--steps",
        "2",
        "--config",
        str(TINY_CONFIGS[version]),
    ]
    assert ldm_inpaint(["--ckpt", str(folder), *common, "--outdir", str(tmp_path / "out")]) == 0
    assert "config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        ldm_inpaint(["--ckpt", str(tmp_path), *common, "--outdir", str(tmp_path / "out2")])
    assert exit_.value.code == 2
    assert "found a folder without model_index.json" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_folders_load_back_to_the_original_tensors(version: str, tmp_path: Path) -> None:
    checkpoint, folder = write_folder(FULL_CONFIGS[version], tmp_path / version)
    read = read_folder(folder)
    assert read.config.name == FULL_CONFIGS[version].stem
    assert_original_tensors(read.entries, checkpoint, read.skipped.get(UNUSED_OPENCLIP, []))


def test_a_ppdiffusers_folder_reads_as_its_diffusers_folder(written, tmp_path: Path) -> None:
    """The folder's components written as ``paddle.save`` writes them (Linear weights transposed, PaddleNLP's
    text-encoder names) and with PaddleNLP's ``model_config.json``: the same original-layout tensors."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .test_formats_paddle import paddle_layout, paddle_save

    version, _, folder = written
    paddle_folder = tmp_path / "ppdiffusers"
    shutil.copytree(folder, paddle_folder, ignore=shutil.ignore_patterns("*.safetensors"))
    models = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    for component, model_class in models.items():
        model = model_class.from_pretrained(folder / component)
        paddle_save(
            paddle_folder / component / "model_state.pdparams",
            paddle_layout(model, component == "text_encoder"),
        )
    text_config = paddle_folder / "text_encoder" / "config.json"
    text_config.rename(text_config.with_name("model_config.json"))
    read = read_folder(paddle_folder, TINY_CONFIGS[version])
    expected = read_folder(folder, TINY_CONFIGS[version])
    assert read.format == "ppdiffusers folder (PaddlePaddle weights)"
    assert read.entries.keys() == expected.entries.keys()
    assert all(torch.equal(read.entries[key], value) for key, value in expected.entries.items())


def test_ablate_takes_a_folder_on_its_checkpoint_axis(written, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from ldm_inpaint.ablation.cli import ablate_main

    version, _, folder = written
    image, mask, out = tmp_path / "photo.png", tmp_path / "photo_mask.png", tmp_path / "study"
    Image.new("RGB", (64, 64), (30, 140, 60)).save(image)
    Image.new("L", (64, 64), 255).save(mask)
    checkpoints = ["--ckpt", str(folder), "--ckpt", str(folder.with_suffix(".ckpt"))]
    common = ["--config", str(TINY_CONFIGS[version]), "--image", str(image), "--mask", str(mask)]
    assert ablate_main([*checkpoints, *common, "--out", str(out), "--steps", "2", "--seed", "1"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["status"] for row in rows] == ["ok", "ok"]
    from_folder, from_file = (np.asarray(Image.open(out / row["cell_image"])) for row in rows)
    assert np.array_equal(from_folder, from_file)
