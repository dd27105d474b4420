"""``ldm-inpaint ablate --eval-data DIR``: the evaluation protocol's metrics over a dataset for every setting
of a study, so that a sweep ends in numbers a paper would print.

A setting is a cell without its pair (checkpoint, LoRAs, every option): for each, the crop/mask pairs of
``--eval-data`` (made by ``ldm-inpaint eval masks``) are inpainted with the setting's options
(:func:`~ldm_inpaint.evaluation.predict.predict_folder`) into ``OUT/eval/<setting>/predictions`` and scored
against the crops (:mod:`~ldm_inpaint.evaluation.score`: FID, LPIPS, SSIM, PSNR, overall and by mask area) into
``OUT/eval/<setting>/report``. A setting with a report is done; a rerun finishes the rest. ``eval.json``,
``eval.md`` and ``eval.png`` put every setting's overall metrics (and the 40-50 % bin's) against its swept
values. The options are the study's, not the protocol's: fix ``paste_back``, ``guidance_scale``, ``steps``...
in the study as the protocol has them when the numbers should be comparable to the papers'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm_inpaint import distributed
from ldm_inpaint.ablation.cells import Cell
from ldm_inpaint.ablation.study import Study, format_value
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.evaluation import report
from ldm_inpaint.evaluation.metrics import PAPER_BIN
from ldm_inpaint.evaluation.predict import predict_folder
from ldm_inpaint.evaluation.score import Scorers, load_scorers, match_files, score_items, sources
from ldm_inpaint.files import check_output_folder, replace_text, write_atomic
from ldm_inpaint.options import InpaintOptions
from ldm_inpaint.pairs import find_pairs
from ldm_inpaint.pipeline import InpaintPipeline

SUMMARY_JSON, SUMMARY_MARKDOWN, SUMMARY_CHART = "eval.json", "eval.md", "eval.png"


@dataclass
class Evaluator:
    """The dataset and the scoring networks of ``--eval-data`` (networks loaded on first use)."""

    data: Path
    inception_weights: Path
    lpips_weights: Path | None
    batch_size: int
    out: Path
    device: torch.device
    failed: list[str] = field(default_factory=list)  # settings that could not be evaluated, one line each
    _scorers: Scorers | None = field(default=None, repr=False)

    def check(self) -> None:
        """LdmInpaintError before any work if the dataset or a weights file is missing."""
        pairs, _ = find_pairs(self.data) if self.data.is_dir() else ([], [])
        if not pairs:
            raise LdmInpaintError(
                f"--eval-data {self.data}: expected a folder of <img>_crop000.png + <img>_crop000_mask000.png "
                "pairs (ldm-inpaint eval masks makes one), found none"
            )
        for option, path in (
            ("--inception-weights", self.inception_weights),
            ("--lpips-weights", self.lpips_weights),
        ):
            if path is not None and not path.is_file():
                raise LdmInpaintError(f"{option} {path}: no such file")

    def report_folder(self, cell: Cell) -> Path:
        return self.out / "eval" / cell.setting / "report"

    def pending(self, cells: list[Cell]) -> list[Cell]:
        """One cell per setting of ``cells`` whose report is not written yet."""
        first = {cell.setting: cell for cell in reversed(cells)}
        return [cell for cell in first.values() if not (self.report_folder(cell) / report.JSON_FILE).exists()]

    def evaluate(self, pipeline: InpaintPipeline, cell: Cell) -> None:
        """Predict the dataset with the setting of ``cell`` and score it (the pipeline holds its LoRAs)."""
        folder = self.out / "eval" / cell.setting
        options = InpaintOptions(**cell.parameters)
        predictions = check_output_folder(folder / "predictions")
        predicted = predict_folder(pipeline, self.data, predictions, options, self.batch_size)
        if predicted.failed:
            raise LdmInpaintError(f"{len(predicted.failed)} pair(s) failed, e.g. {predicted.failed[0]}")
        if self._scorers is None:
            self._scorers = load_scorers(self.inception_weights, self.lpips_weights, self.device)
        items, problems = match_files(predictions, self.data, self.data)
        world = distributed.World(0, 1, self.device)
        scores = score_items(items, self._scorers, self.batch_size, world)
        used = sources(predictions, self.data, self.data, self.inception_weights, self.lpips_weights)
        report.check_report_folder(self.report_folder(cell))
        report.write_report(self.report_folder(cell), report.build_report(scores, problems, used, 1))


def _mean(stats: dict | None) -> float | None:
    return None if not stats else stats.get("mean")


def summary_rows(study: Study, cells: list[Cell], evaluator: Evaluator) -> list[dict[str, object]]:
    """One row per evaluated setting, in sweep order: its swept values and its overall / 40-50 % metrics."""
    rows = []
    for cell in {cell.setting: cell for cell in cells}.values():
        path = evaluator.report_folder(cell) / report.JSON_FILE
        if not path.exists():
            continue
        content = json.loads(path.read_text())
        overall = content["overall"]
        paper = content["bins"][PAPER_BIN] if content["bins"] else {}
        swept = {key: format_value(value) for key, value in zip(study.sweep, cell.position, strict=True)}
        rows.append(
            {
                "setting": cell.setting,
                **swept,
                "images": overall["images"],
                "fid": overall["fid"],
                "lpips": _mean(overall["lpips"]),
                "ssim": _mean(overall["ssim"]),
                "psnr": _mean(overall["psnr"]),
                "fid_40_50": paper.get("fid"),
                "lpips_40_50": _mean(paper.get("lpips")),
                "overall": overall,
            }
        )
    return rows


def write_summary(study: Study, rows: list[dict[str, object]], out: Path) -> list[Path]:
    """``eval.json``, ``eval.md`` and ``eval.png`` (each metric against the swept values), rewritten by each
    run of the study (views of the reports)."""
    if not rows:
        return []
    keys = list(study.sweep)
    labels = [" ".join(str(row[key]) for key in keys) or row["setting"] for row in rows]
    columns = ["setting", *keys, "images", "fid", "lpips", "ssim", "psnr", "fid_40_50", "lpips_40_50"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    replace_text(
        out / SUMMARY_JSON, json.dumps([{c: row[c] for c in columns} for row in rows], indent=1) + "\n"
    )
    replace_text(out / SUMMARY_MARKDOWN, "\n".join(lines) + "\n")
    picture = report.bar_charts(
        labels, [row["overall"] for row in rows], "by setting", "swept: " + " x ".join(keys)
    )
    write_atomic(out / SUMMARY_CHART, lambda file: picture.save(file, format="PNG"), replace=True)
    return [out / SUMMARY_JSON, out / SUMMARY_MARKDOWN, out / SUMMARY_CHART]
