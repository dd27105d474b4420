from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "ldm_inpaint" / "configs"
TINY_CONFIGS = {
    "v1": CONFIGS / "tiny" / "v1-inpainting-tiny.yaml",
    "v2": CONFIGS / "tiny" / "v2-inpainting-tiny.yaml",
}
FULL_CONFIGS = {
    "v1": CONFIGS / "v1-inpainting-inference.yaml",
    "v2": CONFIGS / "v2-inpainting-inference.yaml",
}
MANIFESTS = {
    "v1": REPO / "tests" / "data" / "manifests" / "sd15-inpainting.json",
    "v2": REPO / "tests" / "data" / "manifests" / "sd2-inpainting.json",
}


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
