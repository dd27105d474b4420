"""``ldm-inpaint``: argparse -> pipeline -> files. No logic of its own beyond I/O and reporting."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from ldm_inpaint import __version__, image_io, options
from ldm_inpaint.checkpoint_files import folder_root, is_model_folder
from ldm_inpaint.command import EXIT_BAD_INPUT, EXIT_FAILED_ITEMS, Parser, checkpoint_argument, run
from ldm_inpaint.devices import PRECISIONS, resolve_device
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.files import check_output_folder, sha256_path
from ldm_inpaint.pairs import find_pairs
from ldm_inpaint.runtime import keep_freed_memory

if TYPE_CHECKING:
    from ldm_inpaint.inpaint_run import InpaintResult
    from ldm_inpaint.pipeline import InpaintPipeline
    from ldm_inpaint.samplers import StepInfo

# Subcommands: ``ldm-inpaint NAME ...`` -> the ``main`` of a module, imported when called (so that ``--help``
# does not wait for the model code); anything else is the inpainting command itself.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "ablate": (
        "ldm_inpaint.ablation.cli",
        "ablate_main",
        "sweep options and checkpoints over image/mask pairs",
    ),
    "convert": (
        "ldm_inpaint.tools",
        "convert_main",
        "convert a checkpoint (dtype, EMA, .ckpt <-> .safetensors)",
    ),
    "demo": (
        "ldm_inpaint.demo",
        "demo_main",
        "inpaint a bundled photo with the bundled demo model (no download)",
    ),
    "eval": (
        "ldm_inpaint.evaluation.cli",
        "eval_main",
        "evaluate as the LDM paper: LaMa masks, predictions, FID / LPIPS",
    ),
    "inspect": (
        "ldm_inpaint.inspection",
        "inspect_main",
        "report what a checkpoint holds and whether it loads",
    ),
    "serve": (
        "ldm_inpaint.serving.cli",
        "serve_main",
        "HTTP server: Cog, Azure ML, AUTOMATIC1111 APIs and a page to draw masks on",
    ),
    "train": (
        "ldm_inpaint.training.cli",
        "train_main",
        "fine-tune a checkpoint or train LoRA adapters (torchrun too)",
    ),
}


def lora_argument(text: str) -> tuple[Path, float]:
    from ldm_inpaint.lora.files import parse_lora_argument  # the model code, once a --lora is given

    try:
        return parse_lora_argument(text)
    except LdmInpaintError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    subcommands = "\n".join(f"  ldm-inpaint {name:8} {text}" for name, (_, _, text) in SUBCOMMANDS.items())
    parser = Parser(
        prog="ldm-inpaint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"subcommands (each with its own --help):\n{subcommands}",
        description="Inpaint images with the original SD 1.5 / SD 2 inpainting checkpoints (or text-to-image "
        "checkpoints, by blended latent diffusion); without --mask repaint the whole image (image-to-image), "
        "without --image and --batch generate one from the prompt (text-to-image).",
    )
    add_model_arguments(parser)
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
    options.add_arguments(parser.add_argument_group("sampling and inpainting controls"), with_defaults=True)
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
        "--outdir", type=Path, default=Path("outputs"), help="output folder (default outputs/)"
    )
    parser.add_argument("--save-latents", action="store_true", help="also save each final latent as .npy")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=image_io.DEFAULT_MAX_PIXELS,
        help="refuse inputs and outputs larger than this many pixels, before allocating them "
        f"(default {image_io.DEFAULT_MAX_PIXELS:,}: 4096 x 4096)",
    )
    parser.add_argument("--version", action="version", version=f"ldm-inpaint {__version__}")
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything that can be checked before the model loads; the options through their one validate()."""
    if args.batch is not None and args.mask is not None:
        parser.error("--mask goes with --image; in --batch mode masks come from the folder or list")
    if args.resize_mask and args.mask is None and args.batch is None:
        parser.error("--resize-mask needs --mask")
    has_image = args.image is not None or args.batch is not None
    request = options.from_arguments(args)
    try:
        request.validate(has_image=has_image, has_mask=args.mask is not None or args.batch is not None)
        if args.max_pixels < 1:
            raise LdmInpaintError(f"--max-pixels: expected a positive number, found {args.max_pixels}")
        if request.height is not None and request.width is not None:
            image_io.check_pixels(request.width, request.height, args.max_pixels, "--height x --width")
    except LdmInpaintError as error:
        parser.error(str(error))
    check_model_arguments(parser, args)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say which model to load (``--ckpt``, ``--vae``, ``--config``, ``--use-ema``,
    ``--lora``), as every command that runs one takes them (:func:`open_pipeline` reads them)."""
    parser.add_argument(
        "--ckpt",
        type=checkpoint_argument,
        required=True,
        help="checkpoint file (.ckpt or .safetensors), a diffusers / ppdiffusers model folder (or its Hugging "
        "Face cache folder models--ORG--NAME), or 'demo' for the small bundled model",
    )
    parser.add_argument(
        "--vae",
        type=Path,
        help="another VAE in place of the model's own: a .ckpt / .safetensors VAE (e.g. "
        "vae-ft-mse-840000-ema-pruned.ckpt), a whole checkpoint's first_stage_model, or a diffusers vae/ folder",
    )
    parser.add_argument(
        "--config",
        help="YAML config (original schema); default: the checkpoint's name with .yaml beside it if there is "
        "one, else detected from the checkpoint",
    )
    parser.add_argument("--use-ema", action="store_true", help="load the file's model_ema.* copy instead")
    parser.add_argument(
        "--lora",
        action="append",
        type=lora_argument,
        metavar="FILE[:WEIGHT]",
        help="LoRA file (kohya / AUTOMATIC1111 or diffusers .safetensors) merged into the weights, its update "
        "times WEIGHT (default 1); repeat it to stack several",
    )


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One parser error line for a model option that names nothing loadable."""
    if args.ckpt.is_dir() and not is_model_folder(args.ckpt):
        parser.error(
            f"--ckpt {args.ckpt}: expected a checkpoint file (.ckpt or .safetensors) or a diffusers model "
            "folder (with model_index.json), found a folder without model_index.json"
        )
    if not args.ckpt.exists():
        parser.error(f"checkpoint not found: {args.ckpt}")
    if args.vae is not None and not args.vae.exists():
        parser.error(f"--vae: VAE file or folder not found: {args.vae}")
    for path, _ in args.lora or []:
        if not path.is_file():
            parser.error(f"--lora: LoRA file not found: {path}")


def _load_pair(image_path: Path | None, mask_path: Path | None, resize_mask: bool, max_pixels: int):
    """The image and mask of one run, each None when not given (image-to-image, text-to-image)."""
    image = None if image_path is None else image_io.load_image(image_path, max_pixels)
    if mask_path is None:
        return image, None
    mask = image_io.load_image(mask_path, max_pixels)
    if resize_mask:
        mask = image_io.resize_mask(mask, image.size)
    image_io.check_same_size(image, mask)
    return image, mask


# Output name of text-to-image runs, which have no input image to name them after.
TEXT_TO_IMAGE_STEM = "txt2img"


def _run_pair(
    pipeline: InpaintPipeline, args, image_path: Path | None, mask_path: Path | None, ckpt_meta: dict
) -> None:
    """One item: inpaint, then write (and print) each sample's PNG, and its latent with ``--save-latents``."""
    image, mask = _load_pair(image_path, mask_path, args.resize_mask, args.max_pixels)
    stem = TEXT_TO_IMAGE_STEM if image_path is None else image_path.stem
    with tqdm(desc=stem, unit="step", leave=False, file=sys.stderr) as bar:

        def progress(step: StepInfo) -> None:
            bar.total = step.total
            bar.update(1)

        result = pipeline(image, mask, options.from_arguments(args), callback=progress)
    for note in result.notes:
        print(f"ldm-inpaint: note: {note}", file=sys.stderr)
    if args.seed == options.RANDOM_SEED:
        print(f"ldm-inpaint: seed {result.options.seed}", file=sys.stderr)
    for index, picture in enumerate(result.to_pil()):
        metadata = sample_metadata(ckpt_meta, result, index, args.precision, image_path, mask_path)
        png = image_io.save_png(picture, args.outdir, stem, metadata)
        print(png)
        if args.save_latents:
            latent = result.latents[index].numpy().astype(np.float32)
            try:
                print(image_io.save_npy(latent, png))
            except OSError as error:
                raise LdmInpaintError(
                    f"{png.with_suffix('.npy')}: {error.strerror or error}; its image {png} was written"
                ) from None


def sample_metadata(
    ckpt_meta: dict[str, str],
    result: InpaintResult,
    index: int,
    precision: str,
    image: Path | str | None,
    mask: Path | str | None,
) -> dict[str, str]:
    """The PNG text chunks of sample ``index`` of ``result``: the model's (:func:`checkpoint_metadata`), every
    option, and where the inputs came from (a path, or a server's description of uploaded data)."""
    return {
        **ckpt_meta,
        **result.options.to_metadata(),
        "sample_index": str(index),
        "steps_taken": str(result.steps_taken),
        "precision": precision,
        "image": "" if image is None else str(image),
        "mask": "" if mask is None else str(mask),
    }


def _output_bytes(args: argparse.Namespace, items: int) -> int:
    """About what the outputs take on disk: uncompressed 8-bit RGB for each sample of each item (at the size
    asked for, else the models' native 512), and float32 latents with ``--save-latents``."""
    pixels = (args.height or 512) * (args.width or 512)
    per_sample = 3 * pixels + (4 * 4 * pixels // 64 if args.save_latents else 0)
    return items * args.n_samples * per_sample


def checkpoint_metadata(
    ckpt: Path, pipeline: InpaintPipeline, device: torch.device, vae: Path | None = None
) -> dict[str, str]:
    """What an output PNG records of the model that made it, and of what its exact bits depend on."""
    metadata = {
        "checkpoint": ckpt.name,
        "checkpoint_sha256": sha256_path(folder_root(ckpt))[:12],
        "config": pipeline.config.name,
        "software": f"ldm-inpaint {__version__}",
        # what bit-identical results also depend on (see the README: Reproducibility)
        "torch": torch.__version__,
        "device": str(device),
        "threads": str(torch.get_num_threads()),
    }
    if vae is not None:
        metadata["vae"], metadata["vae_sha256"] = vae.name, sha256_path(vae)[:12]
    if pipeline.loras:
        metadata["lora"] = "; ".join(lora.describe() for lora in pipeline.loras)
    return metadata


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        module, function, _ = SUBCOMMANDS[argv[0]]
        return run(f"ldm-inpaint {argv[0]}", getattr(importlib.import_module(module), function), argv[1:])
    return run("ldm-inpaint", inpaint_main, argv)


def open_pipeline(args: argparse.Namespace) -> tuple[InpaintPipeline, dict[str, str]]:
    """The pipeline a command line asks for (``ckpt``, ``config``, ``use_ema``, ``lora``, ``device``,
    ``precision``, ``compile``, ``max_pixels``) and its :func:`checkpoint_metadata`; what was loaded is
    reported on standard error."""
    # The model code, imported once the command line is known to be good.
    from ldm_inpaint.checkpoint import load_model
    from ldm_inpaint.models.packing import can_pack
    from ldm_inpaint.pipeline import InpaintPipeline

    device = resolve_device(args.device)
    dtype = PRECISIONS[args.precision]
    loaded = load_model(
        args.ckpt,
        args.config,
        use_ema=args.use_ema,
        dtype=dtype,
        device=device,
        pack=can_pack(device, dtype) and not args.compile,
        vae=args.vae,
    )
    print(f"ldm-inpaint: config {loaded.config.name} ({loaded.config_source})", file=sys.stderr)
    for kind, keys in loaded.skipped.items():
        print(f"ldm-inpaint: skipped {len(keys)} {kind}", file=sys.stderr)
    pipeline = InpaintPipeline(loaded.model, compile=args.compile, loras=args.lora or ())
    pipeline.max_pixels = args.max_pixels
    for lora in pipeline.loras:
        print(
            f"ldm-inpaint: LoRA {lora.describe()}: {lora.unet_modules} UNet and {lora.text_modules} "
            "text-encoder modules",
            file=sys.stderr,
        )
    return pipeline, checkpoint_metadata(args.ckpt, pipeline, device, args.vae)


def inpaint_main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _validate(parser, args)
    if args.lean_memory:
        keep_freed_memory(lean=True)
    try:
        if args.batch is not None:
            pairs, problems = find_pairs(args.batch)
        else:
            pairs, problems = [(args.image, args.mask)], []
            _load_pair(args.image, args.mask, args.resize_mask, args.max_pixels)  # readable, before the model
        check_output_folder(args.outdir, _output_bytes(args, len(pairs)))
        pipeline, ckpt_meta = open_pipeline(args)
    except LdmInpaintError as error:
        print(f"ldm-inpaint: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    failures = list(problems)
    for image_path, mask_path in pairs:
        try:
            _run_pair(pipeline, args, image_path, mask_path, ckpt_meta)
        except (ValueError, OSError, RuntimeError, MemoryError) as error:
            # one item's failure (bad file, full disk, out of memory) is reported; the batch goes on
            name = image_path or TEXT_TO_IMAGE_STEM
            failures.append(f"{name}: {error}")
            print(f"ldm-inpaint: error: {name}: {error}", file=sys.stderr)
    if failures:
        print(
            f"ldm-inpaint: {len(failures)} of {len(pairs) + len(problems)} item(s) failed:", file=sys.stderr
        )
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return EXIT_FAILED_ITEMS
    return 0


if __name__ == "__main__":
    sys.exit(main())
