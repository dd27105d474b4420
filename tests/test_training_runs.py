"""Whole runs of ``ldm-inpaint train`` on a tiny model: outputs, resume, accumulation, processes, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ldm_inpaint.checkpoint import load_model
from ldm_inpaint.checkpoint_files import read_checkpoint
from ldm_inpaint.cli import main
from ldm_inpaint.training.outputs import STATE_FILE
from tests.conftest import REPO, TINY_CONFIGS
from tests.training_data import TINY_V, make_checkpoint, make_folder, train_args

# Runs that differ only in how the global batch is summed (micro-batches, processes) agree to this relative
# error: in each step's loss and gradient norm, and in the UNet's change from its initial weights (the norm of
# the difference over the norm of the change). Float sums in another order differ in the last bits. Weights
# whose gradient is below Adam's eps (1e-8) are left out: Adam moves them by a step that rounding decides (in
# the tiny UNet, biases feeding a GroupNorm of one channel per group have a gradient that is exactly zero in
# exact arithmetic and ~1e-11 in floats).
SPLIT_TOLERANCE = 1e-4
ADAM_EPS = 1e-8


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("training")
    return {"ckpt": make_checkpoint(root / "init.ckpt"), "data": make_folder(root / "data"), "root": root}


def unet_weights(path) -> dict[str, torch.Tensor]:
    entries = read_checkpoint(path)
    return {k: v for k, v in entries.items() if k.startswith("model.diffusion_model.")}


def assert_same_training(run_a, run_b, init: dict) -> None:
    rows_a, rows_b = (
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (run_a, run_b)
    )
    for a, b in zip(rows_a, rows_b, strict=True):
        for name in ("loss", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=SPLIT_TOLERANCE), (a, b)
    a, b = unet_weights(run_a / "last.ckpt"), unet_weights(run_b / "last.ckpt")
    state = torch.load(run_a / STATE_FILE, weights_only=True)
    second_moments = dict(
        zip(state["trained"], (s["exp_avg_sq"] for s in state["optimizer"]["state"].values()), strict=True)
    )
    moved = {k: second_moments[k.removeprefix("model.diffusion_model.")].sqrt() > ADAM_EPS for k in a}
    change = torch.cat([(a[k] - init[k])[moved[k]] for k in a]).norm()
    difference = torch.cat([(a[k] - b[k])[moved[k]] for k in a]).norm()
    assert change > 0 and difference <= SPLIT_TOLERANCE * change, f"{difference / change:.3g}"


def test_a_run_writes_original_layout_checkpoints_metrics_and_grids(files, tmp_path) -> None:
    run = tmp_path / "run"
    args = train_args(
        files["ckpt"],
        files["data"],
        run,
        steps=2,
        **{"save-every": 1, "sample-every": 2, "safetensors": True},
    )
    assert main(["train", *args]) == 0
    assert sorted(p.name for p in run.iterdir()) == [
        "last.ckpt", "last.safetensors", "last.yaml", "metrics.jsonl", "samples", "settings.json", "state",
        "step-0000001.ckpt", "step-0000001.safetensors", "step-0000001.yaml",
        "step-0000002.ckpt", "step-0000002.safetensors", "step-0000002.yaml",
    ]  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "samples_per_s", "peak_memory_gib"}
    assert rows[0]["lr"] == pytest.approx(1e-3 * 1e-6) and rows[1]["lr"] == pytest.approx(
        1e-3 * (0.5 + 0.5e-6)
    )
    assert (run / "samples" / "step-0000002.png").is_file()
    entries = read_checkpoint(run / "last.ckpt")
    assert torch.equal(entries["model_ema.num_updates"], torch.tensor(2, dtype=torch.int32))
    assert "model_ema.diffusion_modelinput_blocks00weight" in entries
    trained = load_model(run / "last.ckpt", TINY_CONFIGS["v1"]).model
    ema = load_model(run / "last.safetensors", TINY_CONFIGS["v1"], use_ema=True).model
    initial = load_model(files["ckpt"], TINY_CONFIGS["v1"]).model
    key = "model.diffusion_model.out.2.weight"
    w, w_ema, w0 = (m.state_dict()[key] for m in (trained, ema, initial))
    assert not torch.equal(w, w0)
    # two updates with warm-up decays 2/11 and 3/12: the shadow moved from w0 toward the weights
    assert 0 < (w_ema - w0).abs().max() < (w - w0).abs().max()
    for name in ("first_stage_model.encoder.conv_in.weight", "cond_stage_model.model.token_embedding.weight"):
        assert torch.equal(trained.state_dict()[name], initial.state_dict()[name])


def test_resume_gives_what_an_uninterrupted_run_gives(files, tmp_path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *train_args(files["ckpt"], files["data"], straight, steps=4)]) == 0
    assert main(["train", *train_args(files["ckpt"], files["data"], split, steps=2)]) == 0
    assert main(["train", "--resume", str(split), "--steps", "4", "--lr", "1e-3"]) == 0
    a, b = unet_weights(straight / "last.ckpt"), unet_weights(split / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(split / STATE_FILE, weights_only=True)["step"] == 4
    assert [json.loads(r)["step"] for r in (split / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_accumulation_and_processes_give_the_same_training(files, tmp_path) -> None:
    """4 samples per step as 1 x 4, as 4 micro-batches of 1, and as 2 gloo processes x 2 micro-batches."""
    init = unet_weights(files["ckpt"])
    whole, micro, ranks = tmp_path / "whole", tmp_path / "micro", tmp_path / "ranks"
    assert main(["train", *train_args(files["ckpt"], files["data"], whole, **{"grad-accum": 1})]) == 0
    assert main(["train", *train_args(files["ckpt"], files["data"], micro, **{"grad-accum": 4})]) == 0
    assert_same_training(whole, micro, init)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ldm_inpaint", "train", *train_args(files["ckpt"], files["data"], ranks)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert_same_training(whole, ranks, init)


def test_a_v_model_trains_on_the_v_target(files, tmp_path) -> None:
    ckpt = make_checkpoint(tmp_path / "v.ckpt", TINY_V)
    run = tmp_path / "v"
    assert (
        main(["train", *train_args(ckpt, files["data"], run, config=TINY_V, steps=1, **{"ema-decay": 0})])
        == 0
    )
    assert not any(k.startswith("model_ema.") for k in read_checkpoint(run / "last.ckpt"))
    loaded = load_model(run / "last.ckpt")  # through last.yaml, written beside it
    assert loaded.config.parameterization == "v" and loaded.config_source == "last.yaml beside the checkpoint"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"batch-size": 3}, "must be a multiple of processes x --grad-accum"),
        ({"masks": "files"}, "have no _mask file"),
        ({"data": "/nonexistent"}, "found no folder at /nonexistent"),
        ({"resolution": 48}, "--resolution must be a multiple of 32 for this model"),
    ],
)
def test_bad_settings_are_one_line(files, tmp_path, capsys, extra, message) -> None:
    data = extra.pop("data", files["data"])
    assert main(["train", *train_args(files["ckpt"], data, tmp_path / "r", **extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_runs_are_never_overwritten_and_resume_keeps_its_settings(files, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *train_args(files["ckpt"], files["data"], run, steps=1)]) == 0
    assert main(["train", *train_args(files["ckpt"], files["data"], run, steps=1)]) == 2
    assert "already exists; a run folder is never overwritten" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--steps", "2", "--lr", "0.5"]) == 2
    assert "cannot change the run's settings: --lr 0.5 (run has 0.001)" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--steps", "2"]) == 2
    assert "no settings.json there" in capsys.readouterr().err


def test_an_autoencoder_trains_from_scratch_and_then_its_unet(files, tmp_path) -> None:
    """``--stage autoencoder`` without --ckpt: only the VAE moves; the next stage starts from its checkpoint."""
    first, second = tmp_path / "ae", tmp_path / "unet"
    args = train_args(None, files["data"], first, stage="autoencoder", steps=2, **{"sample-every": 2})
    assert main(["train", *args]) == 0
    assert (first / "samples" / "step-0000002.png").is_file()
    again = train_args(None, files["data"], tmp_path / "again", stage="autoencoder", steps=1, **{"lr": 1e-12})
    assert main(["train", *again]) == 0
    trained, barely = read_checkpoint(first / "last.ckpt"), read_checkpoint(tmp_path / "again" / "last.ckpt")
    for key in trained:  # the same seeded initialisation; only the VAE trained
        moved = not torch.equal(trained[key], barely[key])
        assert (
            moved == (key.startswith("first_stage_model.") and trained[key].is_floating_point()) or not moved
        )
    assert any(not torch.equal(trained[k], barely[k]) for k in trained if k.startswith("first_stage_model."))
    assert not any(k.startswith("model_ema.") for k in trained)  # EMA follows the UNet stage only
    assert main(["train", *train_args(first / "last.ckpt", files["data"], second, steps=1)]) == 0
    unet_stage = read_checkpoint(second / "last.ckpt")
    assert all(torch.equal(unet_stage[k], trained[k]) for k in trained if k.startswith("first_stage_model."))


def test_lora_training_writes_kohya_files_that_inference_applies(files, tmp_path) -> None:
    from ldm_inpaint.lora.files import read_lora
    from ldm_inpaint.lora.network import LoRANetwork

    run = tmp_path / "lora"
    assert (
        main(["train", *train_args(files["ckpt"], files["data"], run, lora=4, steps=2, **{"save-every": 1})])
        == 0
    )
    names = sorted(p.name for p in run.glob("lora-*.safetensors"))
    assert names == ["lora-last-ema.safetensors", "lora-last.safetensors", "lora-step-0000001.safetensors", "lora-step-0000002.safetensors"]  # fmt: skip
    assert not (run / "last.ckpt").exists()
    lora = read_lora(run / "lora-last.safetensors")
    # q, k, v, out of two attentions in each of the tiny UNet's transformer layers
    model = load_model(files["ckpt"], TINY_CONFIGS["v1"]).model
    unet = model.model.diffusion_model
    layers = sum(1 for name, _ in unet.named_modules() if name.endswith("transformer_blocks.0"))
    assert len(lora.modules) == 8 * layers and all(name.startswith("lora_unet_") for name in lora.modules)
    network = LoRANetwork.load(run / "lora-last.safetensors", unet)
    assert any(adapter.lora_up.weight.abs().sum() > 0 for adapter in network.values())  # it learned something
    state = torch.load(run / STATE_FILE, weights_only=True)["trained"]
    assert all(torch.equal(state[k], v) for k, v in network.state_dict().items())
    out = tmp_path / "out"
    args = [
        "--ckpt",
        str(files["ckpt"]),
        "--config",
        str(TINY_CONFIGS["v1"]),
        "--lora",
        f"{run / 'lora-last.safetensors'}:0.8",
    ]
    image, mask = REPO / "examples" / "bench.png", REPO / "examples" / "bench_mask.png"
    assert (
        main(
            [
                *args,
                "--image",
                str(image),
                "--mask",
                str(mask),
                "--steps",
                "2",
                "--outdir",
                str(out),
                "--height",
                "64",
                "--width",
                "64",
            ]
        )
        == 0
    )
    assert len(list(out.glob("*.png"))) == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_the_cpu(files, tmp_path, precision) -> None:
    """Autocast (and, for fp16, the loss scaler) on the same code path as CUDA; the weights stay float32."""
    run = tmp_path / precision
    args = train_args(
        files["ckpt"], files["data"], run, steps=2, precision=precision, **{"grad-checkpointing": True}
    )
    assert main(["train", *args]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([row["loss"], row["grad_norm"]])).all() for row in rows)
    weights = unet_weights(run / "last.ckpt")
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any(not torch.equal(w, unet_weights(files["ckpt"])[k]) for k, w in weights.items())


def test_a_bundled_model_missing_from_the_installation_is_one_line(capsys, monkeypatch) -> None:
    from ldm_inpaint.checkpoint_files import BUNDLED_CHECKPOINTS

    monkeypatch.setitem(BUNDLED_CHECKPOINTS, "absent", ("demo", "absent.safetensors"))
    with pytest.raises(SystemExit) as exited:
        main(["inspect", "absent"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "no bundled absent model" in err and "scripts/train_demo.py" in err and len(err.splitlines()) == 1
