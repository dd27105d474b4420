"""The ``ldm-inpaint`` command end to end on a tiny random checkpoint: files, metadata, no overwriting, batch
mode that carries on past a bad pair, and one clear error line for bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_inpaint.cli import main
from ldm_inpaint.config import load_config
from ldm_inpaint.files import sha256_file
from ldm_inpaint.image_io import read_png_metadata
from ldm_inpaint.random_weights import random_checkpoint

from .conftest import CONFIGS, TINY_CONFIGS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-v1.ckpt"
    torch.save({"state_dict": random_checkpoint(load_config(TINY_CONFIGS["v1"]), seed=9)}, path)
    return path


def write_pair(folder: Path, name: str, size: tuple[int, int] = (64, 48)) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    image = folder / f"{name}.png"
    Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(image)
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[10:30, 20:40] = 255
    mask_path = folder / f"{name}_mask.png"
    Image.fromarray(mask).save(mask_path)
    return image, mask_path


def base_args(checkpoint: Path, outdir: Path) -> list[str]:
    return [
        "--ckpt",
        str(checkpoint),
        "--config",
        str(TINY_CONFIGS["v1"]),
        "--prompt",
        "a red bench",
        "--steps",
        "3",
        "--seed",
        "5",
        "--outdir",
        str(outdir),
    ]


def test_single_image_files_metadata_and_no_overwrite(checkpoint: Path, tmp_path: Path, capsys) -> None:
    image, mask = write_pair(tmp_path / "in", "photo")
    outdir = tmp_path / "out"
    args = [*base_args(checkpoint, outdir), "--image", str(image), "--mask", str(mask)]
    args += ["--n-samples", "2", "--save-latents", "--sampler", "ddim", "--eta", "1.0"]
    assert main(args) == 0
    first = sorted(outdir.iterdir())
    assert [p.name for p in first] == [
        "photo-00000.npy",
        "photo-00000.png",
        "photo-00001.npy",
        "photo-00001.png",
    ]
    with Image.open(first[1]) as png:
        assert png.size == (64, 48) and png.mode == "RGB"
    latent = np.load(first[0])
    assert latent.dtype == np.float32 and latent.shape == (4, 8, 8)  # 48x64 padded to 64x64
    meta = read_png_metadata(first[1])
    assert meta["prompt"] == "a red bench" and meta["seed"] == "5" and meta["sampler"] == "ddim"
    assert meta["steps"] == "3" and meta["guidance_scale"] == "7.5" and meta["eta"] == "1.0"
    assert meta["checkpoint"] == "tiny-v1.ckpt"
    assert meta["checkpoint_sha256"] == sha256_file(checkpoint)[:12]
    before = {p: p.read_bytes() for p in first}

    assert main(args) == 0  # same command again: new numbers, old files untouched
    assert len(list(outdir.iterdir())) == 8
    assert all(p.read_bytes() == content for p, content in before.items())
    # Same seed, same inputs: bit-identical pictures and latents.
    assert (outdir / "photo-00002.png").read_bytes() == before[first[1]]
    assert np.array_equal(np.load(outdir / "photo-00002.npy"), latent)
    assert "config v1-inpainting-tiny (given)" in capsys.readouterr().err


def test_batch_goes_on_past_a_bad_pair_and_fails_at_the_end(checkpoint: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "batch"
    write_pair(folder, "a")
    write_pair(folder, "c")
    bad_image, _ = write_pair(folder, "b")
    bad_image.write_bytes(b"not a png at all")
    (folder / "orphan.png").write_bytes((folder / "a.png").read_bytes())
    outdir = tmp_path / "out"
    code = main([*base_args(checkpoint, outdir), "--batch", str(folder)])
    assert code == 1
    assert sorted(p.name for p in outdir.iterdir()) == ["a-00000.png", "c-00000.png"]
    err = capsys.readouterr().err
    assert "2 of 4 item(s) failed" in err
    assert "b.png" in err and "orphan.png" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "steps: expected 1..1000 (the training timesteps), found 0"),
        (["--scale", "-2"], "guidance scale: expected >= 0, found -2.0"),
        (["--sampler", "plms", "--eta", "0.3"], "plms is deterministic: eta must be 0, found 0.3"),
        (["--eta", "1.5"], "eta: expected a value in [0, 1], found 1.5"),
        (["--steps", "many"], "argument --steps: steps: expected an integer, found 'many'"),
        (["--n-samples", "0"], "n_samples: expected at least 1, found 0"),
        (["--mask-blur", "3"], "use it with paste-back or crop-to-mask"),
        (["--crop-to-mask", "-5"], "expected >= 0, found 0, 0.0, -5"),
        (["--seed", str(2**32)], "seed: expected 0..4294967295, or -1 for a random one, found 4294967296"),
        (["--prompt", "\udcff bench"], "prompt: expected UTF-8 text, found bytes that are not"),
    ],
)
def test_bad_numbers_are_one_line_errors(checkpoint: Path, tmp_path: Path, capsys, extra, message) -> None:
    image, mask = write_pair(tmp_path, "x")
    args = [*base_args(checkpoint, tmp_path / "out"), "--image", str(image), "--mask", str(mask), *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_bad_paths_and_sizes(checkpoint: Path, tmp_path: Path, capsys) -> None:
    image, mask = write_pair(tmp_path, "x")
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main([*base_args(tmp_path / "missing.ckpt", out), "--image", str(image), "--mask", str(mask)])
    assert "checkpoint not found" in capsys.readouterr().err

    # A single image and mask are read before the model loads: bad input, exit 2.
    assert (
        main([*base_args(checkpoint, out), "--image", str(tmp_path / "nope.png"), "--mask", str(mask)]) == 2
    )
    assert "nope.png" in capsys.readouterr().err

    small_mask = tmp_path / "small_mask.png"
    Image.new("L", (32, 32), 255).save(small_mask)
    assert main([*base_args(checkpoint, out), "--image", str(image), "--mask", str(small_mask)]) == 2
    assert "--resize-mask" in capsys.readouterr().err
    resized = [*base_args(checkpoint, out), "--image", str(image), "--mask", str(small_mask), "--resize-mask"]
    assert main(resized) == 0


def test_long_prompt_is_noted_or_kept(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    image, mask = write_pair(tmp_path / "in", "long")
    long_prompt = "a very detailed oil painting of a lighthouse above a stormy sea, " * 8
    args = [*base_args(checkpoint, tmp_path / "out"), "--image", str(image), "--mask", str(mask)]
    args[args.index("a red bench")] = long_prompt
    assert main(args) == 0
    assert "ldm-inpaint: note: prompt cut to 77 tokens" in capsys.readouterr().err
    assert main([*args, "--long-prompts"]) == 0
    assert "note:" not in capsys.readouterr().err
    assert read_png_metadata(tmp_path / "out" / "long-00001.png")["long_prompts"] == "True"


def test_inpainting_controls_reach_the_pipeline_and_the_metadata(checkpoint: Path, tmp_path: Path) -> None:
    image, mask = write_pair(tmp_path / "in", "ctl", size=(128, 96))
    args = [*base_args(checkpoint, tmp_path / "out"), "--image", str(image), "--mask", str(mask)]
    controls = ["--mask-grow", "2", "--mask-blur", "1.5", "--mask-mode", "max", "--crop-to-mask", "8"]
    assert main([*args, *controls]) == 0
    png = tmp_path / "out" / "ctl-00000.png"
    meta = read_png_metadata(png)
    assert (meta["mask_grow"], meta["mask_blur"], meta["mask_mode"], meta["crop_to_mask"]) == (
        "2",
        "1.5",
        "max",
        "8",
    )
    with Image.open(png) as result, Image.open(image) as original:
        assert result.size == original.size
        far = (slice(80, 96), slice(100, 128))  # outside the grown, padded box around the mask
        assert np.array_equal(np.asarray(result)[far], np.asarray(original)[far])


def test_image_to_image_with_strength(checkpoint: Path, tmp_path: Path) -> None:
    image, _ = write_pair(tmp_path / "in", "photo")
    outdir = tmp_path / "out"
    assert main([*base_args(checkpoint, outdir), "--image", str(image), "--strength", "0.6"]) == 0
    png = outdir / "photo-00000.png"
    meta = read_png_metadata(png)
    assert meta["strength"] == "0.6" and meta["mask"] == "" and meta["image"] == str(image)
    assert meta["steps_taken"] == "1"  # int(3 steps x 0.6)
    with Image.open(png) as result:
        assert result.size == (64, 48)


def test_lean_memory_sets_the_lean_allocator_mode(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr("ldm_inpaint.cli.keep_freed_memory", lambda **options: calls.append(options) or True)
    image, mask = write_pair(tmp_path / "in", "photo")
    args = [*base_args(checkpoint, tmp_path / "out"), "--image", str(image), "--mask", str(mask)]
    assert main(args) == 0
    assert calls == [{}]  # start-up: memory kept for reuse everywhere
    assert main([*args, "--lean-memory"]) == 0
    assert calls == [{}, {}, {"lean": True}]


def test_text_to_image_numbers_its_outputs(checkpoint: Path, tmp_path: Path, capsys) -> None:
    outdir = tmp_path / "out"
    args = [*base_args(checkpoint, outdir), "--height", "32", "--width", "64"]
    assert main(args) == 0 and main(args) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["txt2img-00000.png", "txt2img-00001.png"]
    with Image.open(outdir / "txt2img-00000.png") as result:
        assert result.size == (64, 32)
    meta = read_png_metadata(outdir / "txt2img-00001.png")
    assert (meta["image"], meta["mask"], meta["strength"]) == ("", "", "1.0")
    assert "txt2img-00001.png" in capsys.readouterr().out


def test_text_to_image_checkpoint_inpaints_by_blending(tmp_path: Path, capsys) -> None:
    config = CONFIGS / "tiny" / "v1-inference-tiny.yaml"
    path = tmp_path / "tiny-t2i.ckpt"
    torch.save({"state_dict": random_checkpoint(load_config(config), seed=9)}, path)
    image, mask = write_pair(tmp_path / "in", "photo")
    args = [*base_args(path, tmp_path / "out"), "--image", str(image)]
    args[args.index(str(TINY_CONFIGS["v1"]))] = str(config)
    assert main([*args, "--mask", str(mask), "--strength", "0.7"]) == 0
    meta = read_png_metadata(tmp_path / "out" / "photo-00000.png")
    assert meta["config"] == "v1-inference-tiny" and meta["strength"] == "0.7"
    assert "config v1-inference-tiny (given)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image", "IMAGE", "--mask", "MASK", "--strength", "0"], "strength must be in (0, 1]"),
        (["--image", "IMAGE", "--strength", "1.5"], "strength must be in (0, 1]"),
        (
            ["--image", "IMAGE", "--strength", "0.2"],
            "strength 0.2 keeps no step of 3; raise strength or steps",
        ),
        (["--image", "IMAGE", "--strength", "half"], "strength: expected a finite number, found 'half'"),
        (["--strength", "0.5"], "strength 0.5 < 1 starts from a noised image: pass one"),
        (["--mask", "MASK"], "a mask needs an image to inpaint"),
        (["--image", "IMAGE", "--paste-back"], "act on a mask; without one"),
        (["--crop-to-mask", "8"], "act on a mask; without one"),
        (["--image", "IMAGE", "--resize-mask"], "--resize-mask needs --mask"),
    ],
)
def test_strength_and_missing_inputs_are_one_line_errors(
    checkpoint: Path, tmp_path: Path, capsys, extra, message
) -> None:
    image, mask = write_pair(tmp_path, "x")
    extra = [{"IMAGE": str(image), "MASK": str(mask)}.get(arg, arg) for arg in extra]
    with pytest.raises(SystemExit) as exit_info:
        main([*base_args(checkpoint, tmp_path / "out"), *extra])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_file_name_that_is_not_utf8_does_not_stop_the_batch(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_pair(folder, "plain")
    name = os.fsdecode(b"caf\xe9")  # a Latin-1 file name, read as surrogate escapes
    image, mask = write_pair(folder, "tmp")
    image.rename(folder / f"{name}.png")
    mask.rename(folder / f"{name}_mask.png")
    outdir = tmp_path / "out"
    assert main([*base_args(checkpoint, outdir), "--batch", str(folder)]) == 0
    written = sorted(os.fsencode(path.name) for path in outdir.iterdir())
    assert written == [b"caf\xe9-00000.png", b"plain-00000.png"]
    assert read_png_metadata(outdir / f"{name}-00000.png")["image"].endswith("caf\\xe9.png")
