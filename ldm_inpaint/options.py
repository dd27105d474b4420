"""One typed description of a request's options, with one default each, for every caller.

:class:`InpaintOptions` is what a run is asked to do (sampling and inpainting controls); where the work runs
(device, precision, compilation) belongs to the pipeline, not to a request. The CLI's options
(:func:`add_arguments`), the ablation keys (:data:`SWEEPABLE`, :func:`parse_value`), the PNG metadata and the
results rows (:meth:`InpaintOptions.to_metadata`) and the server's request schema are all derived from its
fields, so a default is written once: a Python call without a seed gives what the command gives without one.
"""

from __future__ import annotations

import argparse
import math
import secrets
from collections.abc import Sequence
from dataclasses import Field, asdict, dataclass, field, fields, replace
from functools import cache, partial
from typing import Any, Literal, get_type_hints

from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.samplers import SAMPLERS, check_sampler_eta, steps_taken

# Seeds are numpy RandomState seeds (the original demos' start noise): 0 .. 2**32 - 1; -1 draws a fresh one.
RANDOM_SEED = -1
MAX_SEED = 2**32 - 1
VAE_TILING: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


class OptionError(LdmInpaintError):
    """An option value that no run takes."""


def _option(default: object, help: str, *, choices: tuple[str, ...] = (), sweep: bool = True) -> Any:
    """A field with what the command line and the ablations show of it: help text, the allowed values,
    whether an ablation may sweep it."""
    return field(default=default, metadata={"help": help, "choices": choices, "sweep": sweep})


@dataclass(frozen=True)
class InpaintOptions:
    """The options of one run. Every field has the one default that the CLI, the API, the ablations and the
    server share; :meth:`validate` checks them all."""

    prompt: str = _option("", "text prompt")
    negative_prompt: str = _option("", "what to steer away from: the unconditional branch of guidance")
    sampler: str = _option("ddim", "sampler", choices=tuple(sorted(SAMPLERS)))
    steps: int = _option(50, "sampling steps (the original DDIM grid takes more for some counts: 45 -> 46)")
    guidance_scale: float = _option(7.5, "classifier-free guidance scale; 1 skips the unconditional pass")
    eta: float = _option(
        0.0,
        "injected noise: DDIM eta (0 deterministic, 1 as the original demos); 1 is the standard form of the "
        "ancestral samplers; the other samplers need 0",
    )
    strength: float = _option(
        1.0,
        "in (0, 1]: below 1, start part-way down the sampler's grid from the image noised to that level; "
        "1 starts from pure noise",
    )
    seed: int = _option(42, f"seed of the start noise, 0..{MAX_SEED}; {RANDOM_SEED}: a fresh random seed")
    n_samples: int = _option(1, "samples per image", sweep=False)
    height: int | None = _option(
        None, "resize the input to this height first; text-to-image: the image height (none: native)"
    )
    width: int | None = _option(
        None, "resize the input to this width first; text-to-image: the image width (none: native)"
    )
    long_prompts: bool = _option(False, "encode text beyond 75 tokens in extra windows instead of truncating")
    vae_tiling: str = _option(
        "auto",
        "run the VAE in overlapping 512-pixel tiles; auto: above 1024 pixels",
        choices=tuple(VAE_TILING),
    )
    mask_grow: int = _option(0, "dilate the mask by this many pixels")
    mask_blur: float = _option(0.0, "Gaussian sigma (px) of the paste-back edge")
    mask_mode: Literal["nearest", "max"] = _option(
        "nearest",
        "mask to latent size: nearest (original) or max (any repainted pixel marks its cell)",
        choices=("max", "nearest"),
    )
    paste_back: bool = _option(False, "keep the original pixels outside the (blurred) mask exactly")
    crop_to_mask: int | None = _option(
        None, "inpaint only the box around the mask (+ this padding, px) at the native size, pasted back"
    )

    def validate(self, *, has_image: bool = True, has_mask: bool = True, timesteps: int = 1000) -> None:
        """Raise :class:`OptionError` (what was expected, what was found) for any option no run takes;
        ``has_image`` / ``has_mask``: whether the run has an image / a mask (text-to-image has neither)."""
        for option in fields(self):
            _check_type(option.name, getattr(self, option.name))
            choices = option.metadata["choices"]
            if choices and getattr(self, option.name) not in choices:
                raise OptionError(
                    f"{option.name}: expected one of {', '.join(choices)}, found {getattr(self, option.name)!r}"
                )
        if not (self.seed == RANDOM_SEED or 0 <= self.seed <= MAX_SEED):
            raise OptionError(
                f"seed: expected 0..{MAX_SEED}, or {RANDOM_SEED} for a random one, found {self.seed}"
            )
        if not 1 <= self.steps <= timesteps:
            raise OptionError(f"steps: expected 1..{timesteps} (the training timesteps), found {self.steps}")
        if not self.guidance_scale >= 0:
            raise OptionError(f"guidance scale: expected >= 0, found {self.guidance_scale}")
        if not 0 <= self.eta <= 1:
            raise OptionError(f"eta: expected a value in [0, 1], found {self.eta}")
        if self.n_samples < 1:
            raise OptionError(f"n_samples: expected at least 1, found {self.n_samples}")
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise OptionError(
                    f"{name}: expected a positive number of pixels, found {getattr(self, name)}"
                )
        try:
            check_sampler_eta(self.sampler, self.eta)
            steps_taken(self.sampler, self.steps, self.strength, timesteps)
        except ValueError as error:
            raise OptionError(str(error)) from None
        if has_mask and not has_image:
            raise OptionError(
                "a mask needs an image to inpaint: pass the image, or no mask for text-to-image"
            )
        if not has_image and self.strength != 1:
            raise OptionError(
                f"strength {self.strength} < 1 starts from a noised image: pass one (text-to-image takes strength 1)"
            )
        self._validate_controls(has_mask)

    def _validate_controls(self, has_mask: bool) -> None:
        if (
            self.mask_grow < 0
            or self.mask_blur < 0
            or (self.crop_to_mask is not None and self.crop_to_mask < 0)
        ):
            raise OptionError(
                "mask grow, mask blur and crop padding: expected >= 0, found "
                f"{self.mask_grow}, {self.mask_blur}, {self.crop_to_mask}"
            )
        if self.mask_blur and not (self.paste_back or self.crop_to_mask is not None):
            raise OptionError(
                "mask blur softens the paste-back composite: use it with paste-back or crop-to-mask"
            )
        if not has_mask and (self.mask_grow or self.paste_back or self.crop_to_mask is not None):
            raise OptionError(
                "mask grow, paste-back and crop-to-mask act on a mask; without one (image-to-image, "
                f"text-to-image) leave them off, found mask grow {self.mask_grow}, paste-back "
                f"{self.paste_back}, crop-to-mask {self.crop_to_mask}"
            )

    def with_seed(self) -> InpaintOptions:
        """These options with a concrete seed: :data:`RANDOM_SEED` replaced by a fresh random one."""
        return replace(self, seed=secrets.randbelow(MAX_SEED + 1)) if self.seed == RANDOM_SEED else self

    @property
    def tiling(self) -> bool | None:
        """``vae_tiling`` as the pipeline takes it: True, False, or None for automatic."""
        return VAE_TILING[self.vae_tiling]

    def to_metadata(self) -> dict[str, str]:
        """Every option as text (PNG text chunks, results rows); None as ``""``."""
        return {name: "" if value is None else str(value) for name, value in asdict(self).items()}


OPTION_NAMES: tuple[str, ...] = tuple(option.name for option in fields(InpaintOptions))
SWEEPABLE: tuple[str, ...] = tuple(
    option.name for option in fields(InpaintOptions) if option.metadata["sweep"]
)
# Older names that the command line and ablation specs also accept.
ALIASES = {"scale": "guidance_scale"}
_BOOLEAN_TEXT = dict.fromkeys(("true", "yes", "on", "1"), True) | dict.fromkeys(
    ("false", "no", "off", "0"), False
)


@cache
def _fields() -> dict[str, Field]:
    return {option.name: option for option in fields(InpaintOptions)}


@cache
def _types() -> dict[str, tuple[type, bool]]:
    """Each option's value type and whether None is allowed, from the annotations."""
    result = {}
    for name, hint in get_type_hints(InpaintOptions).items():
        args = [arg for arg in getattr(hint, "__args__", ()) if arg is not type(None)]
        optional = len(args) < len(getattr(hint, "__args__", ()))
        kind = str if getattr(hint, "__origin__", None) is Literal else (args[0] if optional else hint)
        result[name] = (kind, optional)
    return result


_KIND_NAMES = {int: "an integer", float: "a finite number", str: "text", bool: "true or false"}


def _check_type(name: str, value: object) -> None:
    kind, optional = _types()[name]
    if value is None and optional:
        return
    if isinstance(value, str) and kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise OptionError(f"{name}: expected UTF-8 text, found bytes that are not: {value!r}") from None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise OptionError(
            f"{name}: expected {_KIND_NAMES[kind]}{' or none' if optional else ''}, found {value!r}"
        )


def canonical_name(name: str) -> str:
    """An option's field name from itself or an alias (``scale``); OptionError for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in OPTION_NAMES:
        raise OptionError(f"unknown option {name!r}; allowed: {', '.join(OPTION_NAMES)}")
    return name


def parse_value(name: str, value: Any) -> object:
    """``value`` (from YAML, JSON or a command-line string) as a value of option ``name``: strings are read as
    numbers and booleans where the option is one; text options take strings only. OptionError otherwise."""
    kind, optional = _types()[name]
    if optional and (
        value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))
    ):
        return None
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        try:
            value = _BOOLEAN_TEXT[text] if kind is bool else kind(text)
        except (KeyError, ValueError):
            raise OptionError(f"{name}: expected {_KIND_NAMES[kind]}, found {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    _check_type(name, value)
    choices = _fields()[name].metadata["choices"]
    if choices and value not in choices:
        raise OptionError(f"{name}: expected one of {', '.join(choices)}, found {value!r}")
    return value


def options_from(values: dict[str, Any], base: InpaintOptions | None = None) -> InpaintOptions:
    """``base`` (default: the defaults) with ``values`` (names or aliases -> raw values) parsed in."""
    parsed = {canonical_name(name): value for name, value in values.items()}
    return replace(
        base or InpaintOptions(), **{name: parse_value(name, value) for name, value in parsed.items()}
    )


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    with_defaults: bool,
    names: Sequence[str] = OPTION_NAMES,
    base: InpaintOptions | None = None,
) -> None:
    """One command-line option per field in ``names`` (``--name-with-dashes``, and ``--ALIAS`` for an alias).
    ``with_defaults``: options default to the fields' defaults and booleans are flags (the inpainting
    command); otherwise every option defaults to None, "not given", and booleans take ``--no-...`` too
    (ablations, where a spec may set them; the evaluation, whose ``base`` turns paste-back on). ``base``: the
    defaults the help shows, and with ``with_defaults`` gives (default: the fields' own)."""
    base = base or InpaintOptions()
    for option in fields(InpaintOptions):
        name = option.name
        if name not in names:
            continue
        flags = ["--" + name.replace("_", "-")] + [
            f"--{alias}" for alias, to in ALIASES.items() if to == name
        ]
        kind, _ = _types()[name]
        value = getattr(base, name)
        default = "none" if value is None else repr(value) if value == "" else value
        help_text = f"{option.metadata['help']} (default {default})".replace("%", "%%")
        common = dict(dest=name, help=help_text, default=value if with_defaults else None)
        if kind is bool:
            action = "store_true" if with_defaults else argparse.BooleanOptionalAction
            parser.add_argument(*flags, action=action, **common)
        else:
            choices = option.metadata["choices"] or None
            parse = partial(_argument, name)
            parser.add_argument(
                *flags, type=parse, choices=choices, metavar=None if choices else name.upper(), **common
            )


def _argument(name: str, text: str) -> object:
    try:
        return parse_value(name, text)
    except OptionError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def from_arguments(args: argparse.Namespace, base: InpaintOptions | None = None) -> InpaintOptions:
    """The options given on a command line built by :func:`add_arguments` (None: not given) over ``base``."""
    given = {name: getattr(args, name) for name in OPTION_NAMES if getattr(args, name, None) is not None}
    return replace(base or InpaintOptions(), **given)
