"""Draw the example image and mask of ``examples/ablation.yaml``: a park bench on grass under a sky, and a
mask over the bench's seat. Deterministic; ``python scripts/make_examples.py`` rewrites the two files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 512
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def bench_scene() -> Image.Image:
    rng = np.random.RandomState(0)
    rows = np.linspace(0.0, 1.0, SIZE)[:, None, None]
    sky = (1 - rows) * np.array([90, 150, 230]) + rows * np.array([200, 225, 250])
    pixels = np.broadcast_to(sky, (SIZE, SIZE, 3)).copy()
    grass = np.array([70, 140, 60]) + rng.randint(-25, 25, (SIZE, SIZE, 3))
    pixels[SIZE * 3 // 5 :] = grass[SIZE * 3 // 5 :]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 120, 200, 300), fill=(40, 110, 45))  # a tree's crown
    draw.rectangle((108, 280, 132, 330), fill=(90, 60, 35))  # its trunk
    wood, dark = (150, 95, 50), (70, 45, 25)
    for y in (250, 272):  # the backrest
        draw.rectangle((220, y, 460, y + 14), fill=wood, outline=dark)
    draw.rectangle((210, 320, 470, 338), fill=wood, outline=dark)  # the seat
    for x in (228, 440):  # legs
        draw.rectangle((x, 338, x + 12, 390), fill=dark)
        draw.rectangle((x, 250, x + 8, 320), fill=dark)
    return image.filter(ImageFilter.SMOOTH)


def seat_mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((200, 290, 480, 350), fill=255)
    return mask


if __name__ == "__main__":
    EXAMPLES.mkdir(exist_ok=True)
    bench_scene().save(EXAMPLES / "bench.png", optimize=True)
    seat_mask().save(EXAMPLES / "bench_mask.png", optimize=True)
    print(EXAMPLES / "bench.png", EXAMPLES / "bench_mask.png")
