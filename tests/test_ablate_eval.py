"""``ldm-inpaint ablate --eval-data``: dataset metrics for every setting of a sweep, in a table and a chart."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from skimage import data as photos

from ldm_inpaint.cli import main
from tests.conftest import TINY_CONFIGS
from tests.eval_weights import make_weights
from tests.training_data import make_checkpoint


def test_every_setting_gets_the_protocols_metrics_once(tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(np.asarray(getattr(photos, name)())).resize((80, 64)).save(images / f"{name}.png")
    data = tmp_path / "data"
    assert (
        main(
            [
                "eval",
                "masks",
                "--images",
                str(images),
                "--out",
                str(data),
                "--kind",
                "thick",
                "--resolution",
                "64",
            ]
        )
        == 0
    )
    ckpt = make_checkpoint(tmp_path / "tiny.ckpt")
    weights = make_weights(tmp_path / "hub")
    out = tmp_path / "study"
    args = ["ablate", "--ckpt", str(ckpt), "--config", str(TINY_CONFIGS["v1"]), "--out", str(out),
            "--image", str(data / "coffee_crop000.png"), "--mask", str(data / "coffee_crop000_mask000.png"),
            "--sweep", "steps=1,2", "--guidance-scale", "6",
            "--eval-data", str(data), "--inception-weights", str(weights["inception"]), "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((out / "eval.json").read_text())
    assert [row["steps"] for row in rows] == ["1", "2"] and all(row["images"] == 2 for row in rows)
    assert all(row["fid"] is not None and row["ssim"] is not None for row in rows)
    assert (out / "eval.md").read_text().count("\n") == 4 and (out / "eval.png").is_file()
    reports = sorted(out.glob("eval/*/report/report.json"))
    assert len(reports) == 2
    one_step = next(
        p for p in (out / "eval").glob("*/predictions/*.png") if Image.open(p).text["steps"] == "1"
    )
    assert Image.open(one_step).size == (64, 64)
    before = {p: p.read_bytes() for p in (out / "eval").rglob("*") if p.is_file()}
    assert main(args) == 0
    assert {p: p.read_bytes() for p in (out / "eval").rglob("*") if p.is_file()} == before
    capsys.readouterr()
    assert (
        main(
            [
                *args[:-4],
                "--eval-data",
                str(tmp_path / "nothing"),
                "--inception-weights",
                str(weights["inception"]),
            ]
        )
        == 2
    )
    assert "found none" in capsys.readouterr().err
