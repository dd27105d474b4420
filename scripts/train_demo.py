"""Retrain the demo model (``ldm-inpaint --ckpt demo``, ``ldm-inpaint demo``) from scratch, offline, on the
photos that ship inside scikit-image, and report how well it inpaints photos it never saw.

    pip install -e ".[test]"          # scikit-image is in the test extra
    python scripts/train_demo.py --work demo-work

Phases (each skipped when its output exists, so an interrupted run continues):
1. crops: 8000 random 64x64 crops of the training photos at random scales, mirrored, turned and recolored at
   random; three photos are held out;
2. ``ldm-inpaint train --stage autoencoder`` (L1 + KL) on them, from scratch;
3. the scale factor 1 / std of the latents (as the LDM paper sets it) written into the config;
4. ``ldm-inpaint train`` of the 9-channel UNet with that autoencoder and a random, frozen text encoder;
5. export: the EMA weights, fp16, pruned, into ``ldm_inpaint/demo/demo.safetensors`` with ``demo.yaml``, and
   ``input.png`` / ``mask.png`` for ``ldm-inpaint demo`` (a crop of a held-out photo, a LaMa-thick mask);
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
    "immunohistochemistry", "retina", "cell", "colorwheel", "motorcycle_left", "motorcycle_right",
)  # fmt: skip
HELD_OUT = ("chelsea", "coffee", "rocket")
SIDE = 64
TRAIN_CROPS = 8000
HELD_OUT_SCALES = (64, 96, 128)
HELD_OUT_PER_SCALE = 4
# A training crop's photo is resized to a short side log-uniform in this range, near the held-out scales
# (64-384, mostly zoomed-in textures, gave 0.168 held out instead of 0.161).
SHORT_SIDE = (64, 192)
DEMO_DIR = REPO / "ldm_inpaint" / "demo"


def photo(name: str) -> Image.Image:
    """A skimage.data photo as an RGB image (the motorcycle pair is one function)."""
    if name.startswith("motorcycle_"):
        left, right, _ = photos.stereo_motorcycle()
        array = left if name.endswith("left") else right
    else:
        array = getattr(photos, name)()
    return Image.fromarray(array).convert("RGB")


def crop_at(image: Image.Image, short: float, rng: np.random.Generator) -> Image.Image:
    """A random SIDE x SIDE crop of ``image`` resized so that its short side is ``short``: only the crop's box
    of the photo is resampled."""
    box = SIDE * min(image.size) / short
    left = rng.uniform(0, image.width - box)
    top = rng.uniform(0, image.height - box)
    return image.resize((SIDE, SIDE), Image.BICUBIC, box=(left, top, left + box, top + box))


def augmented(crop: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The crop mirrored, turned by a multiple of 90 degrees, its hue rotated and its saturation scaled at
    random: fifteen photos, most of them grey, then cover the colors of photos the model never saw."""
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = crop.rotate(90 * int(rng.integers(4)))
    hue, saturation, value = (np.asarray(c, dtype=np.float64) for c in crop.convert("HSV").split())
    hue = (hue + rng.uniform(0, 256)) % 256
    saturation = np.clip(saturation * rng.uniform(0.5, 1.5), 0, 255)
    bands = [Image.fromarray(np.round(c).astype(np.uint8)) for c in (hue, saturation, value)]
    return Image.merge("HSV", bands).convert("RGB")


def make_training_crops(folder: Path, count: int, seed: int) -> None:
    """``count`` augmented crops of the training photos at random scales, named in a random order of photos
    (so the first files, the trainer's validation samples, show several photos)."""
    folder.mkdir(parents=True)
    images = [photo(name) for name in TRAIN_PHOTOS]
    rng = np.random.default_rng([seed, 0xC0])
    for i in range(count):
        which = int(rng.integers(len(images)))
        short = float(np.exp(rng.uniform(*np.log(SHORT_SIDE))))
        crop = augmented(crop_at(images[which], short, rng), rng)
        crop.save(folder / f"{i:05d}-{TRAIN_PHOTOS[which]}.png")


def make_held_out_crops(folder: Path, seed: int) -> None:
    """Plain crops (no augmentation) of the held-out photos at three scales."""
    folder.mkdir(parents=True)
    for number, name in enumerate(HELD_OUT):
        image, rng = photo(name), np.random.default_rng([seed, number])
        for short in HELD_OUT_SCALES:
            for i in range(HELD_OUT_PER_SCALE):
                crop_at(image, short, rng).save(folder / f"{name}-{short}-{i}.png")


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
    """The standard deviation of the posterior means of the first 2048 training crops."""
    vae = load_model(checkpoint, config).model.first_stage_model
    images = [
        torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 127.5 - 1
        for p in sorted(crops.glob("*.png"))[:2048]
    ]
    means = [vae.encode(torch.stack(images[i : i + 64])).mean for i in range(0, len(images), 64)]
    return torch.cat(means).std().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the crops and the two runs")
    parser.add_argument("--autoencoder-steps", type=int, default=3000)
    parser.add_argument("--unet-steps", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.work
    crops, held_out = work / "crops", work / "held-out"
    if not crops.exists():
        make_training_crops(crops, TRAIN_CROPS, args.seed)
        make_held_out_crops(held_out, args.seed + 1)
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
    if not (DEMO_DIR / "input.png").exists():
        write_demo_input(DEMO_DIR, args.seed)
    write_report(shipped, ae_run / "last.ckpt", config, held_out, REPO / "examples", args.seed)


if __name__ == "__main__":
    main()
