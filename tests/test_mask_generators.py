"""Random mask generators against the published parameters (pesser/stable-diffusion ``synthetic_mask.py``
``512train-large``; LaMa ``masks.py`` with ``random_{thick,medium,thin}_512.yaml``), written out here as numbers.

Statistical checks draw a few thousand plans (no raster) with fixed keys, so they are deterministic; each mean
may stray Z = 4 standard errors from the published distribution's (two-sided p < 1e-4 for a correct generator).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest

from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.mask_generators import (
    MASK_KINDS,
    Box,
    MaskError,
    Stroke,
    draw_eval_mask,
    draw_mask,
    keyed_rng,
    plan_mask,
    rasterize,
    reference_size,
)

Z = 4.0


def assert_mean(values: list[float], expected: float, sd: float) -> None:
    """The sample mean is within Z standard errors of ``expected`` (``sd``: one draw's standard deviation)."""
    tolerance = Z * sd / math.sqrt(len(values))
    assert abs(np.mean(values) - expected) <= tolerance, (np.mean(values), expected, tolerance)


def assert_uniform_ints(values: list[int], low: int, high: int) -> None:
    """Integers uniform on [low, high]: both ends reached, nothing outside, the uniform mean."""
    assert min(values) == low and max(values) == high
    assert_mean(values, (low + high) / 2, math.sqrt(((high - low + 1) ** 2 - 1) / 12))


def circular_distance(a: float, b: float) -> float:
    d = (a - b) % (2 * math.pi)
    return min(d, 2 * math.pi - d)


def assert_fraction(flags: list[bool], p: float) -> None:
    assert_mean([float(f) for f in flags], p, math.sqrt(p * (1 - p)))


@cache
def plans(kind: str, n: int) -> tuple[list[Stroke | Box], ...]:
    return tuple(plan_mask(kind, 512, 512, keyed_rng(11, 0, i)) for i in range(n))


def test_a_key_gives_one_mask_and_other_keys_others() -> None:
    for kind in MASK_KINDS:
        first = draw_mask(kind, 64, 64, keyed_rng(7, 3, 2))
        assert np.array_equal(first, draw_mask(kind, 64, 64, keyed_rng(7, 3, 2)))
        assert plan_mask(kind, 64, 64, keyed_rng(7, 3, 2)) == plan_mask(kind, 64, 64, keyed_rng(7, 3, 2))
        others = [
            plan_mask(kind, 64, 64, keyed_rng(*key)) for key in [(8, 3, 2), (7, 4, 2), (7, 3, 3), (2, 3, 7)]
        ]
        assert all(other != plan_mask(kind, 64, 64, keyed_rng(7, 3, 2)) for other in others)


def test_errors_name_what_is_allowed() -> None:
    rng = keyed_rng(0, 0, 0)
    message = "mask kind must be one of sd-large, lama-thick, lama-medium, lama-thin; found 'lama-wide'"
    for call in (draw_mask, plan_mask, draw_eval_mask):
        with pytest.raises(MaskError, match=message):
            call("lama-wide", 64, 64, rng)
    assert issubclass(MaskError, LdmInpaintError)
    with pytest.raises(MaskError, match=r"three integers >= 0 \(seed, step, index\), found \(1, -2, 0\)"):
        keyed_rng(1, -2, 0)
    with pytest.raises(MaskError, match="at least 1 pixel, found 0 x 64"):
        draw_mask("sd-large", 0, 64, rng)
    with pytest.raises(MaskError, match="found candidates=0, max_area=0.5"):
        draw_eval_mask("lama-thin", 64, 64, rng, candidates=0)


def test_reference_canvas_has_a_512_short_side() -> None:
    assert reference_size(512, 512) == reference_size(64, 64) == (512, 512)
    assert reference_size(32, 48) == (512, 768)
    assert reference_size(683, 512) == (683, 512)  # a Places image resized as LaMa does is its own reference


def test_sd_large_plans_follow_512train_large() -> None:
    drawn = plans("sd-large", 4000)
    is_strokes = [isinstance(plan[0], Stroke) for plan in drawn]
    assert_fraction(is_strokes, 0.5)  # p_irr
    stroke_plans = [plan for plan, strokes in zip(drawn, is_strokes, strict=True) if strokes]
    box_plans = [plan for plan, strokes in zip(drawn, is_strokes, strict=True) if not strokes]
    assert_uniform_ints([len(plan) for plan in stroke_plans], 1, 4)  # randint(1, 5)
    assert_uniform_ints([len(plan) for plan in box_plans], 1, 3)  # randint(1, 4)

    strokes = [stroke for plan in stroke_plans for stroke in plan]
    assert all(len(s.vertices) == 2 and not s.round_caps for s in strokes)  # independent single segments
    assert_uniform_ints([s.widths[0] for s in strokes], 5, 399)
    starts = [s.vertices[0] for s in strokes]
    assert_uniform_ints([int(x) for x, _ in starts], 0, 511)
    assert_uniform_ints([int(y) for _, y in starts], 0, 511)
    deltas = [(s.vertices[1][0] - s.vertices[0][0], s.vertices[1][1] - s.vertices[0][1]) for s in strokes]
    lengths = [math.hypot(dx, dy) for dx, dy in deltas]
    assert all(abs(length - round(length)) < 1e-9 for length in lengths)
    assert_uniform_ints([round(length) for length in lengths], 10, 449)
    # The angle is an integer 0-359 taken as radians: x advances by l sin(a), y by l cos(a).
    for dx, dy in deltas:
        assert min(circular_distance(math.atan2(dx, dy), k) for k in range(360)) < 1e-9

    boxes = [box for plan in box_plans for box in plan]
    rounded = [box for box in boxes if box.radius > 0]
    assert_fraction([box.radius > 0 for box in boxes], 0.5 * 59 / 60)  # rounded half the time, radius 0-59
    assert max(box.radius for box in boxes) == 59
    assert all(box.width == box.height for box in rounded)  # the original's (x0 + w, y0 + w) corner
    assert all(76 <= box.width <= 450 for box in rounded)  # side w + 1: PIL includes both corners
    assert any(box.top + box.height > 512 for box in rounded)  # so it may run past the bottom edge
    assert min(box.left for box in boxes) == 10 and max(box.left for box in boxes) <= 512 - 10 - 75 - 1
    square = [box for box in boxes if box.radius == 0 and box.width != box.height]
    assert all(75 <= side <= 449 for box in square for side in (box.width, box.height))
    assert all(
        box.left + box.width <= 501 and box.top + box.height <= 501 for box in square
    )  # randint(marg, W - marg - w)


LAMA = {  # strokes (min_times, max_times, max_width, max_len), boxes (min_times, max_times, min, max, margin)
    "lama-thick": ((1, 5, 250, 450), (1, 4, 30, 300, 10)),
    "lama-medium": ((4, 10, 100, 200), (1, 5, 30, 150, 0)),
    "lama-thin": ((4, 70, 20, 100), None),
}


@pytest.mark.parametrize("kind", sorted(LAMA))
def test_lama_plans_follow_the_data_gen_configs(kind: str) -> None:
    (min_times, max_times, max_width, max_len), box_params = LAMA[kind]
    drawn = plans(kind, 1500 if kind == "lama-thin" else 4000)
    is_boxes = [isinstance(plan[0], Box) for plan in drawn]
    if box_params is None:
        assert not any(is_boxes)
    else:
        assert_fraction(is_boxes, 0.3 / 1.3)  # MixedMaskGenerator: irregular_proba 1, box_proba 0.3
    stroke_plans = [plan for plan, boxes in zip(drawn, is_boxes, strict=True) if not boxes]
    # RandomIrregularMaskGenerator hands max_times + 1 to randint(min_times, max_times + 1).
    assert_uniform_ints([len(plan) for plan in stroke_plans], min_times, max_times + 1)
    strokes = [stroke for plan in stroke_plans for stroke in plan]
    assert all(stroke.round_caps for stroke in strokes)
    assert_uniform_ints([len(stroke.widths) for stroke in strokes], 1, 5)  # 1 + randint(5) segments
    assert_uniform_ints([w for stroke in strokes for w in stroke.widths], 5, max_width + 4)
    assert_uniform_ints([int(stroke.vertices[0][0]) for stroke in strokes], 0, 511)
    assert all(0 <= v <= 512 for stroke in strokes for vertex in stroke.vertices for v in vertex)
    for plan in stroke_plans[:300]:
        for i, stroke in enumerate(plan):
            for (x0, y0), (x1, y1) in zip(stroke.vertices[:-1], stroke.vertices[1:], strict=True):
                if not (0 < x1 < 512 and 0 < y1 < 512) or math.hypot(x1 - x0, y1 - y0) < 20:
                    continue  # clipped, or too short for its direction to survive truncation to pixels
                assert math.hypot(x1 - x0, y1 - y0) <= 10 + max_len - 1 + math.sqrt(
                    2
                )  # ends truncated to pixels
                # 0.01 + k radians, or 2 pi minus that on even strokes; truncation moves it by < atan(1.5 / 20).
                allowed = [(2 * math.pi - 0.01 - k if i % 2 == 0 else 0.01 + k) for k in range(4)]
                assert min(circular_distance(math.atan2(x1 - x0, y1 - y0), a) for a in allowed) < 0.08

    if box_params is not None:
        min_boxes, max_boxes, min_side, max_side, margin = box_params
        box_plans = [plan for plan, boxes in zip(drawn, is_boxes, strict=True) if boxes]
        assert_uniform_ints([len(plan) for plan in box_plans], min_boxes, max_boxes)
        boxes = [box for plan in box_plans for box in plan]
        assert_uniform_ints([box.width for box in boxes], min_side, max_side)
        assert_uniform_ints([box.height for box in boxes], min_side, max_side)
        assert all(box.radius == 0 for box in boxes)
        assert all(box.left >= margin and box.left + box.width <= 512 - margin for box in boxes)
        assert max(box.left + box.width for box in boxes) == 512 - margin


# (start, end, thickness, pixels cv2.line sets) from opencv-python-headless 5 on a 512 x 512 canvas.
OPENCV_LINES = [
    ((100, 256), (400, 256), 5, 2129),
    ((100, 100), (400, 300), 5, 2529),
    ((300, 50), (330, 470), 5, 2939),
    ((100, 256), (400, 256), 20, 6617),
    ((100, 100), (400, 300), 20, 8017),
    ((300, 50), (330, 470), 20, 9169),
    ((100, 100), (400, 300), 51, 21223),
    ((256, 256), (256, 256), 24, 441),
    ((-40, 200), (300, 600), 250, 86629),
    ((0, 0), (512, 512), 100, 68104),
]


def test_round_strokes_cover_what_opencv_covers() -> None:
    counts = [
        (rasterize([Stroke((a, b), (w,), round_caps=True)], 512, 512).sum(), opencv)
        for a, b, w, opencv in OPENCV_LINES
    ]
    assert all(abs(ours / opencv - 1) < 0.03 for ours, opencv in counts), counts
    assert abs(sum(ours for ours, _ in counts) / sum(opencv for _, opencv in counts) - 1) < 0.003
    assert sum(ours == opencv for ours, opencv in counts) >= 4, counts  # axis lines and a lone disc: exact


def test_flat_strokes_and_boxes_rasterize_to_their_pixels() -> None:
    flat = rasterize([Stroke(((100, 256), (400, 256)), (20,), round_caps=False)], 512, 512)
    rows, cols = np.nonzero(flat)
    assert flat.sum() == 20 * 301 and (rows.min(), rows.max(), cols.min(), cols.max()) == (247, 266, 100, 400)
    box = rasterize([Box(10, 20, 30, 40)], 512, 512)
    expected = np.zeros((512, 512), np.float32)
    expected[20:60, 10:40] = 1
    assert np.array_equal(box, expected)
    rounded = rasterize([Box(10, 20, 100, 100, radius=30)], 512, 512)
    assert rounded[20:120, 10:110].sum() == rounded.sum() and rounded[70, 10] == 1 and rounded[20, 10] == 0
    assert abs(rounded.sum() - (100 * 100 - (4 - math.pi) * 30**2)) < 50  # corners lose (4 - pi) r^2
    small = rasterize([Box(16, 24, 40, 48)], 64, 64)  # scale 1/8
    assert small.sum() == 5 * 6 and small[3:9, 2:7].all()


# Mean mask area at 512 x 512 over 2,000 masks and its standard deviation (measured with this module; LaMa's
# OpenCV raster of the same plans agrees to 0.001).
AREAS = {"sd-large": (0.331, 0.205), "lama-thick": (0.454, 0.252), "lama-medium": (0.304, 0.160)}
AREAS["lama-thin"] = (0.290, 0.138)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks_at_512_and_64(kind: str) -> None:
    masks = [draw_mask(kind, 512, 512, keyed_rng(21, 0, i)) for i in range(200)]
    assert all(m.dtype == np.float32 and m.shape == (512, 512) for m in masks)
    assert all(((m == 0) | (m == 1)).all() for m in masks) and all(0 < m.mean() < 1 for m in masks)
    mean, sd = AREAS[kind]
    assert_mean([m.mean() for m in masks], mean, sd)
    # The same plans drawn at 1/8 scale keep their areas and shapes: 8 x 8 majority pooling of a 512 mask against
    # its 64 px twin. Measured on these keys: area differences below 0.02 (mean 0.002), IoU 0.96-0.995 on average
    # (SD's lowest: its 1-2 px wide segments at 64 px round to whole pixels).
    areas, ious = [], []
    for i, large in enumerate(masks):
        small = draw_mask(kind, 64, 64, keyed_rng(21, 0, i))
        assert small.shape == (64, 64)
        areas.append(small.mean() - large.mean())
        pooled = large.reshape(64, 8, 64, 8).mean(axis=(1, 3)) > 0.5
        if large.mean() > 0.05:
            ious.append((pooled & (small > 0)).sum() / (pooled | (small > 0)).sum())
    assert max(map(abs, areas)) < 0.03 and abs(np.mean(areas)) < 0.005
    assert np.mean(ious) > 0.9 and min(ious) > 0.7
    assert draw_mask(kind, 32, 48, keyed_rng(21, 0, 0)).shape == (32, 48)


@pytest.mark.parametrize("kind", ["lama-thick", "lama-thin"])
def test_eval_masks_keep_one_candidate_of_at_most_half(kind: str) -> None:
    kept = [draw_eval_mask(kind, 512, 512, keyed_rng(5, 0, i)) for i in range(30)]
    assert all(m is None or (m.shape == (512, 512) and m.mean() <= 0.5) for m in kept)
    assert sum(m is None for m in kept) <= 2  # all 5 over half: 0.435^5 = 1.6 % of thick images
    # The kept mask is one of the candidates: replaying the key's draws finds it among them.
    rng = keyed_rng(5, 0, 1)
    candidates = [draw_mask(kind, 512, 512, rng) for _ in range(5)]
    assert any(np.array_equal(kept[1], c) for c in candidates if c.mean() <= 0.5)
    # A bound nothing meets leaves nothing to keep.
    assert draw_eval_mask(kind, 64, 64, keyed_rng(5, 0, 0), max_area=1e-6) is None
