"""The grids of a study: the first swept key down the rows, the second across the columns, one grid per
pair and value combination of any further keys."""

from __future__ import annotations

import itertools
from pathlib import Path

from PIL.Image import Image as PILImage

from ldm_inpaint import __version__, image_io
from ldm_inpaint.ablation.cells import Cell
from ldm_inpaint.ablation.draw import draw_grid
from ldm_inpaint.ablation.results import Results
from ldm_inpaint.ablation.study import Study, format_value


def _caption(row: dict[str, object] | None, cell: Cell) -> tuple[str, str]:
    if row is None or row["status"] != "ok":
        return cell.hash, "FAILED"
    first = f"{cell.hash} {row['unet_evaluations']} ev {row['wall_seconds']:.1f} s"
    inside = "-" if row["change_inside"] is None else f"{row['change_inside']:.3f}"
    outside = "-" if row["change_outside"] is None else f"{row['change_outside']:.3f}"
    return first, f"out {outside} in {inside}"


def write_grids(study: Study, cells: list[Cell], results: Results, out: Path) -> list[Path]:
    """One grid per pair and value combination of the third and further swept keys, ``grid-<pair>[-pN].png``,
    rewritten by each run of the study (a grid is a view of the results); returns their paths."""
    axes = list(study.sweep.items())
    row_axis = axes[0] if len(axes) >= 2 else None
    column_axis = axes[1] if len(axes) >= 2 else (axes[0] if axes else None)
    row_values = row_axis[1] if row_axis else [None]
    column_values = column_axis[1] if column_axis else [None]
    pages = list(itertools.product(*(values for _, values in axes[2:])))
    by_position = {(cell.pair.name, cell.position): cell for cell in cells}
    written = []
    for pair in study.pairs:
        for number, page in enumerate(pages, start=1):
            grid_cells = [
                [
                    by_position[(pair.name, _position(len(axes), row, column, page))]
                    for column in column_values
                ]
                for row in row_values
            ]
            tiles = [[_tile(cell, results.latest(cell), out) for cell in line] for line in grid_cells]
            page_text = ", ".join(
                f"{key}={format_value(value)}" for (key, _), value in zip(axes[2:], page, strict=True)
            )
            title = f"{pair.name} ({pair.image_path.name})" + (f" | {page_text}" if page_text else "")
            grid = draw_grid(
                title,
                _labels(row_axis),
                _labels(column_axis),
                tiles,
                (pair.image.shape[-1], pair.image.shape[-2]),
            )
            metadata = {
                "pair": pair.name,
                "rows": row_axis[0] if row_axis else "",
                "columns": column_axis[0] if column_axis else "",
                "page": page_text,
                "cells": " ".join(cell.hash for line in grid_cells for cell in line),
                "software": f"ldm-inpaint {__version__}",
            }
            name = f"grid-{pair.name}" + (f"-p{number}" if len(pages) > 1 else "") + ".png"
            written.append(image_io.write_png(grid, out / name, metadata))
    return written


def _labels(axis: tuple[str, list[object]] | None) -> tuple[str, list[str]] | None:
    return None if axis is None else (axis[0], [format_value(value) for value in axis[1]])


def _position(axes: int, row: object, column: object, page: tuple[object, ...]) -> tuple[object, ...]:
    """A cell's swept values from its grid row, column and page (one axis: the columns; none: one cell)."""
    if axes >= 2:
        return (row, column, *page)
    return (column,) if axes == 1 else ()


def _tile(
    cell: Cell, row: dict[str, object] | None, out: Path
) -> tuple[PILImage | None, tuple[str, str], str]:
    if row is not None and row["status"] == "ok":
        return image_io.load_image(out / str(row["cell_image"])).convert("RGB"), _caption(row, cell), ""
    return None, _caption(row, cell), f"failed: {row['error'] if row else 'not run'}"
