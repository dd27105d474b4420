"""``ldm-inpaint demo``: the bundled demo model inpaints a bundled photo, no download, one command.

The model (``demo.safetensors`` + ``demo.yaml`` here, ``--ckpt demo`` anywhere) is a small latent diffusion
inpainting model trained from scratch on the photos inside scikit-image by ``scripts/train_demo.py``;
``input.png`` and ``mask.png`` are a crop of a photo it never saw and a LaMa-thick mask. Its text encoder is
random (the prompt does not steer it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from PIL import Image

from ldm_inpaint import image_io
from ldm_inpaint.command import EXIT_BAD_INPUT, Parser
from ldm_inpaint.devices import resolve_device
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.files import check_output_folder
from ldm_inpaint.options import InpaintOptions

# How the demo samples (and how scripts/demo_report.py measured it): DDIM 50 steps, eta 0, no guidance.
OPTIONS = InpaintOptions(prompt="", sampler="ddim", steps=50, eta=0.0, guidance_scale=1.0)


def bundled(name: str) -> Path:
    return Path(str(resources.files(__package__) / name))


def side_by_side(images: Sequence[Image.Image], scale: int = 2) -> Image.Image:
    """The images in a row, enlarged ``scale`` times (nearest) so that small ones can be seen."""
    width, height = images[0].size
    row = Image.new("RGB", (len(images) * width * scale, height * scale), "white")
    for i, image in enumerate(images):
        row.paste(
            image.convert("RGB").resize((width * scale, height * scale), Image.NEAREST),
            (i * width * scale, 0),
        )
    return row


def demo_main(argv: Sequence[str]) -> int:
    parser = Parser(prog="ldm-inpaint demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="folder for the result (default demo-output)"
    )
    parser.add_argument("--seed", type=int, default=OPTIONS.seed, help=f"noise seed (default {OPTIONS.seed})")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    try:
        check_output_folder(args.out)
        from ldm_inpaint.pipeline import InpaintPipeline  # the model code, once the arguments are known good

        pipe = InpaintPipeline.from_checkpoint("demo", device=resolve_device(args.device))
        image, mask = image_io.load_image(bundled("input.png")), image_io.load_image(bundled("mask.png"))
        result = pipe(image, mask, OPTIONS, seed=args.seed)
    except LdmInpaintError as error:
        print(f"ldm-inpaint demo: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    row = side_by_side([image, mask, result.to_pil()[0]])
    path = image_io.save_png(row, args.out, "demo", result.options.to_metadata())
    print(f"{path}: input, mask, result (the demo model; see ldm-inpaint --help to run your own checkpoint)")
    return 0
