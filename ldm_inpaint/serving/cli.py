"""``ldm-inpaint serve``: the HTTP server (FastAPI on uvicorn, ``pip install -e ".[serve]"``)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from ldm_inpaint.cli import add_model_arguments, check_model_arguments
from ldm_inpaint.command import EXIT_BAD_INPUT, Parser
from ldm_inpaint.devices import PRECISIONS
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.files import check_output_folder

DEFAULT_MAX_PIXELS = 2048 * 2048


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ldm-inpaint serve",
        description="Serve one checkpoint over HTTP: Cog / Replicate (/predictions), Azure ML (/score), the "
        "AUTOMATIC1111 API subset (/sdapi/v1/...), its own jobs API with server-sent events (/v1/jobs), and "
        "a page to draw masks on (/). One worker runs one job at a time from a bounded queue.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--max-queue", type=int, default=8, help="jobs that may wait; more get 429 (default 8)"
    )
    parser.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' on every route but the health checks"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without --api-key"
    )
    parser.add_argument(
        "--allow-urls", action="store_true", help="let requests give images as http(s) URLs to fetch"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--precision", default="fp32", choices=sorted(PRECISIONS), help="weights/compute dtype"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument(
        "--outdir", type=Path, help="also save every image here (numbered, never overwritten)"
    )
    parser.add_argument(
        "--job-timeout", type=float, default=600.0, help="seconds a job may run before it fails (default 600)"
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=64.0,
        help="largest request body in MiB; more get 413 (default 64)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"largest input or output image in pixels; more get 413 (default {DEFAULT_MAX_PIXELS:,})",
    )
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not _is_loopback(args.host) and not args.api_key and not args.insecure:
        parser.error(
            f"--host {args.host} exposes the server beyond this machine: give --api-key KEY (clients send "
            "'Authorization: Bearer KEY'), or --insecure to serve without one"
        )
    numbers = {"--port": (args.port, 0, 65535), "--max-queue": (args.max_queue, 1, 10**6)}
    for flag, (value, low, high) in numbers.items():
        if not low <= value <= high:
            parser.error(f"{flag}: expected {low}..{high}, found {value}")
    if not (args.job_timeout > 0 and args.max_body_mb > 0 and args.max_pixels > 0):
        parser.error(
            "--job-timeout, --max-body-mb and --max-pixels: expected positive numbers, found "
            f"{args.job_timeout}, {args.max_body_mb}, {args.max_pixels}"
        )
    check_model_arguments(parser, args)


def serve_main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        import uvicorn

        from ldm_inpaint.serving.app import ServerSettings, create_app
    except ImportError as error:
        print(
            f"ldm-inpaint serve: error: the server needs the serve extra ({error.name} is missing): "
            'pip install -e ".[serve]"',
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        if args.outdir is not None:
            check_output_folder(args.outdir)
    except LdmInpaintError as error:
        print(f"ldm-inpaint serve: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    settings = ServerSettings(
        max_queue=args.max_queue,
        job_timeout=args.job_timeout,
        api_key=args.api_key,
        allow_urls=args.allow_urls,
        outdir=args.outdir,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_pixels=args.max_pixels,
    )
    app = create_app(partial(load, args), settings)
    print(f"ldm-inpaint serve: http://{args.host}:{args.port}/ (loading {args.ckpt})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def load(args: argparse.Namespace):
    """The worker's model: the command line's own loading code (:func:`ldm_inpaint.cli.open_pipeline`)."""
    from ldm_inpaint.cli import open_pipeline
    from ldm_inpaint.serving.jobs import Model

    pipeline, metadata = open_pipeline(args)
    return Model(pipeline, metadata, args.precision)
