"""CI: the installed wheel, run from a folder outside the checkout, finds its bundled configs.

Bundled names resolve (and the names checkpoint detection returns), the ``ldm-inpaint`` command inspects and
inpaints a random tiny checkpoint given the bundled tiny config by name, and the server's web page ships. Writes
its files in the working folder.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ldm_inpaint
from ldm_inpaint.checkpoint import detect_config
from ldm_inpaint.config import bundled_config_names, load_config
from ldm_inpaint.random_weights import random_checkpoint

TINY = "tiny/v1-inpainting-tiny"


def main() -> None:
    package = Path(ldm_inpaint.__file__).parent
    if "site-packages" not in package.parts:
        raise SystemExit(f"expected ldm_inpaint from the installed wheel (site-packages), found {package}")
    print(f"ldm_inpaint {package}; bundled configs: {', '.join(bundled_config_names())}")
    print("by name:", load_config("v1-inpainting-inference").name)
    conv_in, to_k = "input_blocks.0.0.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    for in_channels, context_dim in [(9, 768), (9, 1024), (4, 768), (4, 1024)]:
        weights = {
            f"model.diffusion_model.{conv_in}": torch.zeros(320, in_channels, 3, 3),
            f"model.diffusion_model.{to_k}": torch.zeros(320, context_dim),
        }
        print(
            f"detected ({in_channels} channels, context {context_dim}):",
            load_config(detect_config(weights)).name,
        )

    torch.save({"state_dict": random_checkpoint(load_config(TINY), seed=0)}, "tiny.ckpt")
    report = json.loads(
        subprocess.run(
            ["ldm-inpaint", "inspect", "tiny.ckpt", "--config", TINY, "--json"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    if not report["keys"]["ok"]:
        raise SystemExit(f"expected the tiny checkpoint to fit {TINY}, found: {report['keys']['detail']}")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save("photo.png")
    Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)).save("photo_mask.png")
    args = ["--ckpt", "tiny.ckpt", "--config", TINY, "--image", "photo.png", "--mask", "photo_mask.png"]
    subprocess.run(
        ["ldm-inpaint", *args, "--prompt", "a bench", "--steps", "2", "--outdir", "out"], check=True
    )
    written = sorted(path.name for path in Path("out").iterdir())
    if not any(name.endswith(".png") for name in written):
        raise SystemExit(f"expected a PNG in out/, found {written}")
    print("inspect and inpaint with", TINY, "->", written)
    page = [package / "serving" / "static" / name for name in ("index.html", "app.js", "style.css")]
    if not all(path.is_file() for path in page):
        raise SystemExit(f"expected the server's web page in the wheel, found {[p.exists() for p in page]}")
    print("the server's page ships:", ", ".join(path.name for path in page))


if __name__ == "__main__":
    main()
