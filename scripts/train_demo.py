"""Retrain the demo model (``ldm-inpaint --ckpt demo``, ``ldm-inpaint demo``) from scratch, offline, on the
photos that ship inside scikit-image, and report how well it inpaints photos it never saw.

    pip install -e ".[test]"          # scikit-image is in the test extra
    python scripts/train_demo.py --work demo-work

Phases (each skipped when its output exists, so an interrupted run continues):
1. crops: random 64x64 crops of the training photos at four scales; three photos are held out;
2. ``ldm-inpaint train --stage autoencoder`` (L1 + KL) on them, from scratch;
3. the scale factor 1 / std of the latents (as the LDM paper sets it) written into the config;
4. ``ldm-inpaint train`` of the 9-channel UNet with that autoencoder and a random, frozen text encoder;
5. export: the EMA weights, fp16, pruned, into ``ldm_inpaint/demo/demo.safetensors`` with ``demo.yaml``;
6. report: mean absolute error inside LaMa-thick masks on crops of the held-out photos for the trained model,
   the same model untrained (its UNet at initialisation), the mean color of the known pixels and a blur fill
   (``examples/demo-report.md``, ``examples/demo-report.png``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as photos

from ldm_inpaint.checkpoint import load_model
from ldm_inpaint.cli import main as ldm_inpaint
from ldm_inpaint.mask_generators import draw_eval_mask, keyed_rng

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from demo_report import write_report  # noqa: E402 - a sibling script

TRAIN_PHOTOS = (
    "astronaut", "camera", "brick", "grass", "gravel", "clock", "coins", "moon", "hubble_deep_field",
    "immunohistochemistry", "retina", "cell", "motorcycle_left", "motorcycle_right",
)  # fmt: skip
HELD_OUT = ("chelsea", "coffee", "rocket")
SIDE = 64
SCALES = (64, 96, 128, 192)
CROPS_PER_SCALE = 24
DEMO_DIR = REPO / "ldm_inpaint" / "demo"


def photo(name: str) -> Image.Image:
    """A skimage.data photo as an RGB image (the motorcycle pair is one function)."""
    if name.startswith("motorcycle_"):
        left, right, _ = photos.stereo_motorcycle()
        array = left if name.endswith("left") else right
    else:
        array = getattr(photos, name)()
    return Image.fromarray(array).convert("RGB")


def random_crops(
    image: Image.Image, scales: tuple[int, ...], count: int, rng: np.random.Generator
) -> list[Image.Image]:
    """``count`` random SIDE x SIDE crops at each scale (the photo's short side resized to it)."""
    crops = []
    for short in scales:
        factor = short / min(image.size)
        resized = image.resize((round(image.width * factor), round(image.height * factor)), Image.BICUBIC)
        for _ in range(count):
            left = int(rng.integers(0, resized.width - SIDE + 1))
            top = int(rng.integers(0, resized.height - SIDE + 1))
            crops.append(resized.crop((left, top, left + SIDE, top + SIDE)))
    return crops


def make_crops(folder: Path, names: tuple[str, ...], scales: tuple[int, ...], count: int, seed: int) -> None:
    folder.mkdir(parents=True)
    for number, name in enumerate(names):
        rng = np.random.default_rng([seed, number])
        for i, crop in enumerate(random_crops(photo(name), scales, count, rng)):
            crop.save(folder / f"{name}-{i:03d}.png")


def write_demo_input(folder: Path, seed: int) -> None:
    """``input.png``: a 128 x 128 crop of a held-out photo (the cat of ``chelsea``); ``mask.png``: a LaMa-thick
    evaluation mask for it."""
    cat = photo("chelsea")
    cat = cat.resize((round(cat.width * 128 / cat.height), 128), Image.BICUBIC)
    cat.crop((60, 0, 188, 128)).save(folder / "input.png")
    mask = draw_eval_mask("lama-thick", 128, 128, keyed_rng(seed, 1, 0))
    Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "mask.png")


def run(*args: object) -> None:
    status = ldm_inpaint([str(arg) for arg in args])
    if status:
        raise SystemExit(
            f"train_demo: step failed with status {status}: ldm-inpaint {' '.join(map(str, args))}"
        )


@torch.no_grad()
def latent_std(checkpoint: Path, config: Path, crops: Path) -> float:
    """The standard deviation of the posterior means of every training crop."""
    vae = load_model(checkpoint, config).model.first_stage_model
    images = [
        torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 127.5 - 1
        for p in sorted(crops.glob("*.png"))
    ]
    means = [vae.encode(torch.stack(images[i : i + 64])).mean for i in range(0, len(images), 64)]
    return torch.cat(means).std().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the crops and the two runs")
    parser.add_argument("--autoencoder-steps", type=int, default=2000)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.work
    crops, held_out = work / "crops", work / "held-out"
    if not crops.exists():
        make_crops(crops, TRAIN_PHOTOS, SCALES, CROPS_PER_SCALE, args.seed)
        make_crops(held_out, HELD_OUT, (64, 96, 128), 4, args.seed + 1)
    base = (REPO / "scripts" / "demo-base.yaml").read_text()
    ae_config = work / "autoencoder.yaml"
    if not ae_config.exists():
        ae_config.write_text(base.replace("SCALE_FACTOR", "1.0"))
    ae_run, unet_run = work / "autoencoder", work / "unet"
    common = [
        "--data",
        crops,
        "--resolution",
        SIDE,
        "--seed",
        args.seed,
        "--device",
        "cpu",
        "--p-drop-text",
        0,
    ]
    if not (ae_run / "last.ckpt").exists():
        run("train", "--stage", "autoencoder", "--config", ae_config, "--out", ae_run, "--steps", args.autoencoder_steps,
            "--batch-size", 16, "--lr", 1e-3, "--warmup", 100, "--save-every", 500, "--sample-every", 500, *common)  # fmt: skip
    config = work / "demo.yaml"
    if not config.exists():
        scale = 1.0 / latent_std(ae_run / "last.ckpt", ae_config, crops)
        config.write_text(base.replace("SCALE_FACTOR", f"{scale:.5f}"))
    if not (unet_run / "last.ckpt").exists():
        run("train", "--ckpt", ae_run / "last.ckpt", "--config", config, "--out", unet_run, "--steps", args.unet_steps,
            "--batch-size", 16, "--lr", 5e-4, "--warmup", 200, "--ema-decay", 0.999, "--save-every", 1000,
            "--sample-every", 1000, "--masks", "lama-thick", *common)  # fmt: skip
    shipped = DEMO_DIR / "demo.safetensors"
    if not shipped.exists():
        run(
            "convert",
            unet_run / "last.ckpt",
            shipped,
            "--ema",
            "--prune",
            "--dtype",
            "fp16",
            "--config",
            config,
        )
        (DEMO_DIR / "demo.yaml").write_text(config.read_text())
    write_report(shipped, ae_run / "last.ckpt", config, held_out, REPO / "examples", args.seed)


if __name__ == "__main__":
    main()
