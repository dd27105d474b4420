"""Running a study's cells: one pipeline per checkpoint, one row per attempt, nothing run twice."""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ldm_inpaint import __version__, image_io
from ldm_inpaint.ablation.cells import Cell
from ldm_inpaint.ablation.lora_axis import lora_row
from ldm_inpaint.ablation.results import Results, mask_change
from ldm_inpaint.ablation.study import CHECKPOINT, CheckpointRef, Study
from ldm_inpaint.checkpoint import load_model
from ldm_inpaint.devices import PRECISIONS
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.models.packing import can_pack
from ldm_inpaint.options import InpaintOptions
from ldm_inpaint.pipeline import InpaintPipeline

if TYPE_CHECKING:  # the evaluation needs the eval extra; the runner only holds one
    from ldm_inpaint.ablation.evaluation import Evaluator

PROG = "ldm-inpaint ablate"


@dataclass
class Runner:
    """Runs a study's cells into ``out``: one pipeline per checkpoint, a row per attempt."""

    study: Study
    out: Path
    device: torch.device
    precision: str
    results: Results
    evaluator: Evaluator | None = None  # --eval-data: the dataset metrics of every setting

    def base_row(self, cell: Cell) -> dict[str, object]:
        return {
            "hash": cell.hash,
            "status": "failed",
            "error": None,
            "pair": cell.pair.name,
            "image": str(cell.pair.image_path.resolve()),
            "mask": str(cell.pair.mask_path.resolve()),
            "resize_mask": self.study.resize_mask,
            CHECKPOINT: str(cell.checkpoint.path.resolve()),
            "checkpoint_sha256": cell.checkpoint_sha256,
            **lora_row(cell.loras),
            "config": cell.checkpoint.config,
            "use_ema": self.study.use_ema,
            "precision": self.precision,
            "device": str(self.device),
            **cell.parameters,
            "cell_image": None,
            "wall_seconds": None,
            "unet_evaluations": None,
            "steps_taken": None,
            "change_outside": None,
            "change_inside": None,
            "finished_at": None,
            "software": f"ldm-inpaint {__version__}",
        }

    def record(self, row: dict[str, object], **updates: object) -> None:
        self.results.append(
            {**row, **updates, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        )

    def run(self, cells: list[Cell]) -> None:
        """Every unfinished cell (and unevaluated setting), checkpoint by checkpoint; a checkpoint without work
        is not loaded."""
        pending = [cell for cell in cells if not self.results.finished(cell)]
        with tqdm(
            total=len(cells), initial=len(cells) - len(pending), unit="cell", desc="ablate", file=sys.stderr
        ) as bar:
            for ref in self.study.checkpoints:
                todo = [cell for cell in pending if cell.checkpoint == ref]
                mine = [cell for cell in cells if cell.checkpoint == ref]
                settings = self.evaluator.pending(mine) if self.evaluator is not None else []
                if todo or settings:
                    self.run_checkpoint(ref, todo, bar, settings)
                    gc.collect()  # the checkpoint's pipeline is gone: free it before loading the next
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()

    def run_checkpoint(self, ref: CheckpointRef, cells: list[Cell], bar: tqdm, settings: list[Cell]) -> None:
        try:
            dtype = PRECISIONS[self.precision]
            loaded = load_model(
                ref.path,
                ref.config,
                use_ema=self.study.use_ema,
                dtype=dtype,
                device=self.device,
                pack=can_pack(self.device, dtype),
            )
        except (LdmInpaintError, RuntimeError, OSError) as error:
            for cell in cells:
                self.record(self.base_row(cell), error=f"cannot load the checkpoint: {error}")
                bar.update(1)
            for cell in settings:
                bar.write(
                    f"{PROG}: eval {cell.setting}: cannot load the checkpoint: {error}", file=sys.stderr
                )
            return
        bar.write(
            f"{PROG}: {ref.path.name}: config {loaded.config.name} ({loaded.config_source})", file=sys.stderr
        )
        pipeline = InpaintPipeline(loaded.model)

        # cells with the same LoRAs together: each change of LoRAs re-merges the weights
        def by_loras(cell: Cell) -> list[tuple[str, float]]:
            return [(str(ref.path), ref.weight) for ref in cell.loras]

        for cell in sorted(cells, key=by_loras):
            bar.set_postfix_str(f"{cell.pair.name} {cell.hash}")
            self.run_cell(pipeline, cell, self.base_row(cell) | {"config": pipeline.config.name})
            bar.update(1)
        for cell in sorted(settings, key=by_loras):
            bar.set_postfix_str(f"eval {cell.setting}")
            try:
                self.use_loras(pipeline, cell)
                self.evaluator.evaluate(pipeline, cell)
            except (LdmInpaintError, RuntimeError) as error:
                self.evaluator.failed.append(f"eval {cell.setting}: {error}")

    @staticmethod
    def use_loras(pipeline: InpaintPipeline, cell: Cell) -> None:
        loras = [(ref.path, ref.weight) for ref in cell.loras]
        if [(lora.lora.path, lora.weight) for lora in pipeline.loras] != loras:
            pipeline.set_loras(loras)

    def run_cell(self, pipeline: InpaintPipeline, cell: Cell, row: dict[str, object]) -> None:
        start = time.perf_counter()
        try:
            self.use_loras(pipeline, cell)
            result = pipeline(cell.pair.image, cell.pair.mask, InpaintOptions(**cell.parameters))
        except (LdmInpaintError, RuntimeError) as error:
            self.record(row, error=str(error), wall_seconds=time.perf_counter() - start)
            return
        wall_seconds = time.perf_counter() - start
        outside, inside = mask_change(cell.pair.image, result.images, cell.pair.mask)
        metadata = {key: str(value) for key, value in row.items() if value is not None and key != "status"}
        png = image_io.save_png(
            result.to_pil()[0], self.out / "cells", f"{cell.pair.name}-{cell.hash}", metadata
        )
        self.record(
            row,
            status="ok",
            cell_image=png.relative_to(self.out).as_posix(),
            wall_seconds=wall_seconds,
            unet_evaluations=result.unet_evaluations,
            steps_taken=result.steps_taken,
            change_outside=outside,
            change_inside=inside,
        )
