"""What the server's tests share: a tiny random checkpoint, the app around it (loaded by the ``serve`` command's
own loading code), images as base64, and a real uvicorn server on 127.0.0.1 for the tests that need sockets."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from ldm_inpaint.config import load_config
from ldm_inpaint.random_weights import random_checkpoint
from ldm_inpaint.serving.app import ServerSettings, create_app, in_background
from ldm_inpaint.serving.cli import build_parser, load

from .conftest import TINY_CONFIGS

CONFIG = TINY_CONFIGS["v1"]


def tiny_checkpoint(folder: Path) -> Path:
    path = folder / "tiny-v1.ckpt"
    torch.save({"state_dict": random_checkpoint(load_config(CONFIG), seed=9)}, path)
    return path


def model_loader(checkpoint: Path, *flags: str) -> Callable:
    """The worker's loading function for ``ldm-inpaint serve --ckpt CHECKPOINT --config TINY FLAGS``."""
    args = build_parser().parse_args(["--ckpt", str(checkpoint), "--config", str(CONFIG), *flags])
    return lambda: load(args)


def make_app(checkpoint: Path, **settings: object) -> FastAPI:
    return create_app(model_loader(checkpoint), ServerSettings(**settings))


def wait_until(condition: Callable[[], bool], timeout: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.01)


@contextmanager
def ready_client(app: FastAPI, **headers: str) -> Iterator[TestClient]:
    with TestClient(app, headers=headers) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, what="readiness")
        yield client


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def pixels(encoded: str) -> np.ndarray:
    """The pixels of a base64 PNG or a PNG data URI."""
    payload = encoded.split(",", 1)[1] if encoded.startswith("data:") else encoded
    with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
        return np.array(image)


def image_and_mask(folder: Path, size: tuple[int, int] = (64, 48)) -> tuple[Path, Path]:
    """A random RGB image and a rectangular mask, written as PNG files."""
    rng = np.random.RandomState(0)
    image = folder / "photo.png"
    Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(image)
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[10:30, 20:40] = 255
    Image.fromarray(mask).save(folder / "photo_mask.png")
    return image, folder / "photo_mask.png"


def file_base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def live_server(app: FastAPI):
    """``app`` on uvicorn at 127.0.0.1 on a free port, in a thread; yields its base URL, stops it after."""
    return in_background(app)
