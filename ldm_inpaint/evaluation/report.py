"""The scores as files: ``report.json`` (everything, per image too), ``report.md`` (tables beside the
published numbers) and ``by_mask_area.png`` (each score by mask-area bin; drawn with Pillow).

The files are written whole or not at all and never over an existing report (:mod:`ldm_inpaint.files`): a
folder that holds one is refused before any scoring.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ldm_inpaint import __version__
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.evaluation.metrics import AREA_BINS, PAPER_BIN, bin_name, frechet_distance, mean_std
from ldm_inpaint.files import check_output_folder, write_atomic

if TYPE_CHECKING:
    from ldm_inpaint.evaluation.score import Record, Scores

JSON_FILE, MARKDOWN_FILE, CHART_FILE = "report.json", "report.md", "by_mask_area.png"
PUBLISHED_DATA = "Places validation, 30k 512x512 crops, LaMa thick masks, all samples"
# RunwayML's SD inpainting model card (the LDM paper's Table 7 for the others): FID, LPIPS mean and std, and
# the LPIPS decimals published.
PUBLISHED: tuple[tuple[str, float, float, float | None, int], ...] = (
    ("Stable Diffusion inpainting", 1.00, 0.141, 0.082, 3),
    ("LDM inpainting (big, fine-tuned)", 1.50, 0.137, 0.080, 3),
    ("CoModGAN", 1.82, 0.15, None, 2),
    ("LaMa", 2.21, 0.134, 0.080, 3),
)
# (key, title, lower is better, decimals)
METRICS = (
    ("fid", "FID", True, 2),
    ("lpips", "LPIPS", True, 3),
    ("ssim", "SSIM", False, 3),
    ("psnr", "PSNR (dB)", False, 2),
)


def check_report_folder(folder: Path) -> None:
    """Create ``folder`` if needed; refuse it if it holds a report already."""
    check_output_folder(folder)
    for name in (JSON_FILE, MARKDOWN_FILE, CHART_FILE):
        if (folder / name).exists():
            raise LdmInpaintError(
                f"{folder / name} exists; a report is never overwritten: choose another --out or move it away"
            )


def _fid(moments: Tensor | None, notes: list[str], name: str) -> float | None:
    if moments is None or moments[0, -1, -1] < 2:
        return None
    try:
        return frechet_distance(moments[0], moments[1])
    except ValueError as error:  # pytorch-fid: the matrix square root has an imaginary part
        notes.append(f"FID of {name}: not computed ({error})")
        return None


def summarize(records: list[Record], moments: Tensor | None, notes: list[str], name: str) -> dict:
    """Image count, FID (2 or more images), and mean and std of LPIPS, SSIM and PSNR of one group."""
    return {
        "images": len(records),
        "fid": _fid(moments, notes, name),
        "lpips": mean_std([record.lpips for record in records if record.lpips is not None]),
        "ssim": mean_std([record.ssim for record in records]),
        "psnr": mean_std([record.psnr for record in records]),
    }


def build_report(scores: Scores, not_scored: list[str], sources: dict, processes: int) -> dict:
    """The report's content (``report.json``): overall, by mask-area bin (with masks), the published rows,
    what could not be scored, and every image's scores. The overall FID is over the moments of all bins."""
    notes: list[str] = []
    groups = list(scores.moments)
    overall = sum(scores.moments.values()) if groups else None
    bins = []
    if groups and groups != [None]:
        for index in range(AREA_BINS):
            records = [record for record in scores.records if record.group == index]
            summary = summarize(records, scores.moments.get(index), notes, bin_name(index))
            bins.append({"bin": bin_name(index), **summary})
    images = len(scores.records)
    return {
        "sources": sources,
        "processes": processes,
        "seconds": scores.seconds,
        "images_per_second": images / scores.seconds if scores.seconds > 0 else None,
        "overall": summarize(scores.records, overall, notes, "all images"),
        "paper_bin": bin_name(PAPER_BIN),
        "bins": bins,
        "published": [
            {"model": model, "data": PUBLISHED_DATA, "fid": fid, "lpips": {"mean": mean, "std": std}}
            for model, fid, mean, std, _ in PUBLISHED
        ],
        "not_scored": not_scored + scores.failures,
        "notes": notes,
        "software": {
            "ldm-inpaint": __version__,
            **{name: version(name) for name in ("torch", "pytorch-fid", "lpips", "scikit-image")},
        },
        "per_image": [{**asdict(record), "bin": record.group} for record in scores.records],
    }


def _finite(value):
    """JSON without NaN or infinity (a PSNR of identical images): those become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def _number(value: float | None, decimals: int) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def _spread(stats: dict | None, decimals: int) -> str:
    if stats is None:
        return "–"
    if stats["std"] is None:
        return _number(stats["mean"], decimals)
    return f"{_number(stats['mean'], decimals)} ± {_number(stats['std'], decimals)}"


def _paper_bin(content: dict) -> dict | None:
    return content["bins"][PAPER_BIN] if content["bins"] else None


def markdown(content: dict) -> str:
    """``report.md``: ours beside the published rows, then every score by mask-area bin."""
    overall, sources, subset = content["overall"], content["sources"], _paper_bin(content)
    scored = f"{overall['images']} images"
    lines = [
        "# Inpainting scores",
        "",
        f"Predictions `{sources['pred']}` against `{sources['real']}`"
        + (f", masks `{sources['masks']}`" if sources["masks"] else ", no masks (no bins)")
        + f": {scored} scored; {len(content['not_scored'])} problems with the files "
        f"(in {JSON_FILE}: not_scored).",
        "FID: pytorch-fid's Inception (pool3, 2048-d); LPIPS: v0.1 net-lin over VGG16; SSIM: 11x11 Gaussian "
        "window (sigma 1.5), images in [0, 1]; PSNR: peak 1. Mean ± standard deviation over images.",
        "",
        f"| model | data | FID | LPIPS | FID {content['paper_bin']} | LPIPS {content['paper_bin']} |",
        "|---|---|---|---|---|---|",
        f"| this run | the given data ({scored}) | {_number(overall['fid'], 2)} | "
        f"{_spread(overall['lpips'], 3)} | {_number(subset and subset['fid'], 2)} | "
        f"{_spread(subset and subset['lpips'], 3)} |",
    ]
    for row, (*_, decimals) in zip(content["published"], PUBLISHED, strict=True):
        lines.append(
            f"| {row['model']} | {row['data']} | {row['fid']:.2f} | {_spread(row['lpips'], decimals)} | "
            "– | – |"
        )
    lines += [
        "",
        "The published rows are on Places (30k crops, LaMa's protocol), ours on the data given here: FID "
        "over few images is biased upward and comparable only at equal counts on the same images.",
    ]
    if content["bins"]:
        lines += [
            "",
            "## By mask area",
            "",
            "| mask area | images | FID | LPIPS | SSIM | PSNR (dB) |",
            "|---|---|---|---|---|---|",
        ]
        for row in content["bins"]:
            lines.append(
                f"| {row['bin']} | {row['images']} | {_number(row['fid'], 2)} | {_spread(row['lpips'], 3)} | "
                f"{_spread(row['ssim'], 3)} | {_spread(row['psnr'], 2)} |"
            )
        lines += ["", f"![scores by mask area]({CHART_FILE})"]
    lines += [f"- {note}" for note in content["notes"]]
    return "\n".join(lines) + "\n"


def _value(row: dict, key: str) -> float | None:
    value = row[key]["mean"] if isinstance(row[key], dict) else row[key]
    return value if value is not None and math.isfinite(value) else None


def chart(bins: list[dict]) -> Image.Image:
    """Four bar charts (FID, LPIPS, SSIM, PSNR) of the mean by mask-area bin, the paper's bin in orange."""
    labels = [row["bin"].removesuffix("%") for row in bins]
    return bar_charts(labels, bins, "by mask area", "mask area, % of the image", highlight=PAPER_BIN)


def bar_charts(
    labels: list[str], rows: list[dict], what: str, axis: str, highlight: int | None = None
) -> Image.Image:
    """Four bar charts (FID, LPIPS, SSIM, PSNR), one bar per row (a :func:`summarize` dict) labelled by
    ``labels``, bar ``highlight`` in orange: a report's bins, or a study's settings."""
    width, height, margin = max(480, 48 * len(rows)), 300, 40
    image = Image.new("RGB", (2 * width, 2 * height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for panel, (key, title, lower_better, decimals) in enumerate(METRICS):
        left, top = (panel % 2) * width, (panel // 2) * height
        values = [_value(row, key) for row in rows]
        top_value = max((value for value in values if value is not None), default=0.0) or 1.0
        draw.text(
            (left + margin, top + 10),
            f"{title} {what} ({'lower' if lower_better else 'higher'} is better)",
            fill="black",
            font=font,
        )
        base, plot_height = top + height - margin, height - 2 * margin - 10
        draw.line([(left + margin, base), (left + width - 10, base)], fill="black")
        slot = (width - margin - 10) / len(rows)
        for index, (label, value) in enumerate(zip(labels, values, strict=True)):
            x0 = left + margin + index * slot + 4
            draw.text((x0, base + 5), label, fill="black", font=font)
            if value is None:
                continue
            y = base - plot_height * max(value, 0.0) / top_value
            color = (230, 140, 30) if index == highlight else (70, 110, 180)
            draw.rectangle([x0, y, x0 + slot - 8, base], fill=color)
            draw.text((x0, y - 12), f"{value:.{decimals}f}", fill="black", font=font)
    draw.text((10, 2 * height - 14), axis, fill="black", font=font)
    return image


def write_report(folder: Path, content: dict) -> list[Path]:
    """Write the report files into ``folder``; returns their paths. Raises if one appeared meanwhile."""
    written = []
    text = json.dumps(_finite(content), indent=1, allow_nan=False) + "\n"
    files = [
        (JSON_FILE, lambda file: file.write(text.encode())),
        (MARKDOWN_FILE, lambda file: file.write(markdown(content).encode())),
    ]
    if content["bins"]:
        picture = chart(content["bins"])
        files.append((CHART_FILE, lambda file: picture.save(file, format="PNG")))
    for name, write in files:
        path = folder / name
        if not write_atomic(path, write):
            raise LdmInpaintError(f"{path} appeared while scoring; a report is never overwritten")
        written.append(path)
    return written
