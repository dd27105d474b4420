"""``ldm-inpaint eval masks``: LaMa's square crop rule, the evaluation crops and masks of a folder, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_inpaint.cli import main
from ldm_inpaint.evaluation import masks as eval_masks
from ldm_inpaint.evaluation.masks import TRIES, eval_crop, make_masks, output_paths, resize_short_side
from ldm_inpaint.image_io import read_png_metadata
from ldm_inpaint.mask_generators import (
    draw_eval_crop,
    draw_eval_mask,
    draw_mask,
    keyed_rng,
    square_crop,
)
from ldm_inpaint.pairs import find_pairs


def starts(mask: np.ndarray, draws: int = 300) -> set[tuple[int, int]]:
    """Every (top, left) that :func:`square_crop` gives ``mask`` over ``draws`` keys."""
    return {square_crop(mask, keyed_rng(1, 0, i)) for i in range(draws)}


def columns(height: int, width: int, first: int, last: int) -> np.ndarray:
    mask = np.zeros((height, width), np.float32)
    mask[10:20, first : last + 1] = 1
    return mask


def test_square_crop_draws_lamas_window_near_the_masks_far_end() -> None:
    # LaMa, crop_min_overlap 1: side = 64, last covered column e, L = 100; the start is uniform over
    # [max(0, min(L - side - 1, e - side)), max(low + 1, min(L - side, e))).
    assert starts(columns(64, 100, 70, 80)) == {(0, left) for left in range(16, 36)}  # e = 80: [16, 36)
    assert starts(columns(64, 100, 5, 10)) == {(0, left) for left in range(0, 10)}  # e = 10: [0, 10)
    assert starts(columns(64, 100, 0, 0)) == {(0, 0)}  # e = 0: [0, 1)
    assert starts(columns(64, 100, 99, 99)) == {(0, left) for left in range(35, 36)}  # e = 99: [35, 36)
    # Portrait: the same along the rows.
    assert starts(columns(64, 100, 70, 80).T.copy()) == {(top, 0) for top in range(16, 36)}
    # A square mask is its own crop, and takes no draw from the generator.
    rng = keyed_rng(1, 0, 0)
    assert square_crop(np.ones((64, 64), np.float32), rng) == (0, 0)
    assert rng.integers(1 << 30) == keyed_rng(1, 0, 0).integers(1 << 30)


def test_eval_crop_is_a_kept_candidates_square_and_matches_draw_eval_mask_on_squares() -> None:
    for index in range(8):
        crop = draw_eval_crop("lama-thick", 64, 96, keyed_rng(3, 0, index))
        assert crop is not None and crop.mask.shape == (64, 64) and 0 < crop.mask.mean() <= 0.5
        assert crop.top == 0 and 0 <= crop.left <= 32
        # Replaying the key: the crop is one candidate's window, at the corner that square_crop drew for it.
        rng = keyed_rng(3, 0, index)
        drawn = [draw_mask("lama-thick", 64, 96, rng) for _ in range(5)]
        corners = [square_crop(mask, rng) for mask in drawn]
        assert any(
            (top, left) == (crop.top, crop.left) and np.array_equal(mask[:, left : left + 64], crop.mask)
            for mask, (top, left) in zip(drawn, corners, strict=True)
        )
        square = draw_eval_crop("lama-thick", 64, 64, keyed_rng(3, 0, index))
        assert np.array_equal(square.mask, draw_eval_mask("lama-thick", 64, 64, keyed_rng(3, 0, index)))
    assert draw_eval_crop("lama-thin", 64, 96, keyed_rng(3, 0, 0), max_area=1e-6) is None


def test_resize_sets_the_shorter_side_up_or_down() -> None:
    assert resize_short_side(Image.new("RGB", (90, 45)), 64).size == (128, 64)
    assert resize_short_side(Image.new("RGB", (700, 1000)), 512).size == (512, 731)  # 731.43 rounded


def make_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """Random RGB images of (width, height) ``sizes``, named img0.png, img1.jpg, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index, (width, height) in enumerate(sizes):
        path = folder / f"img{index}.{'png' if index % 2 == 0 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


SIZES = [(90, 45), (40, 70), (64, 64), (200, 150)]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.iterdir())}


def test_masks_of_a_folder_are_lamas_crops_deterministic_and_resumable(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", SIZES)
    report = make_masks(tmp_path / "images", tmp_path / "a", "thick", seed=5, resolution=64)
    assert (report.written, report.existing, report.skipped, report.failed) == (4, 0, [], [])
    pairs, problems = find_pairs(tmp_path / "a")
    assert problems == [] and [(image.name, mask.name) for image, mask in pairs] == [
        (f"img{i}_crop000.png", f"img{i}_crop000_mask000.png") for i in range(4)
    ]
    for index, (image, mask) in enumerate(pairs):
        crop, levels = Image.open(image), np.asarray(Image.open(mask))
        assert crop.size == (64, 64) and levels.shape == (64, 64)
        assert set(np.unique(levels)) <= {0, 255} and 0 < (levels == 255).mean() <= 0.5
        # The crop is the window at (crop_top, crop_left) of the source resized to a shorter side of 64.
        metadata = read_png_metadata(mask)
        assert (metadata["source"], metadata["index"], metadata["kind"]) == (
            images[index].name,
            str(index),
            "thick",
        )
        source = Image.open(images[index]).convert("RGB")
        scale = 64 / min(source.size)
        resized = source.resize((round(source.width * scale), round(source.height * scale)), Image.BICUBIC)
        top, left = int(metadata["crop_top"]), int(metadata["crop_left"])
        assert crop.tobytes() == resized.crop((left, top, left + 64, top + 64)).tobytes()
        # The mask is the key's draw: image i of the sorted folder draws from keyed_rng(seed, 0, i).
        _, expected = eval_crop(source, "thick", keyed_rng(5, 0, index), 64)
        assert np.array_equal(levels == 255, expected.mask > 0.5)
    # The same settings elsewhere give the same bytes.
    make_masks(tmp_path / "images", tmp_path / "b", "thick", seed=5, resolution=64)
    first = snapshot(tmp_path / "a")
    assert {name: data for name, (data, _) in snapshot(tmp_path / "b").items()} == {
        name: data for name, (data, _) in first.items()
    }
    # A rerun writes nothing and touches nothing; a missing mask (a killed run) and a missing pair come back
    # exactly as they were.
    assert make_masks(tmp_path / "images", tmp_path / "a", "thick", seed=5, resolution=64).written == 0
    assert snapshot(tmp_path / "a") == first
    for name in ("img1_crop000_mask000.png", "img3_crop000.png", "img3_crop000_mask000.png"):
        (tmp_path / "a" / name).unlink()
    report = make_masks(tmp_path / "images", tmp_path / "a", "thick", seed=5, resolution=64)
    assert (report.written, report.existing) == (2, 2)
    assert {name: data for name, (data, _) in snapshot(tmp_path / "a").items()} == {
        name: data for name, (data, _) in first.items()
    }
    assert snapshot(tmp_path / "a")["img0_crop000.png"] == first["img0_crop000.png"]
    # Other seeds give other masks.
    make_masks(tmp_path / "images", tmp_path / "c", "thick", seed=6, resolution=64)
    assert (tmp_path / "c" / "img0_crop000_mask000.png").read_bytes() != first["img0_crop000_mask000.png"][0]


def test_an_image_whose_tries_all_cover_over_half_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    make_images(tmp_path / "images", SIZES[:2])
    tries: list[int] = []

    def counted(*args: object) -> object:
        tries.append(1)
        return draw_eval_crop(*args)

    monkeypatch.setattr(eval_masks, "draw_eval_crop", counted)
    monkeypatch.setattr(eval_masks, "MAX_AREA", 1e-6)  # nothing covers this little: every try fails
    argv = ["eval", "masks", "--images", tmp_path / "images", "--out", tmp_path / "out", "--kind", "medium"]
    assert main([str(arg) for arg in argv] + ["--resolution", "64"]) == 0
    assert len(tries) == 2 * TRIES
    err = capsys.readouterr().err
    assert (
        f"skipped: {tmp_path / 'images' / 'img0.png'}: all {5 * TRIES} candidate masks cover over half" in err
    )
    assert find_pairs(tmp_path / "out")[0] == []


def test_bad_images_are_reported_and_the_rest_go_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_images(tmp_path / "images", SIZES[:2])
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (50, 50)).save(tmp_path / "images" / "img0.webp")  # a second image named img0
    argv = ["eval", "masks", "--images", tmp_path / "images", "--out", tmp_path / "out", "--kind", "thin"]
    assert main([str(arg) for arg in argv] + ["--resolution", "64"]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'images' / 'broken.png'}: expected an image file" in err
    assert "expected one image named 'img0', found img0.png, img0.webp" in err
    assert [image.name for image, _ in find_pairs(tmp_path / "out")[0]] == ["img1_crop000.png"]
    # Other settings in the same folder are refused, naming what differs.
    assert main([str(arg) for arg in argv] + ["--resolution", "32"]) == 2
    err = capsys.readouterr().err
    assert "holds masks made with other settings (differing: resolution;" in err
    assert json.loads((tmp_path / "out" / "eval-masks.json").read_text())["resolution"] == 64
    assert output_paths(tmp_path, "x") == (tmp_path / "x_crop000.png", tmp_path / "x_crop000_mask000.png")
