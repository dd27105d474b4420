"""What a request hands the server, made safe: images only as data (base64 or a ``data:`` URI; an http(s) URL
only when the server was started with ``--allow-urls``), never a server path; decoded by the same code as the
command line's files (:func:`ldm_inpaint.image_io.decode_image`, which refuses an image over the pixel limit
from its header); options validated by their one ``validate``. Every refusal is an :class:`ApiError` with
the HTTP status and one line that says what was expected and what was found.
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from dataclasses import dataclass

from PIL import Image, ImageOps

from ldm_inpaint import image_io
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.options import InpaintOptions, OptionError, options_from
from ldm_inpaint.serving.jobs import Run, Worker

URL_TIMEOUT_S = 20


class ApiError(Exception):
    """An HTTP error answer: ``status``, the one-line ``message`` (JSON ``{"detail": message}``), headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Limits:
    """What one request may bring: body bytes (also the most an ``--allow-urls`` download may read), pixels
    of each image, and whether URLs are fetched at all."""

    max_body_bytes: int
    max_pixels: int
    allow_urls: bool


def image_bytes(value: str, what: str, limits: Limits) -> bytes:
    """The file bytes in ``value``: a ``data:`` URI, bare base64, or (``--allow-urls``) an http(s) URL."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{what}: expected a base64 image or a data URI, found {type(value).__name__}")
    if value.startswith(("http://", "https://")):
        return _fetch(value, what, limits)
    if "://" in value[:16]:
        raise ApiError(
            400, f"{what}: expected image data (base64 or a data: URI), found a {value.split(':')[0]} URL"
        )
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, f"{what}: expected base64 (or a data: URI), found text that is not valid base64"
        ) from None


def _fetch(url: str, what: str, limits: Limits) -> bytes:
    if not limits.allow_urls:
        raise ApiError(
            400,
            f"{what}: expected image data (base64 or a data: URI), found a URL; the server fetches URLs "
            "only when started with --allow-urls",
        )
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            data = response.read(limits.max_body_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ApiError(400, f"{what}: could not fetch {url[:200]}: {error}") from None
    if len(data) > limits.max_body_bytes:
        raise ApiError(413, f"{what}: expected at most {limits.max_body_bytes:,} bytes from {url[:200]}")
    return data


def decode(value: str | None, what: str, limits: Limits) -> Image.Image | None:
    """The image in ``value`` (None stays None); 413 over the pixel limit, 400 when not an image."""
    if value is None:
        return None
    data = image_bytes(value, what, limits)
    try:
        return image_io.decode_image(data, what, limits.max_pixels)
    except image_io.TooManyPixels as error:
        raise ApiError(413, str(error)) from None
    except LdmInpaintError as error:
        raise ApiError(400, str(error)) from None


def inverted(mask: Image.Image) -> Image.Image:
    """A mask with repaint and keep swapped (white <-> black), as a grayscale image."""
    return ImageOps.invert(mask.convert("L"))


def run_for(
    worker: Worker,
    image: Image.Image | None,
    mask: Image.Image | None,
    options: InpaintOptions,
    *,
    resize_mask: bool = False,
) -> Run:
    """A :class:`Run` of validated options with a concrete seed (422 when an option is out of range, 400
    when the mask does not fit the image)."""
    try:
        options.validate(has_image=image is not None, has_mask=mask is not None, timesteps=worker.timesteps)
        if mask is not None and resize_mask:
            mask = image_io.resize_mask(mask, image.size)
        if mask is not None:
            image_io.check_same_size(image, mask)
    except OptionError as error:
        raise ApiError(422, str(error)) from None
    except LdmInpaintError as error:
        raise ApiError(400, str(error)) from None
    return Run(image, mask, options.with_seed())


def parse_options(values: dict, base: InpaintOptions | None = None) -> InpaintOptions:
    """Options from a JSON object of option names (or aliases) -> values; 422 for an unknown name or a
    value of the wrong kind."""
    if not isinstance(values, dict):
        raise ApiError(422, f"options: expected a JSON object, found {type(values).__name__}")
    try:
        return options_from(values, base)
    except OptionError as error:
        raise ApiError(422, str(error)) from None
