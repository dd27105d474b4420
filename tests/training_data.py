"""Small training folders and tiny checkpoints for the trainer's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_inpaint.config import load_config
from ldm_inpaint.random_weights import random_checkpoint
from tests.conftest import CONFIGS, TINY_CONFIGS

TINY_V = CONFIGS / "tiny" / "v2-inference-v-tiny.yaml"


def make_folder(folder: Path, count: int = 5, seed: int = 0) -> Path:
    """``count`` random RGB images of assorted sizes (none square), each with a caption file."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        height, width = 70 + 9 * i, 96 - 5 * i
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo number {i}")
    return folder


def make_checkpoint(path: Path, config: Path = TINY_CONFIGS["v1"], seed: int = 0) -> Path:
    torch.save({"state_dict": random_checkpoint(load_config(config), seed)}, path)
    return path


def train_args(
    ckpt: Path, data: Path, out: Path, config: Path = TINY_CONFIGS["v1"], **changes: object
) -> list[str]:
    """Command-line arguments of a tiny run (64 px, 4 samples per step in 2 micro-batches, no grids)."""
    settings = {
        "ckpt": ckpt,
        "config": config,
        "data": data,
        "out": out,
        "steps": 3,
        "batch-size": 4,
        "grad-accum": 2,
        "lr": 1e-3,
        "resolution": 64,
        "warmup": 2,
        "save-every": 0,
        "sample-every": 0,
        "device": "cpu",
        **changes,
    }
    args = []
    for name, value in settings.items():
        if value is True:
            args.append(f"--{name}")
        elif value is not None:
            args += [f"--{name}", str(value)]
    return args
