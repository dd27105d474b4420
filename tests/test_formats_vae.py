"""``--vae``: another VAE in place of a model's own, from the files users have (a VAE file in the original
layout with its training-loss weights, a whole checkpoint, a diffusers ``vae/`` folder), loaded as strictly
as a checkpoint, giving the pixels of a checkpoint that had that VAE all along."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm_inpaint.checkpoint import load_model
from ldm_inpaint.cli import main as ldm_inpaint
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import CheckpointError
from ldm_inpaint.image_io import read_png_metadata
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.options import InpaintOptions
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.random_weights import random_checkpoint

from .conftest import TINY_CONFIGS
from .test_formats_diffusers import write_folder

CONFIG = TINY_CONFIGS["v1"]
VAE = "first_stage_model."


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The model (seed 0), the VAE of another one (seed 1) in each form, and the model with that VAE."""
    root = tmp_path_factory.mktemp("vae")
    model, other = random_checkpoint(load_config(CONFIG), 0), random_checkpoint(load_config(CONFIG), 1)
    vae_file = {key.removeprefix(VAE): value for key, value in other.items() if key.startswith(VAE)}
    vae_file["loss.discriminator.main.0.weight"] = torch.ones(2, 3, 4, 4)
    vae_file["loss.logvar"] = torch.zeros(())
    paths = {
        "model": root / "model.ckpt",
        "vae file": root / "vae-ft-mse.ckpt",
        "whole checkpoint": root / "other.safetensors",
        "expected": root / "model-with-vae.ckpt",
    }
    torch.save({"state_dict": model}, paths["model"])
    torch.save({"state_dict": vae_file, "global_step": 840000}, paths["vae file"])
    save_file({key: value.contiguous() for key, value in other.items()}, paths["whole checkpoint"])
    swapped = {**model, **{key: value for key, value in other.items() if key.startswith(VAE)}}
    torch.save({"state_dict": swapped}, paths["expected"])
    _, folder = write_folder(CONFIG, root / "diffusers", seed=1)
    paths["diffusers vae folder"], paths["diffusers model folder"] = folder / "vae", folder
    return paths


def inpaint(pipeline: InpaintPipeline) -> torch.Tensor:
    image = torch.linspace(-1, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 8:40, 16:56] = 1
    return pipeline(image, mask, InpaintOptions(prompt="x", steps=2), seed=0).images


@pytest.mark.parametrize(
    "form", ["vae file", "whole checkpoint", "diffusers vae folder", "diffusers model folder"]
)
def test_each_form_gives_the_pixels_of_a_checkpoint_with_that_vae(files: dict[str, Path], form: str) -> None:
    loaded = load_model(files["model"], CONFIG, vae=files[form])
    expected = load_model(files["expected"], CONFIG)
    assert all(
        torch.equal(value, expected.model.state_dict()[key])
        for key, value in loaded.model.state_dict().items()
    )
    assert torch.equal(inpaint(InpaintPipeline(loaded.model)), inpaint(InpaintPipeline(expected.model)))
    own = load_model(files["model"], CONFIG)
    assert not torch.equal(inpaint(InpaintPipeline(own.model)), inpaint(InpaintPipeline(loaded.model)))
    if form == "vae file":
        kinds = {kind: keys for kind, keys in loaded.skipped.items() if "--vae" in kind}
        assert sorted(kinds) == [
            "autoencoder training-loss weights (discriminator, LPIPS) in --vae vae-ft-mse.ckpt",
            "training state (not tensors) in --vae vae-ft-mse.ckpt",
        ]


def test_the_vae_keeps_the_model_dtype(files: dict[str, Path]) -> None:
    loaded = load_model(files["model"], CONFIG, vae=files["vae file"], dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.first_stage_model.parameters()} == {torch.bfloat16}


def test_a_vae_that_does_not_fit_is_named(files: dict[str, Path], tmp_path: Path) -> None:
    vae = torch.load(files["vae file"], weights_only=True)["state_dict"]
    del vae["decoder.conv_out.bias"]
    vae["encoder.conv_in.weight"] = torch.zeros(1, 3, 3, 3)
    vae["decoder.extra"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(vae, bad)
    with pytest.raises(CheckpointError) as error:
        load_model(files["model"], CONFIG, vae=bad)
    message = str(error.value)
    assert "--vae " in message and "\n" not in message
    for part in ("1 missing (decoder.conv_out.bias)", "1 unexpected (decoder.extra)", "1 mis-shaped"):
        assert part in message


def test_the_cli_records_the_vae_and_refuses_a_missing_one(
    files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (20, 90, 160)).save(image)
    Image.new("L", (64, 64), 255).save(mask)
    common = [
        "--ckpt",
        str(files["model"]),
        "--config",
        str(CONFIG),
        "--image",
        str(image),
        "--mask",
        str(mask),
    ]
    outdir = tmp_path / "out"
    assert (
        ldm_inpaint([*common, "--steps", "2", "--vae", str(files["vae file"]), "--outdir", str(outdir)]) == 0
    )
    (written,) = outdir.glob("*.png")
    metadata = read_png_metadata(written)
    assert metadata["vae"] == "vae-ft-mse.ckpt" and len(metadata["vae_sha256"]) == 12
    with pytest.raises(SystemExit) as exit_:
        ldm_inpaint([*common, "--vae", str(tmp_path / "none.ckpt"), "--outdir", str(tmp_path / "o2")])
    assert exit_.value.code == 2
    assert "--vae: VAE file or folder not found" in capsys.readouterr().err


def test_inspect_says_what_a_vae_or_a_lora_file_holds(files: dict[str, Path], tmp_path: Path) -> None:
    from ldm_inpaint.inspection import format_report, inspect_checkpoint

    from .loras import random_lora, text_shapes, unet_shapes

    vae = inspect_checkpoint(files["vae file"])
    assert vae.holds.startswith("a VAE (") and vae.holds.endswith("use it with --vae")
    assert vae.config is None and vae.config_problem == "not a model"
    with torch.device("meta"):
        model = LatentDiffusion(load_config(CONFIG))
    shapes = {**dict(list(unet_shapes(model).items())[:3]), **text_shapes(model, 1)}
    lora_path = tmp_path / "style.safetensors"
    save_file(random_lora(shapes, rank=4), lora_path)
    lora = inspect_checkpoint(lora_path)
    assert lora.holds == (
        "a LoRA, kohya / AUTOMATIC1111 names: 9 modules (3 UNet, 6 text encoder), rank 4; use it with --lora"
    )
    assert "holds       a LoRA" in format_report(lora)
    model_report = inspect_checkpoint(files["model"], CONFIG)
    assert model_report.holds == "a Stable Diffusion model" and model_report.keys.ok
