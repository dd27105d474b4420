"""``ldm-inpaint``: argparse -> pipeline -> files. No logic of its own beyond I/O and reporting."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ldm_inpaint import __version__, image_io
from ldm_inpaint.ablate import ablate_main
from ldm_inpaint.checkpoint import load_model, sha256_file
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.models.packing import can_pack
from ldm_inpaint.pipeline import InpaintPipeline, check_controls, check_options
from ldm_inpaint.runtime import keep_freed_memory
from ldm_inpaint.samplers import SAMPLERS
from ldm_inpaint.tools import DTYPES as PRECISIONS
from ldm_inpaint.tools import convert_main, inspect_main

VAE_TILING = {"auto": None, "on": True, "off": False}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm-inpaint",
        description="Inpaint images with the original SD 1.5 / SD 2 inpainting checkpoints (or text-to-image "
        "checkpoints, by blended latent diffusion); without --mask repaint the whole image (image-to-image), "
        "without --image and --batch generate one from the prompt (text-to-image).",
    )
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint file (.ckpt or .safetensors)")
    parser.add_argument(
        "--config", help="YAML config (original schema); default: detected from the checkpoint"
    )
    parser.add_argument("--use-ema", action="store_true", help="load the file's model_ema.* copy instead")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--image", type=Path, help="image to inpaint (none and no --batch: text-to-image)")
    source.add_argument(
        "--batch",
        type=Path,
        help="folder of X.png + X_mask.png pairs, or a text file with one 'image mask' pair per line",
    )
    parser.add_argument(
        "--mask",
        type=Path,
        help="mask for --image: white = repaint, black = keep; none: repaint the whole image "
        "(image-to-image, with --strength below 1)",
    )
    parser.add_argument(
        "--resize-mask", action="store_true", help="resize a mask of another size to the image"
    )
    parser.add_argument("--prompt", default="", help="text prompt")
    parser.add_argument(
        "--long-prompts",
        action="store_true",
        help="encode text beyond 75 tokens in extra windows (default: truncate, as the original)",
    )
    parser.add_argument(
        "--negative-prompt", default="", help="what to steer away from (default: empty prompt)"
    )
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS), help="sampler (default ddim)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument(
        "--scale", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)"
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=0.0,
        help="injected noise: DDIM eta (0 deterministic, 1 as the original demos); 1 is the standard form of "
        "the ancestral samplers; the other samplers need 0",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="in (0, 1]: below 1, start part-way down the sampler's grid from the image noised to that level "
        "(keeps more of the image, takes fewer steps); 1 starts from pure noise (default)",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the start noise (default 42)")
    parser.add_argument("--n-samples", type=_positive_int, default=1, help="samples per image (default 1)")
    parser.add_argument(
        "--height",
        type=_positive_int,
        help="resize the input to this height first; text-to-image: the image height "
        "(default: native, 512 for SD)",
    )
    parser.add_argument(
        "--width",
        type=_positive_int,
        help="resize the input to this width first; text-to-image: the image width "
        "(default: native, 512 for SD)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--precision", default="fp32", choices=sorted(PRECISIONS), help="weights/compute dtype"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (the first image takes minutes longer; pays off over many images; on CPU the "
        "weights are frozen into the compiled graph, a second, packed copy of them)",
    )
    parser.add_argument(
        "--lean-memory",
        action="store_true",
        help="CPU: lower, steadier peak memory; the VAE's large activations and the one-off weight packing get "
        "memory of their own instead of reusing the heap (about 10 %% slower at 512x512 in fp32)",
    )
    parser.add_argument(
        "--vae-tiling",
        default="auto",
        choices=list(VAE_TILING),
        help="run the VAE in overlapping 512-pixel tiles (less memory); auto: above 1024 pixels",
    )
    controls = parser.add_argument_group(
        "inpainting controls (off by default: a plain run is the original's)"
    )
    controls.add_argument(
        "--mask-grow", type=int, default=0, metavar="PX", help="dilate the mask by PX pixels"
    )
    controls.add_argument(
        "--mask-blur",
        type=float,
        default=0.0,
        metavar="PX",
        help="soften the paste-back edge (Gaussian sigma, px)",
    )
    controls.add_argument(
        "--mask-mode",
        default="nearest",
        choices=["nearest", "max"],
        help="mask to latent size: nearest (original) or max (any repainted pixel marks its cell)",
    )
    controls.add_argument(
        "--paste-back",
        action="store_true",
        help="keep the original pixels outside the (blurred) mask exactly",
    )
    controls.add_argument(
        "--crop-to-mask",
        type=int,
        metavar="PADDING",
        help="inpaint only the box around the mask (+PADDING px) at the model's native size, pasted back",
    )
    parser.add_argument(
        "--outdir", type=Path, default=Path("outputs"), help="output folder (default outputs/)"
    )
    parser.add_argument("--save-latents", action="store_true", help="also save each final latent as .npy")
    parser.add_argument("--version", action="version", version=f"ldm-inpaint {__version__}")
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batch is not None and args.mask is not None:
        parser.error("--mask goes with --image; in --batch mode masks come from the folder or list")
    if args.image is None and args.batch is None:
        if args.mask is not None:
            parser.error("--mask needs --image (the image to inpaint)")
        if args.strength != 1:
            parser.error(
                f"--strength {args.strength} below 1 starts from a noised image: give --image "
                "(text-to-image takes strength 1)"
            )
    if args.resize_mask and args.mask is None and args.batch is None:
        parser.error("--resize-mask needs --mask")
    has_mask = args.mask is not None or args.batch is not None
    try:
        check_options(args.sampler, args.steps, args.scale, args.eta, strength=args.strength)
        check_controls(args.mask_grow, args.mask_blur, args.paste_back, args.crop_to_mask, has_mask=has_mask)
    except LdmInpaintError as error:
        parser.error(str(error))
    if not args.ckpt.is_file():
        parser.error(f"checkpoint not found: {args.ckpt}")


def _load_pair(image_path: Path | None, mask_path: Path | None, resize_mask: bool):
    """The image and mask of one run, each None when not given (image-to-image, text-to-image)."""
    image = None if image_path is None else image_io.load_image(image_path)
    if mask_path is None:
        return image, None
    mask = image_io.load_image(mask_path)
    if resize_mask:
        mask = image_io.resize_mask(mask, image.size)
    image_io.check_same_size(image, mask)
    return image, mask


# Output name of text-to-image runs, which have no input image to name them after.
TEXT_TO_IMAGE_STEM = "txt2img"


def _run_pair(
    pipeline: InpaintPipeline, args, image_path: Path | None, mask_path: Path | None, ckpt_meta: dict
) -> list[Path]:
    image, mask = _load_pair(image_path, mask_path, args.resize_mask)
    stem = TEXT_TO_IMAGE_STEM if image_path is None else image_path.stem
    with tqdm(desc=stem, unit="step", leave=False, file=sys.stderr) as bar:

        def progress(index: int, total: int) -> None:
            bar.total = total
            bar.update(1)

        result = pipeline(
            image,
            mask,
            args.prompt,
            negative_prompt=args.negative_prompt,
            sampler=args.sampler,
            steps=args.steps,
            guidance_scale=args.scale,
            eta=args.eta,
            strength=args.strength,
            seed=args.seed,
            n_samples=args.n_samples,
            height=args.height,
            width=args.width,
            long_prompts=args.long_prompts,
            mask_grow=args.mask_grow,
            mask_blur=args.mask_blur,
            mask_mode=args.mask_mode,
            paste_back=args.paste_back,
            crop_to_mask=args.crop_to_mask,
            vae_tiling=VAE_TILING[args.vae_tiling],
            callback=progress,
        )
    written = []
    for index, picture in enumerate(result.to_pil()):
        metadata = {
            **ckpt_meta,
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt,
            "seed": str(args.seed),
            "sample_index": str(index),
            "sampler": args.sampler,
            "steps": str(args.steps),
            "steps_taken": str(result.steps_taken),
            "scale": str(args.scale),
            "eta": str(args.eta),
            "strength": str(args.strength),
            "precision": args.precision,
            "vae_tiling": args.vae_tiling,
            "long_prompts": str(args.long_prompts),
            "mask_grow": str(args.mask_grow),
            "mask_blur": str(args.mask_blur),
            "mask_mode": args.mask_mode,
            "paste_back": str(args.paste_back),
            "crop_to_mask": str(args.crop_to_mask),
            "image": "" if image_path is None else str(image_path),
            "mask": "" if mask_path is None else str(mask_path),
        }
        png = image_io.save_png(picture, args.outdir, stem, metadata)
        written.append(png)
        if args.save_latents:
            written.append(image_io.save_npy(result.latents[index].numpy().astype(np.float32), png))
    return written


# Subcommands: ``ldm-inpaint NAME ...``; anything else is the inpainting command itself.
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "convert": convert_main,
    "inspect": inspect_main,
    "ablate": ablate_main,
}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"ldm-inpaint: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return inpaint_main(argv)


def inpaint_main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    if args.lean_memory:
        keep_freed_memory(lean=True)
    try:
        if args.batch is not None:
            pairs, problems = image_io.find_pairs(args.batch)
        else:
            pairs, problems = [(args.image, args.mask)], []
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = PRECISIONS[args.precision]
        loaded = load_model(
            args.ckpt,
            args.config,
            use_ema=args.use_ema,
            dtype=dtype,
            device=device,
            pack=can_pack(device, dtype) and not args.compile,
        )
        how = "detected from the checkpoint" if loaded.detected else "given"
        print(f"ldm-inpaint: config {loaded.config.name} ({how})", file=sys.stderr)
        for kind, keys in loaded.skipped.items():
            print(f"ldm-inpaint: skipped {len(keys)} {kind}", file=sys.stderr)
        pipeline = InpaintPipeline(loaded.model, compile=args.compile)
        ckpt_meta = {
            "checkpoint": args.ckpt.name,
            "checkpoint_sha256": sha256_file(args.ckpt)[:12],
            "config": pipeline.config.name,
            "software": f"ldm-inpaint {__version__}",
        }
    except LdmInpaintError as error:
        print(f"ldm-inpaint: error: {error}", file=sys.stderr)
        return 2
    failures = list(problems)
    for image_path, mask_path in pairs:
        try:
            for path in _run_pair(pipeline, args, image_path, mask_path, ckpt_meta):
                print(path)
        except (LdmInpaintError, OSError) as error:
            name = image_path or TEXT_TO_IMAGE_STEM
            failures.append(f"{name}: {error}")
            print(f"ldm-inpaint: error: {name}: {error}", file=sys.stderr)
    if failures:
        print(
            f"ldm-inpaint: {len(failures)} of {len(pairs) + len(problems)} item(s) failed:", file=sys.stderr
        )
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
