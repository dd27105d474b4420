"""LoRAs where users meet them: the pipeline (apply, replace, remove bit for bit, the text memo), the
``--lora`` option of the command (metadata, one-line errors) and the ``lora`` axis of ablations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from ldm_inpaint.ablation.cli import ablate_main
from ldm_inpaint.cli import main
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import LdmInpaintError, LoRAError
from ldm_inpaint.files import sha256_file
from ldm_inpaint.image_io import read_png_metadata
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.random_weights import random_checkpoint

from .conftest import TINY_CONFIGS
from .loras import random_lora, text_shapes, unet_shapes
from .test_ablate import jsonl_rows
from .test_cli import base_args, write_pair
from .test_lora import tiny_model

OPTIONS = {"prompt": "a red bench", "steps": 2, "seed": 5, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny checkpoint, a LoRA of every UNet and text module, one of the text encoder only, a bad one."""
    folder = tmp_path_factory.mktemp("lora-files")
    config = load_config(TINY_CONFIGS["v1"])
    paths = {"checkpoint": folder / "tiny-v1.ckpt"}
    torch.save({"state_dict": random_checkpoint(config, seed=9)}, paths["checkpoint"])
    model = tiny_model()
    for name, shapes in (
        ("full", unet_shapes(model) | text_shapes(model, 3)),
        ("text", text_shapes(model, 3)),
    ):
        paths[name] = folder / f"{name}.safetensors"
        save_file(random_lora(shapes, seed=len(name)), paths[name])
    paths["bad"] = folder / "bad.safetensors"
    save_file(
        {
            "lora_unet_nowhere.lora_down.weight": torch.ones(2, 2),
            "lora_unet_nowhere.lora_up.weight": torch.ones(2, 2),
        },
        paths["bad"],
    )
    return paths


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    return image, mask


def test_loras_change_the_images_and_removing_them_restores_them(files, pair) -> None:
    pipeline = InpaintPipeline.from_checkpoint(files["checkpoint"], TINY_CONFIGS["v1"])
    base = pipeline(*pair, **OPTIONS).images
    pipeline.set_loras([(files["full"], 0.5)])
    assert [(lora.unet_modules, lora.text_modules) for lora in pipeline.loras] == [(201, 18)]
    with_lora = pipeline(*pair, **OPTIONS).images
    assert (with_lora - base).abs().max() > 0.05
    loaded_with_it = InpaintPipeline.from_checkpoint(
        files["checkpoint"], TINY_CONFIGS["v1"], loras=[(files["full"], 0.5)]
    )
    assert torch.equal(loaded_with_it(*pair, **OPTIONS).images, with_lora)
    pipeline.set_loras([])
    assert pipeline.loras == [] and torch.equal(pipeline(*pair, **OPTIONS).images, base)


def test_a_text_encoder_lora_replaces_the_memoized_contexts(files, pair) -> None:
    pipeline = InpaintPipeline.from_checkpoint(files["checkpoint"], TINY_CONFIGS["v1"])
    base = pipeline(*pair, **OPTIONS).images  # memoizes the prompt's context
    pipeline.set_loras([files["text"]])
    assert [(lora.unet_modules, lora.text_modules) for lora in pipeline.loras] == [(0, 18)]
    assert (pipeline(*pair, **OPTIONS).images - base).abs().max() > 0.05
    pipeline.set_loras([])
    assert torch.equal(pipeline(*pair, **OPTIONS).images, base)


def test_a_bad_file_keeps_the_loras_applied_before(files, pair) -> None:
    pipeline = InpaintPipeline.from_checkpoint(files["checkpoint"], TINY_CONFIGS["v1"], loras=[files["full"]])
    before = pipeline(*pair, **OPTIONS).images
    with pytest.raises(LoRAError, match=r"1 of 1 LoRA module.*\(lora_unet_nowhere\)"):
        pipeline.set_loras([files["bad"]])
    assert [lora.lora.path for lora in pipeline.loras] == [files["full"]]
    assert torch.equal(pipeline(*pair, **OPTIONS).images, before)


def test_a_compiled_pipeline_takes_loras_at_construction_only(files) -> None:
    model = tiny_model()
    pipeline = InpaintPipeline(model, compile=True, loras=[files["text"]])
    assert len(pipeline.loras) == 1
    with pytest.raises(LdmInpaintError, match="compiled pipeline does not see weights changed"):
        pipeline.set_loras([])


# ---- the command ----------------------------------------------------------------------------------------


def test_command_applies_loras_and_records_them(files, tmp_path: Path, capsys) -> None:
    image, mask = write_pair(tmp_path / "in", "photo")
    outdir = tmp_path / "out"
    args = [*base_args(files["checkpoint"], outdir), "--image", str(image), "--mask", str(mask)]
    assert main([*args, "--lora", f"{files['full']}:0.5", "--lora", str(files["text"])]) == 0
    (png,) = outdir.glob("*.png")
    sha = {name: sha256_file(files[name])[:12] for name in ("full", "text")}
    expected = f"full.safetensors:0.5 (sha256 {sha['full']}); text.safetensors:1 (sha256 {sha['text']})"
    assert read_png_metadata(png)["lora"] == expected
    err = capsys.readouterr().err
    assert f"LoRA full.safetensors:0.5 (sha256 {sha['full']}): 201 UNet and 18 text-encoder modules" in err


def test_command_refuses_a_lora_that_does_not_fit_in_one_line(files, tmp_path: Path, capsys) -> None:
    image, mask = write_pair(tmp_path / "in", "photo")
    outdir = tmp_path / "out"
    args = [*base_args(files["checkpoint"], outdir), "--image", str(image), "--mask", str(mask)]
    assert main([*args, "--lora", str(files["bad"])]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1
    assert re.fullmatch(
        r"ldm-inpaint: error: .*bad.safetensors: 1 of 1 LoRA module\(s\) name no module of this model "
        r"\(lora_unet_nowhere\); is it a LoRA for another model \(e.g. SDXL\)\?",
        errors[0],
    )
    assert not list(outdir.glob("*.png"))


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("missing.safetensors", r"--lora: LoRA file not found: .*missing.safetensors"),
        (
            "full.safetensors:inf",
            r"argument --lora: LoRA '.*': expected FILE\[:WEIGHT\] with a finite weight, found inf",
        ),
    ],
)
def test_command_refuses_bad_lora_arguments_in_one_line(
    files, tmp_path: Path, capsys, argument: str, message: str
) -> None:
    args = [*base_args(files["checkpoint"], tmp_path / "out"), "--lora", str(files["full"].parent / argument)]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(rf"ldm-inpaint: error: {message} \(see ldm-inpaint --help\)", line)


# ---- ablations ------------------------------------------------------------------------------------------


def test_lora_axis_identifies_cells_by_file_contents_and_weight(files, tmp_path: Path) -> None:
    image, mask = write_pair(tmp_path / "in", "photo", size=(64, 64))
    spec = {
        "checkpoint": {"path": str(files["checkpoint"]), "config": str(TINY_CONFIGS["v1"])},
        "pairs": [{"image": str(image), "mask": str(mask)}],
        "fixed": {"steps": 1, "scale": 1.0, "prompt": "a cat", "seed": 3},
        "sweep": {"lora": ["none", f"{files['full']}:0.5", [str(files["full"]), str(files["text"])]]},
    }
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    assert ablate_main(["--spec", str(spec_path), "--out", str(out)]) == 0
    rows = jsonl_rows(out)
    assert [row["lora"] for row in rows] == [
        None,
        f"{files['full']}:0.5",
        f"{files['full']}:1; {files['text']}:1",
    ]
    sha = {name: sha256_file(files[name]) for name in ("full", "text")}
    assert [row["lora_sha256"] for row in rows] == [None, sha["full"], f"{sha['full']}; {sha['text']}"]
    assert len({row["hash"] for row in rows}) == 3
    images = [read_png_metadata(out / row["cell_image"]) for row in rows]
    assert "lora" not in images[0] and images[1]["lora"] == f"{files['full']}:0.5"
    # the cell without LoRAs keeps the hash it had before the lora key existed
    del spec["sweep"]
    spec_path.write_text(yaml.safe_dump(spec))
    plain = tmp_path / "plain"
    assert ablate_main(["--spec", str(spec_path), "--out", str(plain)]) == 0
    assert [row["hash"] for row in jsonl_rows(plain)] == [rows[0]["hash"]]
    # the same LoRA under another name is the same cell: resumed, not run again
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(files["full"].read_bytes())
    again = ["--spec", str(spec_path), "--out", str(out), "--lora", f"{copy}:0.5"]
    assert ablate_main(again) == 0
    assert len(jsonl_rows(out)) == 3
