from __future__ import annotations

import pytest
import torch

from ldm_inpaint.masks import blur, bounding_box, grow, to_latent


def square(size: int = 32, top: int = 10, left: int = 12, side: int = 6) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., top : top + side, left : left + side] = 1
    return mask


def test_grow_dilates_by_exactly_n_pixels() -> None:
    grown = grow(square(), 2)
    assert torch.equal(grown, square(top=8, left=10, side=10))
    assert torch.equal(grow(square(), 0), square())


def test_blur_keeps_mass_range_and_symmetry() -> None:
    soft = blur(square(), 1.5)
    assert soft.min() >= 0 and soft.max() <= 1
    assert soft.sum().item() == pytest.approx(36.0, rel=1e-5)  # away from the borders nothing is lost
    centred = blur(square(top=13, left=13), 2.0)  # a centred square stays symmetric under the blur
    assert torch.allclose(centred, centred.flip(-1), atol=1e-6)
    assert torch.allclose(centred, centred.flip(-2), atol=1e-6)
    assert soft[0, 0, 13, 15] > 0.85 and 0 < soft[0, 0, 9, 15] < 0.5
    assert torch.equal(blur(square(), 0), square())


def test_latent_mask_modes() -> None:
    thin = torch.zeros(1, 1, 64, 64)
    thin[..., 3, :] = 1  # a one-pixel stroke that nearest sampling at 1/8 misses
    assert to_latent(thin, (8, 8), "nearest").sum() == 0
    assert torch.equal(to_latent(thin, (8, 8), "max")[0, 0, 0], torch.ones(8))
    assert torch.equal(
        to_latent(square(64, 16, 16, 16), (8, 8), "nearest"), to_latent(square(64, 16, 16, 16), (8, 8), "max")
    )
    with pytest.raises(ValueError, match="'nearest' or 'max', found 'mean'"):
        to_latent(thin, (8, 8), "mean")


def test_bounding_box() -> None:
    mask = torch.zeros(1, 1, 100, 200)
    mask[..., 40:50, 150:160] = 1
    assert bounding_box(mask, padding=10) == (30, 140, 60, 170)
    assert bounding_box(mask, padding=10, min_size=64) == (13, 123, 77, 187)
    assert bounding_box(mask, padding=80, min_size=0) == (0, 70, 100, 200)  # clipped to the image
    assert bounding_box(mask, padding=0, min_size=500) == (0, 0, 100, 200)
    assert bounding_box(torch.zeros(1, 1, 8, 8), padding=3) is None
