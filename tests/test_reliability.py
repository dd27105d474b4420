"""Nothing half-written, nothing lost, every bad input one line: failures injected where they happen (a write
that raises, a full disk) and one real process killed in the middle of a write."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import ldm_inpaint.checkpoint as checkpoint
from ldm_inpaint import image_io
from ldm_inpaint.ablation.cli import ablate_main
from ldm_inpaint.ablation.study import read_spec
from ldm_inpaint.checkpoint import build_model
from ldm_inpaint.cli import main
from ldm_inpaint.command import EXIT_INTERRUPTED, run
from ldm_inpaint.config import load_config
from ldm_inpaint.files import check_output_folder, remove_stale_partials, write_atomic
from ldm_inpaint.image_io import ImageError, load_image, mask_to_tensor, save_png, soft_pixels
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.random_weights import random_checkpoint
from ldm_inpaint.samplers.noise import noise_like, sample_generators

from .conftest import TINY_CONFIGS


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path: Path) -> None:
    def fail(file) -> None:
        file.write(b"half a PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(tmp_path / "out.png", fail)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(path, write, *, replace=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(image_io, "write_atomic", full)
    with pytest.raises(ImageError, match=r"cannot write .*photo-00000.png: No space left on device"):
        save_png(Image.new("RGB", (4, 4)), tmp_path, "photo", {})


def test_new_files_never_replace_old_ones_and_replacements_are_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    assert write_atomic(path, lambda file: file.write(b"first"))
    assert not write_atomic(path, lambda file: file.write(b"second"))
    assert path.read_bytes() == b"first"
    assert write_atomic(path, lambda file: file.write(b"third"), replace=True)
    assert path.read_bytes() == b"third" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_process_killed_mid_write_leaves_no_result(tmp_path: Path) -> None:
    """SIGKILL while a PNG is being written: no file under the final name; the next run removes the
    temporary file of the dead process."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from ldm_inpaint.files import write_atomic
        def slow(file):
            file.write(b"x" * 1000)
            file.flush()
            print("writing", flush=True)
            time.sleep(60)
        write_atomic({str(tmp_path / "result.png")!r}, slow)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    names = [path.name for path in tmp_path.iterdir()]
    assert names == [f".result.png.{process.pid}.partial"]
    assert remove_stale_partials(tmp_path) == [tmp_path / names[0]] and list(tmp_path.iterdir()) == []


def test_partials_of_living_processes_are_kept(tmp_path: Path) -> None:
    mine = tmp_path / f".x.png.{os.getppid()}.partial"
    mine.write_bytes(b"")
    assert remove_stale_partials(tmp_path) == [] and mine.exists()


def test_output_folder_problems_are_found_up_front(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="expected a folder, found a file"):
        check_output_folder(a_file)
    with pytest.raises(ValueError, match=r"the outputs need about \d+ MiB, only \d+ MiB are free"):
        check_output_folder(tmp_path / "out", needed_bytes=2**62)


def test_ctrl_c_is_one_line_and_exit_130(capsys: pytest.CaptureFixture) -> None:
    def interrupted(argv):
        raise KeyboardInterrupt

    assert run("ldm-inpaint", interrupted, []) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "ldm-inpaint: interrupted"


# ------------------------------------------------------------------------------------------------ masks


def test_float_masks_in_0_to_1_are_used(tmp_path: Path) -> None:
    levels = np.zeros((8, 8), np.float32)
    levels[2:6, 2:6] = 1.0
    levels[0, 0] = 0.7
    np.save(tmp_path / "m.npy", levels)
    Image.fromarray(levels, mode="F").save(tmp_path / "m.tif")
    for name in ("m.npy", "m.tif"):
        mask = load_image(tmp_path / name)
        assert torch.equal(mask_to_tensor(mask)[0, 0], torch.from_numpy(levels >= 0.5).float())
        assert soft_pixels(mask) == 1


def test_a_mask_drawn_in_the_alpha_channel_is_used() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0)  # one uniform color
    rgba[2:6, 2:6, 3] = 255  # the stroke, opaque
    mask = Image.fromarray(rgba, mode="RGBA")
    assert mask_to_tensor(mask)[0, 0].sum() == 16 and soft_pixels(mask) == 0
    colored = rgba.copy()
    colored[0, 0, :3] = (0, 0, 255)  # not one color: the luminance counts, as before
    assert mask_to_tensor(Image.fromarray(colored, mode="RGBA"))[0, 0].sum() == 0


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    Image.new("L", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"expected at most 50,000 pixels, found 300x200 = 60,000"):
        load_image(tmp_path / "big.png", max_pixels=50_000)


# ----------------------------------------------------------------------------------------- command line


def write_pair(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (120, 30, 200)).save(folder / "x.png")
    Image.new("L", (64, 64), 255).save(folder / "x_mask.png")
    return folder / "x.png", folder / "x_mask.png"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--height", "100000", "--width", "100000"],
            "--height x --width: expected at most 16,777,216 pixels",
        ),
        (["--max-pixels", "1000"], "expected at most 1,000 pixels, found 64x64"),
        (["--device", "tpu"], "unknown device 'tpu': expected cpu, cuda, cuda:N or mps"),
        (["--device", "cuda:7"] if torch.cuda.is_available() else ["--device", "cuda"], "cuda"),
        (["--outdir", "FILE"], "expected a folder, found a file"),
        (["--image", "MISSING"], "expected an image file, found nothing at"),
    ],
)
def test_bad_inputs_are_found_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, extra: list, message: str
) -> None:
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    image, mask = write_pair(tmp_path / "in")
    (tmp_path / "FILE").write_text("")
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"not read")
    replace = {"FILE": str(tmp_path / "FILE"), "MISSING": str(tmp_path / "nope.png")}
    args = [
        "--ckpt",
        str(ckpt),
        "--image",
        str(image),
        "--mask",
        str(mask),
        "--outdir",
        str(tmp_path / "out"),
    ]
    assert status([*args, *[replace.get(arg, arg) for arg in extra]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def status(argv: list[str]) -> int:
    """The exit status of ``ldm-inpaint ARGV``, whether it returned it or exited with it."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_a_checkpoint_folder_is_called_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert status(["--ckpt", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "expected a checkpoint file (.ckpt or .safetensors) or a diffusers model folder" in err
    assert "found a folder without model_index.json" in err


def test_a_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path: Path, capsys) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    bomb += "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nfixed: {prompt: *c}\n"
    spec = tmp_path / "bomb.yaml"
    spec.write_text(bomb)
    started = time.perf_counter()
    assert ablate_main(["--spec", str(spec), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "line 2: expected plain values, found the alias *a; write the value out" in err
    assert len(err) < 300 and time.perf_counter() - started < 10


def test_spec_without_aliases_still_loads(tmp_path: Path) -> None:
    spec = tmp_path / "ok.yaml"
    spec.write_text(yaml.safe_dump({"fixed": {"steps": 3}}))
    assert read_spec(spec) == {"fixed": {"steps": 3}}


# --------------------------------------------------------------------------------------------- determinism


def test_a_samples_injected_noise_does_not_depend_on_the_batch_size() -> None:
    x = torch.zeros(3, 4, 8, 8)
    three = noise_like(x, sample_generators(7, 3))
    one = noise_like(x[:1], sample_generators(7, 1))
    assert torch.equal(three[:1], one) and not torch.equal(three[0], three[1])
    # one sample draws what one generator for the batch draws (diffusers' way, the parity tests' setting)
    assert torch.equal(one, noise_like(x[:1], torch.Generator().manual_seed(7)))


@pytest.fixture(scope="module")
def tiny_pipeline() -> InpaintPipeline:
    config = load_config(TINY_CONFIGS["v1"])
    return InpaintPipeline(build_model(random_checkpoint(config, seed=5), config).model)


def test_sample_0_is_the_same_with_more_samples_at_eta_1(tiny_pipeline: InpaintPipeline) -> None:
    options = dict(prompt="a red bench", steps=3, eta=1.0, seed=11, height=64, width=64)
    alone = tiny_pipeline(**options)
    batched = tiny_pipeline(**options, n_samples=2)
    # The same noise; the UNet's arithmetic may round differently for another batch size.
    assert torch.allclose(batched.latents[:1], alone.latents, atol=1e-4)
