"""A study's results: one row per cell and attempt, in one SQLite file, exported as JSON lines and CSV.

``results.sqlite`` is the one source of truth: each row is committed in its own transaction, so a run killed
at any instant loses at most the cell in flight. ``results.jsonl`` and ``results.csv`` are exports of it,
rewritten whole (atomically) after every row and when a study starts, so they always hold the same rows, and a
resumed study neither loses nor duplicates one.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

from torch import Tensor

from ldm_inpaint import options
from ldm_inpaint.ablation.cells import Cell
from ldm_inpaint.ablation.lora_axis import LORA
from ldm_inpaint.ablation.study import CHECKPOINT, SpecError
from ldm_inpaint.files import remove_stale_partials, replace_text

COLUMNS = (
    "hash",
    "status",
    "error",
    "pair",
    "image",
    "mask",
    "resize_mask",
    CHECKPOINT,
    "checkpoint_sha256",
    LORA,
    "lora_sha256",
    "config",
    "use_ema",
    "precision",
    "device",
    *options.SWEEPABLE,
    "cell_image",
    "wall_seconds",
    "unet_evaluations",
    "steps_taken",
    "change_outside",
    "change_inside",
    "finished_at",
    "software",
)


class Results:
    """The rows of a study folder ``out`` (created if missing): a list per cell hash, oldest first."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.database, self.jsonl, self.csv = (
            out / "results.sqlite",
            out / "results.jsonl",
            out / "results.csv",
        )
        out.mkdir(parents=True, exist_ok=True)
        for folder in (out, out / "cells"):
            remove_stale_partials(folder)
        try:
            self.connection = sqlite3.connect(self.database, timeout=60, isolation_level=None)
            self.connection.execute(
                "CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, row TEXT NOT NULL)"
            )
            stored = [
                json.loads(text) for (text,) in self.connection.execute("SELECT row FROM rows ORDER BY id")
            ]
        except (sqlite3.Error, json.JSONDecodeError) as error:
            raise SpecError(
                f"{self.database} is not a results database of this version ({error}); use a new --out folder"
            ) from None
        self.rows: dict[str, list[dict[str, object]]] = {}
        for row in stored:
            self.rows.setdefault(str(row["hash"]), []).append(row)
        self.export()

    def finished(self, cell: Cell) -> bool:
        """True if the cell has an ``ok`` row and its image file exists."""
        row = self.latest(cell)
        return row is not None and row["status"] == "ok"

    def latest(self, cell: Cell) -> dict[str, object] | None:
        """The cell's last ``ok`` row whose image exists, else its last failed attempt, else None."""
        rows = self.rows.get(cell.hash, [])
        for row in reversed(rows):
            if row.get("status") == "ok" and (self.out / str(row.get("cell_image"))).is_file():
                return row
        failed = [row for row in rows if row.get("status") != "ok"]
        return failed[-1] if failed else None

    def append(self, row: dict[str, object]) -> None:
        """Commit ``row``, then export every row."""
        with self.connection:
            self.connection.execute(
                "INSERT INTO rows (row) VALUES (?)", (json.dumps(row, ensure_ascii=False),)
            )
        self.rows.setdefault(str(row["hash"]), []).append(row)
        self.export()

    def all_rows(self) -> list[dict[str, object]]:
        return [json.loads(text) for (text,) in self.connection.execute("SELECT row FROM rows ORDER BY id")]

    def export(self) -> None:
        """Rewrite ``results.jsonl`` and ``results.csv`` from the database."""
        rows = self.all_rows()
        replace_text(self.jsonl, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})
        replace_text(self.csv, table.getvalue())

    def close(self) -> None:
        self.connection.close()


def mask_change(original: Tensor, result: Tensor, mask: Tensor) -> tuple[float | None, float | None]:
    """Mean absolute change of the pixels (values in [0, 1], over pixels and channels) outside and inside the
    mask, None for an empty region. ``original`` and ``result`` (1, 3, H, W) in [-1, 1], ``mask`` (1, 1, H, W)."""
    change = (result.float().clamp(-1, 1) - original.float().clamp(-1, 1)).abs() / 2
    inside = (mask >= 0.5).expand_as(change)  # (1, 1, H, W) -> (1, 3, H, W)
    outside_values, inside_values = change[~inside], change[inside]
    return tuple(
        values.mean().item() if values.numel() else None for values in (outside_values, inside_values)
    )
