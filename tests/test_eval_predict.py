"""``ldm-inpaint eval predict`` and the pipeline's batches of different pairs: the protocol's defaults, names,
per-pair seeds, resuming, one process against two, bad pairs; ``ldm-inpaint eval`` dispatching its stages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_inpaint.checkpoint import build_model, ema_key, load_model
from ldm_inpaint.cli import main
from ldm_inpaint.config import load_config
from ldm_inpaint.distributed import World
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.evaluation.masks import make_masks
from ldm_inpaint.evaluation.predict import (
    PROTOCOL,
    _options,
    build_parser,
    file_seed,
    prediction_path,
    rank_groups,
    throughput,
)
from ldm_inpaint.image_io import image_to_tensor, mask_to_tensor, read_png_metadata
from ldm_inpaint.options import InpaintOptions, OptionError
from ldm_inpaint.pairs import find_pairs
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.random_weights import random_checkpoint
from tests.conftest import REPO, TINY_CONFIGS
from tests.training_data import make_folder

# A batch of different pairs runs each pair as its own call does, up to the float rounding of kernels that
# see another batch size (measured on the CPU: latents agree to within 1e-5 after three steps).
BATCH_ROUNDING = 1e-4


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Five 64-pixel crops with thick masks, and a tiny checkpoint whose EMA copy is another random model."""
    root = tmp_path_factory.mktemp("eval")
    make_folder(root / "images", count=5)
    make_masks(root / "images", root / "data", "thick", seed=0, resolution=64)
    config = load_config(TINY_CONFIGS["v1"])
    weights, shadow = random_checkpoint(config, seed=0), random_checkpoint(config, seed=1)
    ema = {ema_key(key): value for key, value in shadow.items() if key.startswith("model.")}
    torch.save({"state_dict": {**weights, **ema}}, root / "ema.ckpt")
    return {"data": root / "data", "ckpt": root / "ema.ckpt", "root": root}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One thread, as the torchrun processes have (their float rounding depends on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def predict(files: dict[str, Path], out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return [
        "eval", "predict", "--ckpt", str(files["ckpt"]), "--config", str(TINY_CONFIGS["v1"]),
        "--data", str(data or files["data"]), "--out", str(out), "--steps", "2", *extra,
    ]  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.iterdir())}


def contents(folder: Path) -> dict[str, bytes]:
    return {name: data for name, (data, _) in snapshot(folder).items()}


@pytest.fixture(scope="module")
def reference(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Predictions of the whole set, 3 pairs per batch (groups of 3 and 2), one thread."""
    out = tmp_path_factory.mktemp("reference") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(predict(files, out, "--batch-size", "3")) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_the_protocol_is_the_papers_and_every_setting_can_change() -> None:
    published = dict(
        prompt="photograph of a beautiful empty scene, highest quality settings",
        sampler="ddim",
        steps=50,
        eta=0.0,
        guidance_scale=6.0,
        paste_back=True,
        mask_blur=0.0,
        strength=1.0,
        n_samples=1,
    )
    assert {name: getattr(PROTOCOL, name) for name in published} == published
    parser = build_parser()
    required = ["--ckpt", "x.ckpt", "--data", "d", "--out", "o"]
    assert _options(parser, parser.parse_args(required)) == PROTOCOL
    changed = ["--steps", "7", "--scale", "3", "--no-paste-back", "--prompt", "a room", "--seed", "3"]
    assert _options(parser, parser.parse_args(required + changed)) == InpaintOptions(
        prompt="a room", steps=7, guidance_scale=3.0, seed=3
    )
    assert "(default 6.0)" in parser.format_help()  # the help shows the protocol's defaults


def test_protocol_metadata_names_and_paste_back(files: dict[str, Path], reference: Path) -> None:
    pairs, problems = find_pairs(files["data"])
    assert problems == [] and len(pairs) == 5
    assert sorted(path.name for path in reference.iterdir()) == [
        f"img{i}_crop000_mask000.png" for i in range(5)
    ]
    for image, mask in pairs:
        path = prediction_path(reference, mask)
        assert path.name == mask.name  # LaMa's bin/predict.py: the mask's name
        metadata = read_png_metadata(path)
        settings = {
            name: metadata[name] for name in ("prompt", "sampler", "guidance_scale", "eta", "paste_back")
        }
        assert settings == {
            "prompt": PROTOCOL.prompt,
            "sampler": "ddim",
            "guidance_scale": "6.0",
            "eta": "0.0",
            "paste_back": "True",
        }
        assert (metadata["ema"], metadata["steps_taken"], metadata["batch_size"]) == ("True", "2", "3")
        assert (metadata["seed"], metadata["eval_seed"]) == (str(file_seed(42, mask.stem)), "42")
        # Paste-back, (1 - m) x + m pred: every pixel outside the mask is the crop's.
        keep = np.asarray(Image.open(mask)) < 128
        predicted, crop = np.asarray(Image.open(path)), np.asarray(Image.open(image).convert("RGB"))
        assert np.array_equal(predicted[keep], crop[keep]) and not np.array_equal(predicted, crop)


def test_ema_weights_when_the_file_has_them(files: dict[str, Path], tmp_path: Path) -> None:
    config = load_config(TINY_CONFIGS["v1"])
    auto = load_model(files["ckpt"], TINY_CONFIGS["v1"], use_ema=None)
    shadow = build_model(random_checkpoint(config, seed=1), config).model.state_dict()
    assert auto.ema and all(
        torch.equal(value, shadow[key])
        for key, value in auto.model.state_dict().items()
        if key.startswith("model.")
    )
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": random_checkpoint(config, seed=0)}, plain)
    assert not load_model(plain, TINY_CONFIGS["v1"], use_ema=None).ema


def test_resume_writes_nothing_new_and_redoes_a_missing_file_bit_for_bit(
    files: dict[str, Path], reference: Path, tmp_path: Path, one_thread: None
) -> None:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = snapshot(out)
    assert main(predict(files, out, "--batch-size", "3")) == 0
    assert snapshot(out) == before
    (out / "img4_crop000_mask000.png").unlink()  # in the second group, with img3
    assert main(predict(files, out, "--batch-size", "3")) == 0
    assert contents(out) == contents(reference)
    assert snapshot(out)["img3_crop000_mask000.png"] == before["img3_crop000_mask000.png"]


def test_two_processes_give_the_files_of_one(files: dict[str, Path], reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ldm_inpaint", *predict(files, out, "--batch-size", "3")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"{out}: 5 predictions written, 0 already there, 0 failed" in finished.stdout
    assert contents(out) == contents(reference)  # pixels and metadata, byte for byte


def test_batch_size_moves_pixels_by_float_rounding_only(
    files: dict[str, Path], reference: Path, tmp_path: Path, one_thread: None
) -> None:
    assert main(predict(files, tmp_path / "single", "--batch-size", "1")) == 0
    for name in contents(reference):
        batched = np.asarray(Image.open(reference / name)).astype(int)
        single = np.asarray(Image.open(tmp_path / "single" / name)).astype(int)
        assert np.abs(batched - single).max() <= 1  # one 8-bit level: see BATCH_ROUNDING


def test_bad_pairs_are_reported_skipped_and_fail_the_run(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(files["data"], data)
    (data / "img1_crop000_mask000.png").write_bytes(b"not a png")
    Image.new("RGB", (64, 64)).save(data / "orphan_crop000.png")
    assert main(predict(files, tmp_path / "out", "--batch-size", "2", data=data)) == 1
    err = capsys.readouterr().err
    assert f"error: {data / 'img1_crop000_mask000.png'}: expected an image file" in err
    assert f"error: {data / 'orphan_crop000.png'}: no mask found" in err
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        f"img{i}_crop000_mask000.png" for i in (0, 2, 3, 4)
    ]


def test_bad_settings_are_one_line_errors(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    for extra, message in [
        (["--seed", "-1"], "--seed: an evaluation needs a fixed seed"),
        (["--batch-size", "0"], "--batch-size: expected at least 1, found 0"),
        (["--eta", "2"], "eta: expected a value in [0, 1], found 2.0"),
        (["--out", str(files["data"])], "--out: expected a folder other than --data"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(predict(files, tmp_path / "out", *extra))
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_groups_are_fixed_and_shared_out_by_rank() -> None:
    one = rank_groups(11, 3, World(0, 1, torch.device("cpu")))
    assert one == [range(0, 3), range(3, 6), range(6, 9), range(9, 11)]
    ranks = [rank_groups(11, 3, World(rank, 2, torch.device("cpu"))) for rank in (0, 1)]
    assert ranks == [[range(0, 3), range(6, 9)], [range(3, 6), range(9, 11)]]
    assert file_seed(42, "a_crop000_mask000") != file_seed(42, "b_crop000_mask000") != file_seed(43, "b")


@pytest.fixture(scope="module")
def pipeline() -> InpaintPipeline:
    config = load_config(TINY_CONFIGS["v1"])
    return InpaintPipeline(build_model(random_checkpoint(config, seed=5), config).model)


def batch_pairs(files: dict[str, Path]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (image_to_tensor(Image.open(image)), mask_to_tensor(Image.open(mask)))
        for image, mask in find_pairs(files["data"])[0][:3]
    ]


def test_a_batch_runs_each_pair_as_its_own_call(pipeline: InpaintPipeline, files: dict[str, Path]) -> None:
    pairs, seeds = batch_pairs(files), [11, 12, 13]
    options = InpaintOptions(steps=3, eta=1.0, guidance_scale=5.0, n_samples=2, paste_back=True)
    alone = pipeline(*pairs[0], options, seed=11)
    first = pipeline.inpaint_batch(pairs[:1], seeds[:1], options)
    assert torch.equal(first.images, alone.images) and torch.equal(first.latents, alone.latents)
    batch = pipeline.inpaint_batch(pairs, seeds, options)
    assert batch.images.shape == (6, 3, 64, 64) and batch.unet_evaluations == alone.unet_evaluations
    for index, (pair, seed) in enumerate(zip(pairs, seeds, strict=True)):
        single = pipeline(*pair, options, seed=seed)
        rows = slice(2 * index, 2 * index + 2)  # each pair's samples together
        torch.testing.assert_close(batch.latents[rows], single.latents, rtol=0, atol=BATCH_ROUNDING)
        torch.testing.assert_close(batch.images[rows], single.images, rtol=0, atol=BATCH_ROUNDING)
    assert not torch.allclose(batch.latents[0], batch.latents[2])  # other pairs, other seeds
    # A pair with nothing to repaint comes back as it is, the others are inpainted beside it.
    empty = [pairs[0], (pairs[1][0], torch.zeros_like(pairs[1][1])), pairs[2]]
    mixed = pipeline.inpaint_batch(empty, seeds, options)
    assert torch.equal(mixed.images[2:4], pairs[1][0].expand(2, -1, -1, -1))
    assert "1 of 3 masks are empty: their images come back as given" in mixed.notes
    torch.testing.assert_close(mixed.latents[:2], batch.latents[:2], rtol=0, atol=BATCH_ROUNDING)


def test_batch_errors_are_clear(pipeline: InpaintPipeline, files: dict[str, Path]) -> None:
    pairs = batch_pairs(files)
    small = (pairs[1][0][..., :32, :32], pairs[1][1][..., :32, :32])
    with pytest.raises(LdmInpaintError, match=r"images of one batch must share one size, found 2 sizes"):
        pipeline.inpaint_batch([pairs[0], small], [1, 2], steps=1)
    with pytest.raises(OptionError, match=r"one seed each and no crop-to-mask, found 2 pairs \(0 without"):
        pipeline.inpaint_batch(pairs[:2], [1], steps=1)
    with pytest.raises(OptionError, match=r"found 2 pairs \(1 without image or mask\), 2 seeds"):
        pipeline.inpaint_batch([pairs[0], (pairs[1][0], None)], [1, 2], steps=1)
    with pytest.raises(OptionError, match="crop-to-mask 8"):
        pipeline.inpaint_batch(pairs[:1], [1], steps=1, crop_to_mask=8)
    with pytest.raises(OptionError, match=r"seeds: expected integers 0..4294967295, found \[1, -1\]"):
        pipeline.inpaint_batch(pairs[:2], [1, -1], steps=1)


def test_throughput_counts_pairs_per_second(pipeline: InpaintPipeline) -> None:
    options = InpaintOptions(steps=1, guidance_scale=1.0)
    assert all(throughput(pipeline, 64, batch, pairs=2, options=options) > 0 for batch in (1, 2))


def test_eval_dispatches_its_stages(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    seen = []
    for stage, function in (("score", "score_main"), ("run", "run_main")):
        stub = types.ModuleType(f"ldm_inpaint.evaluation.{stage}")
        setattr(stub, function, lambda argv, stage=stage: seen.append((stage, argv)) or 3)
        monkeypatch.setitem(sys.modules, stub.__name__, stub)
        assert main(["eval", stage, "--x", "1"]) == 3
    assert seen == [("score", ["--x", "1"]), ("run", ["--x", "1"])]
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "nothing"])
    assert exit_.value.code == 2 and "invalid choice: 'nothing'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "ldm-inpaint eval" in capsys.readouterr().out
