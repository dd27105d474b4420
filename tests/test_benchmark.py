"""``scripts/benchmark.py`` on the tiny configs: the files it gives diffusers do the same text and UNet work as
ours, one end-to-end run writes a complete report, failures are reported, bad input is refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ldm_inpaint.pipeline import InpaintPipeline
from scripts.benchmarking import main as benchmark
from scripts.benchmarking.diffusers_files import prepare_worker
from scripts.benchmarking.report import write_report
from scripts.benchmarking.settings import NEGATIVE_PROMPT, PROMPT

from .conftest import CONFIGS, TINY_CONFIGS
from .parity import assert_parity

SMOKE_MODEL = TINY_CONFIGS["v2"]
SMOKE_ARGS = ["--sizes", "64", "--steps", "2", "--reps", "1", "--precision", "fp32", "--threads", "1"]


def files_of(config: Path, workdir: Path) -> object:
    return benchmark.cache_job(config.stem, config, workdir, seed=0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both tiny models' .ckpt and diffusers folders, written by the prepare worker's function in-process."""
    folder = tmp_path_factory.mktemp("benchmark-work")
    for config in TINY_CONFIGS.values():
        prepare_worker(files_of(config, folder))
    return folder


@pytest.fixture(scope="module")
def smoke(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """One end-to-end run (matmul and run workers in fresh processes): exit status and output folder."""
    out = tmp_path_factory.mktemp("benchmark-out")
    argv = ["--models", str(SMOKE_MODEL), *SMOKE_ARGS, "--matmul-size", "128"]
    return benchmark.main([*argv, "--workdir", str(workdir), "--out", str(out)]), out


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_diffusers_text_path_matches_ours(workdir: Path, version: str) -> None:
    """The tokenizer built from open_clip's BPE and the converted text encoder, as diffusers loads them from
    the saved folder, give our contexts: both sides do the same text work."""
    files = files_of(TINY_CONFIGS[version], workdir)
    theirs = StableDiffusionInpaintPipeline.from_pretrained(files.diffusers_dir)
    ours = InpaintPipeline.from_checkpoint(files.checkpoint, TINY_CONFIGS[version])
    prompt, negative = PROMPT, NEGATIVE_PROMPT
    with torch.no_grad():
        context, uncond_context = theirs.encode_prompt(prompt, "cpu", 1, True, negative)
    expected = ours.encode_prompts([prompt, negative])
    assert_parity(context, expected[:1])
    assert_parity(uncond_context, expected[1:])


def test_unet_flops_are_diffusers_flops(workdir: Path) -> None:
    """The FLOPs counted on our UNet (meta device) are those of diffusers' UNet run for real, so one count
    serves both sides' GFLOP/s. Both count attention on SDPA's math backend: whether torch's counter sees
    the fused CPU kernel's FLOPs depends on the release (2.14 counts none)."""
    unet = UNet2DConditionModel.from_pretrained(
        files_of(SMOKE_MODEL, workdir).diffusers_dir, subfolder="unet"
    )
    x, context = torch.randn(2, 9, 8, 8), torch.randn(2, 77, unet.config.cross_attention_dim)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.tensor([500, 500]), context)
    assert counter.get_total_flops() == benchmark.unet_flops(SMOKE_MODEL, 64) > 0


def test_end_to_end_report(smoke: tuple[int, Path]) -> None:
    status, out = smoke
    assert status == 0
    report = json.loads((out / "benchmark-001.json").read_text())
    runs = report["runs"]
    assert sorted(run["implementation"] for run in runs) == ["diffusers", "ours"]
    for run in runs:
        assert "error" not in run, run
        assert run["steps_taken"] == 2 and len(run["step_s"]) == 1 and run["output_shape"] == [1, 3, 64, 64]
        assert 0 < run["import_rss_bytes"] <= run["load_rss_bytes"] <= run["peak_rss_bytes"]
        assert all(run[key] > 0 for key in ("load_s", "image_s", "text_s", "vae_encode_s", "vae_decode_s"))
    [row] = report["summary"]
    for implementation in ("ours", "diffusers"):
        stats = row[implementation]
        for key in (
            "median_step_s",
            "image_s",
            "load_s",
            "unet_gflops",
            "matmul_peak_fraction",
            "file_bytes",
        ):
            assert math.isfinite(stats[key]) and stats[key] > 0, (implementation, key)
    assert all(math.isfinite(ratio) and ratio > 0 for ratio in row["ratio"].values())
    assert report["matmul"]["fp32"]["gflops"] > 0 and report["machine"]["threads"] == 1

    [memory] = report["load_memory"]
    assert (memory["model"], memory["precision"]) == ("v2-inpainting-tiny", "fp32")
    assert memory["peak_rss_bytes"] > memory["file_bytes"] == row["ours"]["file_bytes"]
    assert memory["ratio"] == memory["peak_rss_bytes"] / memory["file_bytes"]

    table = (out / "benchmark-001.md").read_text()
    assert "| s/step ours | s/step diffusers | step ratio |" in table
    assert "| v2-inpainting-tiny | fp32 |" in table and "`ldm-inpaint --ckpt " in table
    [line] = [line for line in table.splitlines() if line.startswith("| v2-inpainting-tiny | 64 | fp32 |")]
    assert "—" not in line
    assert "scripts/benchmark.py --models" in table


def test_reports_are_never_overwritten(smoke: tuple[int, Path]) -> None:
    _, out = smoke
    first = (out / "benchmark-001.json").read_text()
    report = json.loads(first)
    paths = [write_report(report, out) for _ in range(2)]
    assert [json_path.name for json_path, _ in paths] == ["benchmark-002.json", "benchmark-003.json"]
    assert (out / "benchmark-001.json").read_text() == first


def test_failed_workers_are_reported_not_raised(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["--models", str(SMOKE_MODEL), *SMOKE_ARGS, "--timeout", "0.01"]
    status = benchmark.main([*argv, "--workdir", str(workdir), "--out", str(tmp_path)])
    assert status == 1
    report = json.loads((tmp_path / "benchmark-001.json").read_text())
    assert all("timed out after 0.01 s" in run["error"] for run in report["runs"])
    assert all("timed out after 0.01 s" in row["error"] for row in report["load_memory"])
    assert "Failed runs:" in (tmp_path / "benchmark-001.md").read_text()
    assert "| v2-inpainting-tiny | 64 | fp32 | — | — |" in capsys.readouterr().out


def test_load_memory_mode_measures_only_the_load(workdir: Path, tmp_path: Path) -> None:
    models = ",".join(str(config) for config in TINY_CONFIGS.values())
    argv = ["--models", models, "--precision", "fp32", "--threads", "1", "--load-memory"]
    assert benchmark.main([*argv, "--workdir", str(workdir), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "benchmark-001.json").read_text())
    assert report["runs"] == [] and report["summary"] == []
    assert [row["model"] for row in report["load_memory"]] == [
        config.stem for config in TINY_CONFIGS.values()
    ]
    assert all(row["ratio"] > 0 for row in report["load_memory"])
    table = (tmp_path / "benchmark-001.md").read_text()
    assert table.startswith("Load memory:") and "s/step" not in table and "--load-memory" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "3"], "--steps: expected a divisor of 1000 that is at least 2"),
        (["--steps", "1"], "found 1"),
        (["--sizes", "256,100"], "--sizes: each side must be a positive multiple of 64"),
        (["--sizes", "big"], "--sizes: expected integers"),
        (["--precision", "fp32,fp8"], "--precision: unknown ['fp8']"),
        (["--models", "sd3"], "--models: unknown model 'sd3'"),
        (["--models", str(CONFIGS / "v1-inference.yaml")], "is a text-to-image config"),
        (["--reps", "0"], "expected positive values, found {'--reps': 0}"),
    ],
)
def test_bad_input_is_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as error:
        benchmark.main(argv)
    assert error.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_mode_measures_prediction_and_scoring_speed(workdir: Path, tmp_path: Path) -> None:
    argv = ["--models", str(SMOKE_MODEL), "--sizes", "64", "--steps", "2", "--threads", "1", "--eval"]
    assert benchmark.main([*argv, "--workdir", str(workdir), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "benchmark-001.json").read_text())
    prediction, scoring = report["evaluation"]["prediction"], report["evaluation"]["scoring"]
    assert [(row["size"], row["batch_size"]) for row in prediction] == [(64, 1), (64, 4)]
    assert all(row["pairs_per_s"] > 0 for row in prediction) and scoring[0]["images_per_s"] > 0
    table = (tmp_path / "benchmark-001.md").read_text()
    assert "batching speed-up" in table and "scoring images/s" in table and "--eval" in table


def test_serve_mode_measures_the_servers_overhead(workdir: Path, tmp_path: Path) -> None:
    argv = ["--models", str(SMOKE_MODEL), "--sizes", "64", "--steps", "2", "--threads", "1", "--serve"]
    assert benchmark.main([*argv, "--workdir", str(workdir), "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("benchmark-*.json")).read_text())
    (row,) = report["serving"]
    assert len(row["direct"]) == len(row["server"]) == 3 and row["size"] == 64 and row["steps"] == 2
    assert 0 < row["first_event_s"] <= row["first_step_event_s"]
    table = next(tmp_path.glob("benchmark-*.md")).read_text()
    assert "overhead" in table and "first progress event" in table and "--serve" in table
