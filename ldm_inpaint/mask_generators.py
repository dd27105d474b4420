"""Random inpainting masks (1 = inpaint): SD's training masks and LaMa's evaluation masks.

Sources (facts only; the code is ours):

- ``sd-large``: pesser/stable-diffusion ``ldm/data/inpainting/synthetic_mask.py``, mode ``512train-large``
  (``gen_large_mask``), the masks of the SD inpainting fine-tunes (``AddMask`` in ``ldm/data/laion.py``).
- ``lama-thick`` / ``lama-medium`` / ``lama-thin``: advimman/lama ``saicinpainting/training/data/masks.py``
  (``MixedMaskGenerator`` over ``RandomIrregularMaskGenerator`` and ``RandomRectangleMaskGenerator``) with
  ``configs/data_gen/random_{thick,medium,thin}_512.yaml``; the selection rule of ``bin/gen_mask_dataset.py``
  is :func:`draw_eval_crop` (square crops of any image) and :func:`draw_eval_mask` (square images).

Every draw comes from the ``numpy.random.Generator`` the caller passes (:func:`keyed_rng` keys one by
(seed, step, sample index)), never from a global RNG. A mask is first *planned*, a list of :class:`Stroke` and
:class:`Box` in reference pixels where every published integer range applies as written, then *rasterized*
(:func:`rasterize`: PIL as the SD original, OpenCV's thick-line geometry for LaMa's strokes). Ranges below are
inclusive; the sources' numpy upper bounds are exclusive and are kept so.

Sizes: the published parameters are for 512 x 512. For another size the plan is drawn on the reference canvas
whose shorter side is 512 (:func:`reference_size`; a 512 x 768 image is its own reference), and the raster scales
every coordinate, width, side and radius by ``s = min(height, width) / 512``. So a 64 x 64 mask is a 512 x 512
mask drawn at 1/8 scale (widths rounded to whole pixels, at least one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ldm_inpaint.errors import LdmInpaintError

MASK_KINDS = ("sd-large", "lama-thick", "lama-medium", "lama-thin")
REFERENCE_SIDE = 512


class MaskError(LdmInpaintError):
    """An unknown mask kind, or a size or random key no mask can be drawn for."""


@dataclass(frozen=True)
class Stroke:
    """A polyline through ``vertices`` (x, y); segment i joins vertices i and i + 1 with width ``widths[i]``.
    With ``round_caps`` every segment ends in a disc of its width (OpenCV's thick lines, so joints are round);
    without, a segment is a plain rotated rectangle (PIL's single line)."""

    vertices: tuple[tuple[float, float], ...]
    widths: tuple[int, ...]
    round_caps: bool


@dataclass(frozen=True)
class Box:
    """Pixels ``[left, left + width) x [top, top + height)`` with corners rounded to ``radius`` (0: square)."""

    left: int
    top: int
    width: int
    height: int
    radius: int = 0


Shape = Stroke | Box


@dataclass(frozen=True)
class LamaStrokes:
    """``irregular_kwargs`` of a LaMa data-gen config."""

    min_times: int
    max_times: int
    max_width: int
    max_len: int
    max_angle: int = 4


@dataclass(frozen=True)
class LamaBoxes:
    """``box_kwargs`` of a LaMa data-gen config; ``weight`` is ``box_proba`` against ``irregular_proba`` 1."""

    min_times: int
    max_times: int
    min_size: int
    max_size: int
    margin: int
    weight: float = 0.3


LAMA_SETS: dict[str, tuple[LamaStrokes, LamaBoxes | None]] = {
    "lama-thick": (LamaStrokes(1, 5, max_width=250, max_len=450), LamaBoxes(1, 4, 30, 300, margin=10)),
    "lama-medium": (LamaStrokes(4, 10, max_width=100, max_len=200), LamaBoxes(1, 5, 30, 150, margin=0)),
    "lama-thin": (LamaStrokes(4, 70, max_width=20, max_len=100), None),
}


def keyed_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The generator of one sample's draws (its mask; in training also its crop, caption dropout, timestep and
    noise): a function of (seed, training step or 0, sample index) only, never of the number of processes or
    the order in which samples are drawn."""
    key = (seed, step, index)
    if any(not isinstance(part, int | np.integer) or part < 0 for part in key):
        raise MaskError(f"a mask's random key is three integers >= 0 (seed, step, index), found {key}")
    return np.random.default_rng(key)


def reference_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the canvas a plan is drawn on: the image scaled so that its shorter side is 512."""
    if height < 1 or width < 1:
        raise MaskError(f"a mask needs a height and width of at least 1 pixel, found {height} x {width}")
    short = min(height, width)
    return round(height * REFERENCE_SIDE / short), round(width * REFERENCE_SIDE / short)


def _check_kind(kind: str) -> None:
    if kind not in MASK_KINDS:
        raise MaskError(f"mask kind must be one of {', '.join(MASK_KINDS)}; found {kind!r}")


def plan_mask(kind: str, height: int, width: int, rng: np.random.Generator) -> list[Shape]:
    """The shapes of one random mask of ``kind`` for a ``height x width`` image, in reference pixels."""
    _check_kind(kind)
    ref_height, ref_width = reference_size(height, width)
    if kind == "sd-large":
        return _plan_sd_large(ref_height, ref_width, rng)
    strokes, boxes = LAMA_SETS[kind]
    # MixedMaskGenerator picks one generator by its normalized weights: strokes 1, boxes 0.3 (23 %).
    if boxes is not None and rng.random() < boxes.weight / (1 + boxes.weight):
        return _plan_lama_boxes(boxes, ref_height, ref_width, rng)
    return _plan_lama_strokes(strokes, ref_height, ref_width, rng)


def _plan_sd_large(height: int, width: int, rng: np.random.Generator) -> list[Shape]:
    """``gen_large_mask`` with ``512train-large``: with probability ``p_irr`` 0.5 line segments, else boxes.

    Segments: 1-4 (``randint(1, 5)``), each from its own uniform start (the original overwrites the chained end
    point with a fresh start), angle ``randint(0, 360)`` *used as radians* (a quirk kept: the 360 integers fall
    all around the circle), length 10-449, width 5-399, end ``(x + l sin a, y + l cos a)``, flat ends.
    Boxes: 1-3, sides 75-449, top-left corner 10 to ``size - 10 - side - 1``; with equal odds square-cornered,
    or rounded with radius 0-59, where the original passes corners ``(x0, y0), (x0 + w, y0 + w)``: a square of
    side w + 1 (PIL includes both corners) whatever the drawn height -- a second quirk kept.
    """
    shapes: list[Shape] = []
    if rng.random() < 0.5:
        for _ in range(rng.integers(1, 5)):
            y, x = int(rng.integers(0, height)), int(rng.integers(0, width))
            angle, length, stroke_width = rng.integers(0, 360), rng.integers(10, 450), rng.integers(5, 400)
            end = (x + length * math.sin(angle), y + length * math.cos(angle))
            shapes.append(Stroke(((x, y), end), (int(stroke_width),), round_caps=False))
        return shapes
    for _ in range(rng.integers(1, 4)):
        box_height, box_width = int(rng.integers(75, 450)), int(rng.integers(75, 450))
        left = int(rng.integers(10, width - 10 - box_width))
        top = int(rng.integers(10, height - 10 - box_height))
        if rng.random() < 0.5:
            shapes.append(Box(left, top, box_width, box_height))
        else:
            radius = int(rng.integers(0, 60))
            shapes.append(Box(left, top, box_width + 1, box_width + 1, radius))
    return shapes


def _plan_lama_strokes(p: LamaStrokes, height: int, width: int, rng: np.random.Generator) -> list[Shape]:
    """``make_random_irregular_mask`` as ``RandomIrregularMaskGenerator`` calls it.

    The generator passes ``max_times + 1`` on and the function draws ``randint(min_times, max_times + 1)``, so
    a mask has ``min_times`` to ``max_times + 1`` strokes (thick 1-6, medium 4-11, thin 4-71). A stroke starts
    at a uniform pixel and has 1-5 segments; each segment has angle ``0.01 + randint(max_angle)`` radians,
    replaced by ``2 * 3.1415926 - angle`` on even strokes, length ``10 + randint(max_len)``, width
    ``5 + randint(max_width)``; its end is truncated toward zero and clipped to [0, size] (the next start).
    """
    shapes: list[Shape] = []
    for i in range(rng.integers(p.min_times, p.max_times + 2)):
        x, y = int(rng.integers(width)), int(rng.integers(height))
        vertices, widths = [(x, y)], []
        for _ in range(1 + rng.integers(5)):
            angle = 0.01 + rng.integers(p.max_angle)
            if i % 2 == 0:
                angle = 2 * 3.1415926 - angle
            length = 10 + int(rng.integers(p.max_len))
            widths.append(5 + int(rng.integers(p.max_width)))
            x = min(max(int(x + length * math.sin(angle)), 0), width)
            y = min(max(int(y + length * math.cos(angle)), 0), height)
            vertices.append((x, y))
        shapes.append(Stroke(tuple(vertices), tuple(widths), round_caps=True))
    return shapes


def _plan_lama_boxes(p: LamaBoxes, height: int, width: int, rng: np.random.Generator) -> list[Shape]:
    """``make_random_rectangle_mask`` as ``RandomRectangleMaskGenerator`` calls it: ``min_times`` to
    ``max_times`` boxes; the generator passes ``max_size + 1`` on as the exclusive bound, so sides are
    ``min_size`` to ``max_size`` (at most ``size - 2 * margin``); the corner keeps ``margin`` from every edge."""
    size_bound = min(p.max_size + 1, height - 2 * p.margin, width - 2 * p.margin)
    shapes: list[Shape] = []
    for _ in range(rng.integers(p.min_times, p.max_times + 1)):
        box_width, box_height = (
            int(rng.integers(p.min_size, size_bound)),
            int(rng.integers(p.min_size, size_bound)),
        )
        left = int(rng.integers(p.margin, width - p.margin - box_width + 1))
        top = int(rng.integers(p.margin, height - p.margin - box_height + 1))
        shapes.append(Box(left, top, box_width, box_height))
    return shapes


def rasterize(plan: list[Shape], height: int, width: int) -> np.ndarray:
    """The (height, width) float32 mask of a plan, 1 inside any shape, shapes clipped to the image.

    Shapes are scaled by ``s = min(height, width) / 512``, reference pixel centres onto pixel centres. Boxes and
    flat-ended strokes are drawn with PIL as the SD original draws them (``ImageDraw.line`` of width
    ``round(w * s)``, at least 1; ``rounded_rectangle``). Round-capped segments follow what OpenCV's
    ``cv2.line(thickness=w)`` draws in LaMa: a body filled scanline by scanline with both ends included, which
    covers the pixel centres within ``ceil(w / 2) + 1/2`` of the segment, and end discs of radius
    ``ceil(w / 2)`` (both times s). Measured against OpenCV on 300 masks of each LaMa set, the areas agree to
    0.001 and the fraction of masks over half the image is the same.
    """
    scale = min(height, width) / REFERENCE_SIDE
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    capsules = np.zeros((height, width), dtype=bool)
    for shape in plan:
        if isinstance(shape, Box):
            _draw_box(draw, shape, scale)
            continue
        points = [((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5) for x, y in shape.vertices]
        for start, end, stroke_width in zip(points[:-1], points[1:], shape.widths, strict=True):
            if shape.round_caps:
                cap = scale * ((stroke_width + 1) // 2)
                _fill_capsule(capsules, start, end, cap + scale / 2, cap)
            else:
                draw.line([start, end], fill=1, width=max(1, round(stroke_width * scale)))
    return (np.asarray(image, dtype=bool) | capsules).astype(np.float32)


def _fill_capsule(
    mask: np.ndarray, start: tuple[float, float], end: tuple[float, float], body: float, cap: float
) -> None:
    """Set the pixels of ``mask`` whose centre is within ``body`` of the segment start-end (beside it) or
    within ``cap`` of either end."""
    (ax, ay), (bx, by) = start, end
    left, right = (
        max(0, math.floor(min(ax, bx) - body)),
        min(mask.shape[1], math.ceil(max(ax, bx) + body) + 1),
    )
    top, bottom = (
        max(0, math.floor(min(ay, by) - body)),
        min(mask.shape[0], math.ceil(max(ay, by) + body) + 1),
    )
    if left >= right or top >= bottom:
        return
    # Offsets of the window's pixel centres from the start: (1, w) and (h, 1), broadcast to (h, w).
    xs = np.arange(left, right, dtype=np.float64)[None, :] - ax
    ys = np.arange(top, bottom, dtype=np.float64)[:, None] - ay
    dx, dy = bx - ax, by - ay
    length2 = dx * dx + dy * dy
    # t: the position (0 at start, 1 at end) of each centre's projection onto the segment's line.
    t = (xs * dx + ys * dy) / length2 if length2 > 0 else np.zeros((1, 1))
    beside = (t > 0) & (t < 1)
    t = np.clip(t, 0, 1)
    distance2 = (xs - t * dx) ** 2 + (ys - t * dy) ** 2  # to the nearest point of the segment
    mask[top:bottom, left:right] |= distance2 <= np.where(beside, body**2, cap**2) + 1e-9


def _draw_box(draw: ImageDraw.ImageDraw, box: Box, scale: float) -> None:
    left, top = round(box.left * scale), round(box.top * scale)
    right = max(left, round((box.left + box.width) * scale) - 1)  # PIL's corners are inclusive
    bottom = max(top, round((box.top + box.height) * scale) - 1)
    draw.rounded_rectangle([left, top, right, bottom], radius=round(box.radius * scale), fill=1)


def draw_mask(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One random (height, width) float32 mask of ``kind`` (one of :data:`MASK_KINDS`), values in {0, 1}."""
    return rasterize(plan_mask(kind, height, width, rng), height, width)


def draw_eval_mask(
    kind: str,
    height: int,
    width: int,
    rng: np.random.Generator,
    candidates: int = 5,
    max_area: float = 0.5,
) -> np.ndarray | None:
    """LaMa's evaluation mask for a square image (``gen_mask_dataset.py``, ``variants_n`` 5,
    ``max_tamper_area`` 0.5): draw ``candidates`` masks, drop those whose mean exceeds ``max_area``, keep one
    of the rest uniformly; None when none is left (LaMa then tries again, see :func:`draw_eval_crop`). LaMa
    draws on the resized image (shorter side 512) and crops each candidate to a square before the area check
    (:func:`draw_eval_crop`); for a square image the crop is the whole image."""
    _check_eval(kind, candidates, max_area)
    drawn = [draw_mask(kind, height, width, rng) for _ in range(candidates)]
    chosen = _keep_one(drawn, max_area, rng)
    return None if chosen is None else drawn[chosen]


@dataclass(frozen=True)
class EvalCrop:
    """An evaluation mask (side, side) and the top-left corner of its square in the image it was drawn on."""

    mask: np.ndarray
    top: int
    left: int


def square_crop(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of LaMa's random square crop of a (height, width) mask (``propose_random_square_crop`` in
    ``saicinpainting/evaluation/masks/mask.py``, with the evaluation configs' ``crop_min_overlap`` 1).

    The side is the shorter one. Along the longer side ``L``, with ``e`` the last row or column the mask
    covers (values > 0.5), the start is uniform over the integers ``[low, high)`` with ``low = max(0, min(L -
    side - 1, e - side))`` and ``high = max(low + 1, min(L - side, e))``: windows near the mask's far end (the
    first one, ``e - side``, stops just short of ``e``, a quirk kept). A square mask is its own crop (LaMa
    draws a 0 there, we draw nothing); so is an empty one (LaMa fails on it and tries again)."""
    height, width = mask.shape
    covered = mask > 0.5
    along = covered.any(axis=0) if height < width else covered.any(axis=1)
    if height == width or not along.any():
        return 0, 0
    side, length, end = min(height, width), max(height, width), int(np.flatnonzero(along)[-1])
    low = max(0, min(length - side - 1, end - side))
    start = int(rng.integers(low, max(low + 1, min(length - side, end))))
    return (0, start) if height < width else (start, 0)


def draw_eval_crop(
    kind: str,
    height: int,
    width: int,
    rng: np.random.Generator,
    candidates: int = 5,
    max_area: float = 0.5,
) -> EvalCrop | None:
    """One try of LaMa's evaluation mask on a (height, width) image (``gen_mask_dataset.py`` with
    ``out_square_crop``): draw ``candidates`` masks on the whole image, crop each to its :func:`square_crop`,
    drop the crops whose mean exceeds ``max_area`` (and empty ones, which LaMa means to drop too), keep one of
    the rest uniformly; None when none is left, where LaMa tries again with fresh draws (up to 10 times, then
    gives up on the run). For a square image the mask and its draws are those of :func:`draw_eval_mask`."""
    _check_eval(kind, candidates, max_area)
    drawn = [draw_mask(kind, height, width, rng) for _ in range(candidates)]
    corners = [square_crop(mask, rng) for mask in drawn]
    side = min(height, width)
    crops = [
        mask[top : top + side, left : left + side] for mask, (top, left) in zip(drawn, corners, strict=True)
    ]
    chosen = _keep_one(crops, max_area, rng)
    return None if chosen is None else EvalCrop(crops[chosen], *corners[chosen])


def _check_eval(kind: str, candidates: int, max_area: float) -> None:
    _check_kind(kind)
    if candidates < 1 or not 0 < max_area <= 1:
        raise MaskError(
            f"expected candidates >= 1 and 0 < max_area <= 1, found candidates={candidates}, max_area={max_area}"
        )


def _keep_one(masks: list[np.ndarray], max_area: float, rng: np.random.Generator) -> int | None:
    """The index of one of the masks that cover something and at most ``max_area``, uniformly; None if none."""
    kept = [index for index, mask in enumerate(masks) if 0 < mask.mean() <= max_area]
    return None if not kept else kept[rng.integers(len(kept))]
