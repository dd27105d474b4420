"""``ldm-inpaint eval run``: masks -> predict -> score in one command, resumable, with a spec file."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from skimage import data as photos

from ldm_inpaint.cli import main
from tests.conftest import TINY_CONFIGS
from tests.eval_weights import make_weights
from tests.training_data import make_checkpoint


def test_the_whole_protocol_in_one_command_resumes_and_takes_a_spec(tmp_path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(np.asarray(getattr(photos, name)())).resize((96, 80)).save(images / f"{name}.png")
    ckpt = make_checkpoint(tmp_path / "tiny.ckpt")
    weights = make_weights(tmp_path / "hub")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"kind: medium\nresolution: 64\nsteps: 3\nconfig: {TINY_CONFIGS['v1']}\n")
    out = tmp_path / "eval"
    args = ["eval", "run", "--spec", str(spec), "--ckpt", str(ckpt), "--images", str(images), "--out", str(out),
            "--inception-weights", str(weights["inception"]), "--steps", "2", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    crops = sorted(p.name for p in (out / "data").glob("*_crop000.png"))
    predictions = sorted(p.name for p in (out / "predictions").glob("*.png"))
    assert crops == ["astronaut_crop000.png", "chelsea_crop000.png", "coffee_crop000.png"]
    assert predictions == [name.replace(".png", "_mask000.png") for name in crops]
    assert Image.open(out / "predictions" / predictions[0]).size == (64, 64)
    assert (
        Image.open(out / "predictions" / predictions[0]).text["steps"] == "2"
    )  # the command line beat the spec
    report = json.loads((out / "report" / "report.json").read_text())
    assert "fid" in json.dumps(report).lower()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 0
    assert "already scored" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
