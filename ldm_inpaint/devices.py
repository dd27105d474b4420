"""Where the work runs: the precision names the commands take and the device they run on."""

from __future__ import annotations

import torch

from ldm_inpaint.errors import LdmInpaintError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str | None) -> torch.device:
    """The device a command asked for (None: ``cuda`` when available, else ``cpu``), checked to exist."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise LdmInpaintError(f"unknown device {name!r}: expected cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LdmInpaintError(f"device {name!r} asked for, but this torch sees no CUDA GPU: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LdmInpaintError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LdmInpaintError(f"device {name!r} asked for, but MPS is not available: use --device cpu")
    return device
