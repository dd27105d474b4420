"""Why the demo model's samples do not beat the mean fill: the figures behind the README's demo section, on
the held-out crops and masks of ``scripts/demo_report.py`` (made by ``scripts/train_demo.py``).

    python scripts/demo_diagnostics.py --work demo-work

Prints the mean absolute error inside the mask (0-1) of
- the autoencoder alone (each crop encoded and decoded): the floor of anything the UNet does;
- a blur fill done on the latent grid (the mask dilated to whole latent cells, decoded): what a smooth guess
  costs in this latent space;
- the model's x0 prediction from pure noise (t = 999, one UNet call): its mean guess of the hole, which a
  sample misses by about sqrt(2) times as much (a sample and the truth are two draws around it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm_inpaint import image_io
from ldm_inpaint.conditioning import inpainting_concat
from ldm_inpaint.denoiser import make_denoiser
from ldm_inpaint.mask_generators import draw_eval_mask, keyed_rng
from ldm_inpaint.parameterization import eps_to_x0, noised
from ldm_inpaint.pipeline import InpaintPipeline

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from demo_report import blur_fill, mae_inside  # noqa: E402 - a sibling script

LAST_STEP = 999


@torch.no_grad()
def diagnose(pipe: InpaintPipeline, held_out: Path, seed: int) -> dict[str, float]:
    context = pipe.encode_prompts([""])
    alpha_bar = pipe.alphas_cumprod[LAST_STEP].float()
    errors: dict[str, list[float]] = {"autoencoder": [], "latent blur": [], "x0 at t=999": []}
    for index, path in enumerate(sorted(held_out.glob("*.png"))):
        image = image_io.image_to_tensor(image_io.load_image(path))
        mask = draw_eval_mask("lama-thick", image.shape[-2], image.shape[-1], keyed_rng(seed, 0, index))
        if mask is None:
            continue
        mask = torch.from_numpy(mask)[None, None]
        latent = pipe.encode_image(image)
        cells = F.max_pool2d(mask, pipe.latent_factor)
        concat = inpainting_concat(pipe.encode_image, image, mask, tuple(latent.shape[-2:]))
        denoiser = make_denoiser(
            pipe.unet, context, None, 1.0, concat, pipe.config.parameterization, pipe.alphas_cumprod
        )
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed + index))
        x_t = noised(latent, noise, alpha_bar)
        x0 = eps_to_x0(x_t, denoiser(x_t, torch.tensor([float(LAST_STEP)])), alpha_bar)
        for name, decoded in zip(errors, (latent, blur_fill(latent, cells), x0), strict=True):
            errors[name].append(mae_inside(pipe.decode(decoded), image, mask))
    return {name: float(np.mean(values)) for name, values in errors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="the folder of scripts/train_demo.py")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    held_out = args.work / "held-out"
    if not any(held_out.glob("*.png")):
        raise SystemExit(
            f"demo_diagnostics: no held-out crops in {held_out}; run scripts/train_demo.py first"
        )
    for name, value in diagnose(InpaintPipeline.from_checkpoint("demo"), held_out, args.seed).items():
        print(f"{name}: {value:.4f}")


if __name__ == "__main__":
    main()
