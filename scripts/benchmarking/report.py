"""The benchmark's figures: medians and ratios per table row, the Markdown table, the report files."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ldm_inpaint.files import write_new_text

from .evaluation import evaluation_table
from .serving import serving_table
from .settings import GB, GUIDANCE_SCALE, IMPLEMENTATIONS, Settings, cases


def _median(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


SUMMARY_FIELDS = (
    "median_step_s",
    "image_s",
    "load_s",
    "text_s",
    "vae_encode_s",
    "vae_decode_s",
    "import_rss_bytes",
    "load_rss_bytes",
    "peak_rss_bytes",
    "gpu_peak_bytes",
)


def summarize(raw: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """One row per model x size x precision: medians over repetitions per implementation, and ratios."""
    rows = []
    for case in cases(settings):
        files = raw["files"][case["model"]]
        flops = raw["unet_flops_per_step"][f"{case['model']}@{case['size']}"]
        peak = raw["matmul"][case["precision"]].get("gflops")
        row: dict[str, Any] = dict(case)
        for implementation, file_key in zip(
            IMPLEMENTATIONS, ("checkpoint_bytes", "diffusers_bytes"), strict=True
        ):
            runs = [
                run
                for run in raw["runs"]
                if run["implementation"] == implementation
                and all(run[key] == value for key, value in case.items())
            ]
            good = [run for run in runs if "error" not in run]
            stats = {field: _median([run.get(field) for run in good]) for field in SUMMARY_FIELDS}
            gflops = flops / stats["median_step_s"] / 1e9 if stats["median_step_s"] else None
            row[implementation] = {
                **stats,
                "runs_ok": len(good),
                "errors": [run["error"] for run in runs if "error" in run],
                "file_bytes": files.get(file_key),
                "unet_gflops": gflops,
                "matmul_peak_fraction": gflops / peak if gflops and peak else None,
            }
        row["ratio"] = {
            field: _ratio(row["ours"][field], row["diffusers"][field])
            for field in ("median_step_s", "image_s", "load_s", "load_rss_bytes", "peak_rss_bytes")
        }
        rows.append(row)
    return rows


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _rss(stats: dict[str, Any]) -> str:
    """Load peak RSS in GB and as a multiple of the weight files' size."""
    rss, size = stats["load_rss_bytes"], stats["file_bytes"]
    if rss is None:
        return "—"
    return f"{rss / GB:.2f} ({rss / size:.2f}x)" if size else f"{rss / GB:.2f}"


def _inference_rss(stats: dict[str, Any]) -> str:
    """Peak RSS at the end in GB, with the growth over the load peak."""
    peak, load = stats["peak_rss_bytes"], stats["load_rss_bytes"]
    return "—" if peak is None else f"{peak / GB:.2f} (+{(peak - load) / GB:.2f})"


def _gb(size: float | None) -> str:
    return "—" if size is None else f"{size / GB:.2f}"


def _gib(size: float | None) -> str:
    return "—" if size is None else f"{size / 2**30:.2f}"


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.0f}%"


COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("model", lambda row: row["model"]),
    ("px", lambda row: str(row["size"])),
    ("dtype", lambda row: row["precision"]),
    ("s/step ours", lambda row: _num(row["ours"]["median_step_s"], 3)),
    ("s/step diffusers", lambda row: _num(row["diffusers"]["median_step_s"], 3)),
    ("step ratio", lambda row: _num(row["ratio"]["median_step_s"])),
    ("s/image ours", lambda row: _num(row["ours"]["image_s"])),
    ("s/image diffusers", lambda row: _num(row["diffusers"]["image_s"])),
    ("image ratio", lambda row: _num(row["ratio"]["image_s"])),
    ("load s ours", lambda row: _num(row["ours"]["load_s"])),
    ("load s diffusers", lambda row: _num(row["diffusers"]["load_s"])),
    ("load RSS GB ours (x file)", lambda row: _rss(row["ours"])),
    ("load RSS GB diffusers (x file)", lambda row: _rss(row["diffusers"])),
    ("peak RSS GB ours (+ over load)", lambda row: _inference_rss(row["ours"])),
    ("peak RSS GB diffusers (+ over load)", lambda row: _inference_rss(row["diffusers"])),
    ("UNet GFLOP/s ours", lambda row: _num(row["ours"]["unet_gflops"], 1)),
    ("UNet GFLOP/s diffusers", lambda row: _num(row["diffusers"]["unet_gflops"], 1)),
    ("% matmul peak ours", lambda row: _percent(row["ours"]["matmul_peak_fraction"])),
    ("% matmul peak diffusers", lambda row: _percent(row["diffusers"]["matmul_peak_fraction"])),
)
GPU_COLUMNS = tuple(
    (
        f"GPU peak GB {implementation}",
        lambda row, implementation=implementation: _gb(row[implementation]["gpu_peak_bytes"]),
    )
    for implementation in IMPLEMENTATIONS
)


def markdown(report: dict[str, Any]) -> str:
    """The side-by-side table with its notes (unless ``--load-memory``), then the load-memory table."""
    if report["settings"]["evaluation"]:
        return evaluation_table(report) + "\n"
    if report["settings"]["serving"]:
        return serving_table(report) + "\n"
    sections = [] if report["settings"]["load_memory"] else [side_by_side(report)]
    return "\n\n".join([*sections, load_memory_table(report)]) + "\n"


def side_by_side(report: dict[str, Any]) -> str:
    """The table, the command and machine, what the columns mean, and any failures."""
    machine, settings = report["machine"], report["settings"]
    rows = report["summary"]
    columns = COLUMNS + (GPU_COLUMNS if settings["device"] == "cuda" else ())
    lines = [
        "| " + " | ".join(header for header, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows),
    ]
    matmul = ", ".join(
        f"{precision} {_num(result.get('gflops'), 0)}" for precision, result in report["matmul"].items()
    )
    notes = [
        "",
        f"`{report['command']}`",
        "",
        f"{machine['cpu']}, {settings['threads']} threads, device {settings['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + f"; torch {machine['torch']}, diffusers {machine['diffusers']}, transformers {machine['transformers']}. "
        f"DDIM {settings['steps']} steps, eta 0, guidance {GUIDANCE_SCALE} (UNet batch 2), "
        f"medians of {settings['reps']} runs per side, each in a fresh process after "
        f"{settings['warmup_calls']} warm-up call(s). Matmul peak ({settings['matmul_size']}^2, GFLOP/s): {matmul}.",
        "",
        "s/step: median step time without the first step (UNet + sampler). s/image: one whole call (text, VAE "
        "encode, sampling, VAE decode). ratio: ours / diffusers (below 1: ours is faster). load: weights file "
        "to ready pipeline (ours: the original .ckpt; diffusers: its safetensors folder), after imports. RSS: "
        "peak resident memory after loading (x: over the weight files' size) and at the end (+: growth during "
        "inference). UNet GFLOP/s: FLOPs of one guided UNet call / s/step.",
        "",
        *(f"- {difference}" for difference in report["differences"]),
    ]
    if not machine["diffusers_has_accelerate"]:
        notes.append(
            "- accelerate is not installed: diffusers' from_pretrained falls back to low_cpu_mem_usage=False "
            "(diffusers recommends accelerate for faster loading with less memory)."
        )
    failures = [
        f"- {row['model']} {row['size']}px {row['precision']} {implementation}: {error}"
        for row in rows
        for implementation in IMPLEMENTATIONS
        for error in row[implementation]["errors"]
    ]
    if failures:
        notes += ["", "Failed runs:", *failures]
    return "\n".join(lines + notes)


def load_memory_table(report: dict[str, Any]) -> str:
    """Per model and precision: the file's size, the command's peak resident memory and their ratio."""
    rows = report["load_memory"]
    lines = [
        "Load memory: peak resident memory of a fresh `ldm-inpaint` process that loads the .ckpt and inpaints "
        "one 64x64 step (wait4's ru_maxrss, as `/usr/bin/time -v` reports it), over the file's size.",
        "",
        "| model | dtype | file GiB | peak RSS GiB | x file |",
        "|---|---|---|---|---|",
        *(
            f"| {row['model']} | {row['precision']} | {_gib(row.get('file_bytes'))} | "
            f"{_gib(row.get('peak_rss_bytes'))} | {_num(row.get('ratio'))} |"
            for row in rows
        ),
    ]
    commands = [row["command"] for row in rows if "command" in row]
    if commands:
        lines += ["", f"`{commands[0]}`" + (" (and likewise for each row)" if len(rows) > 1 else "")]
    if report["settings"]["load_memory"]:
        machine, settings = report["machine"], report["settings"]
        lines += [
            "",
            f"`{report['command']}`",
            "",
            f"{machine['cpu']}, {settings['threads']} threads, device {settings['device']}; torch {machine['torch']}.",
        ]
    failures = [f"- {row['model']} {row['precision']}: {row['error']}" for row in rows if "error" in row]
    if failures:
        lines += ["", "Failed load-memory runs:", *failures]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``benchmark-N.json`` and ``benchmark-N.md`` with the first N that names neither file yet, each written
    whole under a temporary name first (:func:`ldm_inpaint.files.write_atomic`), never over a file."""
    out.mkdir(parents=True, exist_ok=True)
    texts = json.dumps(report, indent=1, default=str), markdown(report)  # paths as strings
    number = 1
    while True:
        paths = out / f"benchmark-{number:03d}.json", out / f"benchmark-{number:03d}.md"
        if not any(path.exists() for path in paths) and write_new_text(paths[0], texts[0]):
            if write_new_text(paths[1], texts[1]):
                return paths
            paths[0].unlink()  # another run took this number's table meanwhile
        number += 1
