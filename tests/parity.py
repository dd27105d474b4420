"""The parity bar shared by every test against an independent implementation, stated once."""

from __future__ import annotations

import torch
from torch import Tensor

# Max abs difference allowed, as a fraction of the reference output's scale (its standard deviation).
PARITY_RTOL = 1e-4
# A random network whose output scale falls outside this range is saturated, dead or exploding: it proves nothing.
ACTIVATION_SCALE_RANGE = (1e-2, 1e2)


def assert_parity(actual: Tensor, expected: Tensor) -> None:
    """``actual`` matches ``expected`` within PARITY_RTOL of its scale, and that scale is of order one."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    actual, expected = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(expected).all() and torch.isfinite(actual).all(), "non-finite values"
    scale = expected.std().item()
    low, high = ACTIVATION_SCALE_RANGE
    assert low < scale < high, f"reference output scale {scale:.3g} is outside {ACTIVATION_SCALE_RANGE}"
    max_diff = (actual - expected).abs().max().item()
    print(f"parity: max abs diff {max_diff:.3g}, reference std {scale:.3g}, ratio {max_diff / scale:.3g}")
    assert max_diff <= PARITY_RTOL * scale, (
        f"max abs difference {max_diff:.3g} exceeds {PARITY_RTOL} x output scale {scale:.3g}"
    )
