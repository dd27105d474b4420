"""``ldm-inpaint ablate`` end to end on tiny random checkpoints: grids laid out as the sweep says, one row per
cell and attempt with every parameter, UNet evaluations counted independently, resuming without UNet work,
failing cells recorded without stopping the others, spec errors before any work, and a checkpoint axis."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import ldm_inpaint.ablation.runner as runner
from ldm_inpaint.ablation.cells import checkpoint_identity
from ldm_inpaint.ablation.cli import ablate_main, build_parser
from ldm_inpaint.ablation.draw import CAPTION_HEIGHT, FAILED_GRAY, GAP, HEADER_HEIGHT, LABEL_WIDTH
from ldm_inpaint.ablation.results import COLUMNS, Results, mask_change
from ldm_inpaint.ablation.study import CheckpointRef, build_study
from ldm_inpaint.config import load_config
from ldm_inpaint.image_io import read_png_metadata
from ldm_inpaint.models.unet import UNetModel
from ldm_inpaint.options import SWEEPABLE
from ldm_inpaint.random_weights import random_checkpoint
from ldm_inpaint.tools import cast_floats

from .conftest import FULL_CONFIGS, REPO, TINY_CONFIGS

SIZE = 64
EXAMPLE = REPO / "examples" / "ablation.yaml"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for family, seed in (("v1", 9), ("v2", 4)):
        paths[family] = folder / f"tiny-{family}.ckpt"
        torch.save(
            {"state_dict": random_checkpoint(load_config(TINY_CONFIGS[family]), seed=seed)}, paths[family]
        )
    return paths


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.RandomState(0)
    image, mask = tmp_path / "in" / "photo.png", tmp_path / "in" / "photo_mask.png"
    image.parent.mkdir()
    Image.fromarray(rng.randint(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(image)
    pixels = np.zeros((SIZE, SIZE), np.uint8)
    pixels[16:48, 20:44] = 255
    Image.fromarray(pixels).save(mask)
    return image, mask


@pytest.fixture
def unet_calls(monkeypatch) -> list[int]:
    """Counts UNet forward passes, independently of the pipeline's own count."""
    calls = [0]
    forward = UNetModel.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNetModel, "forward", counted)
    return calls


@pytest.fixture
def loads(monkeypatch) -> list[Path]:
    """The checkpoint paths that ``ablate`` loads, in order."""
    loaded = []
    load_model = runner.load_model

    def counted(path, *args, **kwargs):
        loaded.append(Path(path))
        return load_model(path, *args, **kwargs)

    monkeypatch.setattr(runner, "load_model", counted)
    return loaded


def command(checkpoint: Path, pair: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    image, mask = pair
    config = TINY_CONFIGS["v1"]
    return [
        "--ckpt",
        str(checkpoint),
        "--config",
        str(config),
        "--image",
        str(image),
        "--mask",
        str(mask),
    ] + [
        "--out",
        str(out),
        "--prompt",
        "a red bench",
        *extra,
    ]


def jsonl_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def csv_rows(out: Path) -> tuple[list[str], list[dict]]:
    with (out / "results.csv").open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames), list(reader)


def tile(grid: Image.Image, row: int, column: int) -> np.ndarray:
    """The pixels of tile (row, column) of a grid of SIZE x SIZE cells."""
    x = LABEL_WIDTH + column * (SIZE + GAP)
    y = HEADER_HEIGHT + row * (SIZE + CAPTION_HEIGHT + GAP)
    return np.asarray(grid.crop((x, y, x + SIZE, y + SIZE)))


def test_grid_rows_evaluations_and_resume(
    checkpoints, pair, tmp_path: Path, unet_calls, loads, capsys
) -> None:
    out = tmp_path / "run"

    def study(steps: str) -> list[str]:
        sweep = ["--sweep", "sampler=ddim,heun", "--sweep", f"steps={steps}"]
        return command(checkpoints["v1"], pair, out, *sweep, "--scale", "1", "--paste-back", "--seed", "5")

    args = study("2,3")
    assert ablate_main(args) == 0

    # One UNet evaluation per step for DDIM, 2 steps - 1 for Heun (its last step is an Euler step).
    expected = {("ddim", 2): 2, ("ddim", 3): 3, ("heun", 2): 3, ("heun", 3): 5}
    rows = jsonl_rows(out)
    assert len(rows) == 4 and unet_calls[0] == sum(expected.values()) and len(loads) == 1
    header, table = csv_rows(out)
    assert tuple(header) == COLUMNS and len(table) == 4
    for row, line in zip(rows, table, strict=True):
        assert row["status"] == "ok" and row["error"] is None
        assert row["unet_evaluations"] == expected[(row["sampler"], row["steps"])]
        assert set(SWEEPABLE) <= set(row) and row["prompt"] == "a red bench" and row["seed"] == 5
        assert (
            row["guidance_scale"] == 1.0
            and row["paste_back"] is True
            and row["config"] == "v1-inpainting-tiny"
        )
        assert row["wall_seconds"] > 0
        assert row["change_outside"] == 0.0  # paste-back keeps every pixel outside the mask
        assert 0.01 < row["change_inside"] < 1  # random weights repaint the inside with something else
        assert line["hash"] == row["hash"] and line["unet_evaluations"] == str(row["unet_evaluations"])
        cell = out / row["cell_image"]
        assert read_png_metadata(cell)["sampler"] == row["sampler"]
        with Image.open(cell) as picture:
            assert picture.size == (SIZE, SIZE)
    assert len({row["hash"] for row in rows}) == 4

    # sampler down the rows, steps across the columns, each tile the cell's image.
    grid_path = out / "grid-photo.png"
    assert str(grid_path) in capsys.readouterr().out
    with Image.open(grid_path) as grid:
        grid.load()
    assert grid.size == (LABEL_WIDTH + 2 * (SIZE + GAP), HEADER_HEIGHT + 2 * (SIZE + CAPTION_HEIGHT + GAP))
    for row in rows:
        r, c = ["ddim", "heun"].index(row["sampler"]), [2, 3].index(row["steps"])
        with Image.open(out / row["cell_image"]) as picture:
            assert np.array_equal(tile(grid, r, c), np.asarray(picture))
    assert read_png_metadata(grid_path)["cells"].split() == [row["hash"] for row in rows]
    grid_bytes = grid_path.read_bytes()

    # The same study again: nothing loaded, no UNet work, no new rows; the grid rewritten, the same.
    unet_calls[0] = 0
    assert ablate_main(args) == 0
    assert unet_calls[0] == 0 and len(loads) == 1 and len(jsonl_rows(out)) == 4
    assert grid_path.read_bytes() == grid_bytes and sorted(out.glob("grid-*")) == [grid_path]
    assert "4 finished before, 0 to run" in capsys.readouterr().err

    # One more step count: only its two cells run (1 evaluation each).
    assert ablate_main(study("2,3,1")) == 0
    assert unet_calls[0] == 2 and len(jsonl_rows(out)) == 6
    assert [row["steps"] for row in jsonl_rows(out)[4:]] == [1, 1]


def test_failing_cell_is_recorded_and_the_others_run(
    checkpoints, pair, tmp_path: Path, unet_calls, capsys
) -> None:
    out = tmp_path / "run"
    args = command(
        checkpoints["v1"], pair, out, "--sweep", "sampler=ddim,plms", "--eta", "0.5", "--steps", "2"
    )
    args += ["--scale", "1"]
    assert ablate_main(args) == 1
    ok, failed = jsonl_rows(out)
    assert ok["status"] == "ok" and ok["sampler"] == "ddim" and ok["unet_evaluations"] == 2
    assert failed["status"] == "failed" and failed["sampler"] == "plms" and failed["cell_image"] is None
    assert "plms is deterministic: eta must be 0, found 0.5" in failed["error"]
    err = capsys.readouterr().err
    assert "1 of 2 cell(s) failed" in err and failed["hash"] in err and "Traceback" not in err
    # One axis: a single row of two tiles; the failed one is gray.
    with Image.open(out / "grid-photo.png") as grid:
        grid.load()
    assert grid.size == (LABEL_WIDTH + 2 * (SIZE + GAP), HEADER_HEIGHT + SIZE + CAPTION_HEIGHT + GAP)
    assert (tile(grid, 0, 1)[-1] == FAILED_GRAY).all()

    # Again: the finished cell is skipped, the failed one tried (and recorded) again.
    unet_calls[0] = 0
    assert ablate_main(args) == 1
    rows = jsonl_rows(out)
    assert len(rows) == 3 and rows[2]["hash"] == failed["hash"] and unet_calls[0] == 0


def test_checkpoint_axis_loads_each_checkpoint_once(
    checkpoints, pair, tmp_path: Path, unet_calls, loads
) -> None:
    image, mask = pair
    spec = {
        "checkpoint": [
            {"path": str(checkpoints["v1"]), "config": str(TINY_CONFIGS["v1"])},
            {"path": str(checkpoints["v2"]), "config": str(TINY_CONFIGS["v2"])},
        ],
        "pairs": [{"image": str(image), "mask": str(mask)}],
        "fixed": {"steps": 1, "scale": 1.0, "prompt": "a cat"},
        "sweep": {"seed": [1, 2]},
    }
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    assert ablate_main(["--spec", str(spec_path), "--out", str(out)]) == 0
    assert loads == [checkpoints["v1"], checkpoints["v2"]] and unet_calls[0] == 4
    rows = jsonl_rows(out)
    assert [Path(row["checkpoint"]).name for row in rows] == ["tiny-v1.ckpt"] * 2 + ["tiny-v2.ckpt"] * 2
    assert [row["config"] for row in rows] == ["v1-inpainting-tiny"] * 2 + ["v2-inpainting-tiny"] * 2
    assert len({row["checkpoint_sha256"] for row in rows}) == 2 and len({row["hash"] for row in rows}) == 4
    with Image.open(out / "grid-photo.png") as grid:
        assert grid.size == (
            LABEL_WIDTH + 2 * (SIZE + GAP),
            HEADER_HEIGHT + 2 * (SIZE + CAPTION_HEIGHT + GAP),
        )
        meta = read_png_metadata(out / "grid-photo.png")
    assert meta["rows"] == "checkpoint" and meta["columns"] == "seed"


def test_example_spec_runs_and_its_resolved_spec_reproduces_it(
    checkpoints, pair, tmp_path: Path, unet_calls
) -> None:
    out = tmp_path / "run"
    image, mask = pair
    args = ["--spec", str(EXAMPLE), "--ckpt", str(checkpoints["v1"]), "--config", str(TINY_CONFIGS["v1"])]
    args += ["--image", str(image), "--mask", str(mask), "--sweep", "steps=1", "--out", str(out)]
    study = build_study(build_parser().parse_args(args))
    assert list(study.sweep) == ["sampler", "steps", "seed"] and study.sweep["steps"] == [1]
    assert (
        study.fixed["prompt"] == "a yellow cat sitting on a park bench" and study.fixed["paste_back"] is True
    )

    assert ablate_main(args) == 0
    rows = jsonl_rows(out)
    assert len(rows) == 6 and unet_calls[0] == 6  # 3 samplers x 1 step x 2 seeds
    assert all(
        row["change_outside"] == 0.0 and row["negative_prompt"] == "blurry, low quality" for row in rows
    )
    assert sorted(path.name for path in out.glob("grid-*")) == [
        "grid-photo-p1.png",
        "grid-photo-p2.png",
    ]
    assert read_png_metadata(out / "grid-photo-p2.png")["page"] == "seed=7"

    # The resolved spec written beside the results is the same study: every cell is found finished.
    (resolved,) = out.glob("spec-*.yaml")
    assert ablate_main(["--spec", str(resolved), "--out", str(out)]) == 0
    assert unet_calls[0] == 6 and len(jsonl_rows(out)) == 6


def test_command_line_overrides_the_spec(checkpoints, pair, tmp_path: Path) -> None:
    image, mask = pair
    spec_path = tmp_path / "study.yaml"
    spec = {
        "checkpoint": str(checkpoints["v1"]),
        "fixed": {"steps": 5},
        "sweep": {"sampler": ["ddim", "euler"]},
    }
    spec_path.write_text(yaml.safe_dump({**spec, "pairs": [{"image": str(image), "mask": str(mask)}]}))
    args = ["--spec", str(spec_path), "--out", str(tmp_path / "run"), "--steps", "2", "--sampler", "plms"]
    args += [
        "--sweep",
        'prompt=["a cat, sitting", a dog]',
        "--sweep",
        "crop_to_mask=none,8",
        "--no-paste-back",
    ]
    study = build_study(build_parser().parse_args(args))
    assert (
        study.fixed["steps"] == 2 and study.fixed["sampler"] == "plms" and study.fixed["paste_back"] is False
    )
    assert study.sweep == {"prompt": ["a cat, sitting", "a dog"], "crop_to_mask": [None, 8]}
    assert study.checkpoints[0].path == checkpoints["v1"] and study.checkpoints[0].config is None
    # Several --ckpt: a checkpoint axis, first; one --config for all of them.
    config = str(TINY_CONFIGS["v1"])
    more = ["--ckpt", str(checkpoints["v1"]), "--ckpt", str(checkpoints["v2"]), "--config", config]
    study = build_study(build_parser().parse_args([*args, *more]))
    assert list(study.sweep) == ["checkpoint", "prompt", "crop_to_mask"]
    assert [ref.config for ref in study.sweep["checkpoint"]] == [config, config]


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ({"sweeps": {}}, [], "unknown key(s) sweeps; allowed: checkpoint, config, use_ema"),
        ({"fixed": {"stepz": 3}}, [], "unknown parameter 'stepz'; allowed: checkpoint, lora, prompt"),
        ({"fixed": {"steps": "many"}}, [], "steps: expected an integer, found 'many'"),
        ({"fixed": {"scale": "high"}}, [], "scale: expected a finite number, found 'high'"),
        ({"fixed": {"paste_back": "maybe"}}, [], "paste_back: expected true or false, found 'maybe'"),
        ({"fixed": {"prompt": 3}}, [], "prompt: expected text, found 3"),
        ({"sweep": {"sampler": ["ddim", "dpm9"]}}, [], "sampler: expected one of ddim, dpmpp_2m"),
        ({"sweep": {"steps": []}}, [], "sweep steps: expected a non-empty list of values"),
        ({"sweep": {"seed": [1, 1]}}, [], "sweep seed: expected distinct values"),
        ({"sweep": {"seed": [1, -1]}}, [], "seed: expected fixed seeds (a study resumes its cells by their"),
        ({"fixed": {"seed": 1}, "sweep": {"seed": [1, 2]}}, [], "seed: given both as fixed and as swept"),
        ({}, ["--sweep", "steps"], "--sweep: expected KEY=V1,V2,..."),
        ({}, ["--sweep", "colour=red,blue"], "sweep: unknown parameter 'colour'"),
        ({}, ["--steps", "2.5"], "steps: expected an integer, found '2.5'"),
        ({"checkpoint": "missing.ckpt"}, [], "checkpoint not found"),
        ({"pairs": [{"image": "nope.png", "mask": "nope_mask.png"}]}, [], "found nothing at"),
        ({"pairs": [{"picture": "a.png"}]}, [], "pairs: expected {image: PATH, mask: PATH}"),
    ],
)
def test_spec_errors_stop_before_any_work(
    checkpoints, pair, tmp_path: Path, capsys, spec, extra, message
) -> None:
    image, mask = pair
    base = {"checkpoint": str(checkpoints["v1"]), "pairs": [{"image": str(image), "mask": str(mask)}]}
    spec_path = tmp_path / "study.yaml"
    spec_path.write_text(yaml.safe_dump({**base, **spec}))
    out = tmp_path / "run"
    try:
        status = ablate_main(["--spec", str(spec_path), "--out", str(out), *extra])
    except SystemExit as exit_:  # a command-line value is refused by the parser
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_a_config_beside_the_checkpoint_is_part_of_its_cells_identity(tmp_path: Path) -> None:
    """The loader takes ``model.yaml`` beside ``model.ckpt`` when no config is given: so does the identity."""
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"weights")
    detected = checkpoint_identity(CheckpointRef(path), use_ema=False)
    (tmp_path / "model.yaml").write_bytes(TINY_CONFIGS["v2"].read_bytes())
    beside = checkpoint_identity(CheckpointRef(path), use_ema=False)
    given = checkpoint_identity(CheckpointRef(path, str(TINY_CONFIGS["v2"])), use_ema=False)
    assert detected["config"] is None and beside == given


def test_mask_change_measures_each_region() -> None:
    original = torch.full((1, 3, 4, 4), -1.0)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    result = original.clone()
    result[..., :2, :] = 1.0  # inside: 0 -> 1 in [0, 1]
    result[..., 2:, :] = -0.8  # outside: 0 -> 0.1
    outside, inside = mask_change(original, result, mask)
    assert inside == pytest.approx(1.0) and outside == pytest.approx(0.1)
    assert mask_change(original, result, torch.zeros(1, 1, 4, 4)) == (pytest.approx(0.55), None)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_full_size_checkpoint_is_detected_and_swept(family, pair, tmp_path: Path, unet_calls) -> None:
    """A full-size fp16 file without --config: the config is detected, the cells run and resume."""
    checkpoint = tmp_path / f"full-{family}.safetensors"
    config = load_config(FULL_CONFIGS[family])
    save_file(cast_floats(random_checkpoint(config, seed=0), torch.float16), checkpoint)
    image, mask = pair
    args = [
        "--ckpt",
        str(checkpoint),
        "--image",
        str(image),
        "--mask",
        str(mask),
        "--out",
        str(tmp_path / "run"),
    ]
    args += ["--steps", "1", "--scale", "1", "--paste-back", "--sweep", "seed=1,2"]
    assert ablate_main(args) == 0
    rows = jsonl_rows(tmp_path / "run")
    assert [row["config"] for row in rows] == [config.name] * 2 and unet_calls[0] == 2
    assert all(row["unet_evaluations"] == 1 and row["change_outside"] == 0.0 for row in rows)
    assert rows[0]["change_inside"] != rows[1]["change_inside"]  # the seed changes the fill
    assert ablate_main(args) == 0 and unet_calls[0] == 2


def test_a_run_killed_between_the_database_and_the_exports_loses_nothing(
    checkpoints, pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row is committed to results.sqlite, then the exports are rewritten: a kill in between (simulated by an
    exception) leaves the tables a row short until the next run, which neither loses nor duplicates a row."""
    out = tmp_path / "run"
    args = command(checkpoints["v1"], pair, out, "--sweep", "seed=1,2", "--steps", "1", "--scale", "1")
    export = Results.export
    calls = []

    def killed_after_the_first_row(self: Results) -> None:
        calls.append(1)
        if len(calls) == 2:  # the export after the first row (the first call is the one at start)
            raise KeyboardInterrupt
        export(self)

    monkeypatch.setattr(Results, "export", killed_after_the_first_row)
    with pytest.raises(KeyboardInterrupt):
        ablate_main(args)
    assert len(jsonl_rows(out)) == 0  # the exports lag, the database has the row
    monkeypatch.setattr(Results, "export", export)
    assert ablate_main(args) == 0
    rows, (_, table) = jsonl_rows(out), csv_rows(out)
    assert [row["seed"] for row in rows] == [1, 2] and [line["seed"] for line in table] == ["1", "2"]
