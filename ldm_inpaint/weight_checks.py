"""Strict accounting of weights against a model: every parameter present with its shape, as dense floating
point data, and nothing else, with errors that name the first offending keys."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ldm_inpaint.config import ModelConfig
from ldm_inpaint.errors import CheckpointError


def preview_keys(keys: list[str], count: int = 5) -> str:
    """The first ``count`` keys, comma-separated, with "..." when there are more."""
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


def describe_keys(keys: list[str], what: str) -> str:
    return f"{len(keys)} {what} ({preview_keys(keys)})"


def _not_weights(weights: Mapping[str, Tensor]) -> list[str]:
    """Tensors that cannot be weights: not floating point (int64, complex64, bool), not dense (sparse), or
    without data (the meta device)."""
    return [
        f"{key} ({str(value.dtype).removeprefix('torch.')}, {str(value.layout).removeprefix('torch.')}, "
        f"{value.device.type})"
        for key, value in weights.items()
        if value.layout != torch.strided or value.device.type == "meta" or not value.is_floating_point()
    ]


def check_weights(model: torch.nn.Module, weights: Mapping[str, Tensor], config: ModelConfig) -> None:
    """Every parameter present with its shape, as dense floating-point data, and nothing else; otherwise one
    error naming the first keys."""
    bad = _not_weights(weights)
    if bad:
        raise CheckpointError(
            f"expected dense floating-point weights on a real device, found {describe_keys(bad, 'other tensors')}: "
            "the file is damaged or not a model checkpoint"
        )
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    mis_shaped = [
        f"{key} {tuple(weights[key].shape)} vs {shape}"
        for key, shape in expected.items()
        if key in weights and tuple(weights[key].shape) != shape
    ]
    problems = [
        describe_keys(found, what)
        for found, what in ((missing, "missing"), (unexpected, "unexpected"), (mis_shaped, "mis-shaped"))
        if found
    ]
    if problems:
        raise CheckpointError(
            f"checkpoint does not match config {config.name!r} ({len(expected)} weights expected, "
            f"{len(weights)} found): " + "; ".join(problems)
        )
