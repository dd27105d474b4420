"""What a training run is: :class:`TrainSettings`, its command line, and the rule of ``--resume``.

A run's settings are stored in ``RUN/settings.json`` when it starts. ``--resume RUN --steps N`` continues RUN up
to N optimizer steps with those settings; an option given again must have its stored value (``--steps``
excepted), so a resumed run is the run that was started, only longer.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from ldm_inpaint.devices import PRECISIONS
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.mask_generators import MASK_KINDS

MASK_SOURCES = (*MASK_KINDS, "files")


class SettingsError(LdmInpaintError):
    """Training settings that cannot run, or a ``--resume`` that would change the run."""


def _option(default: object, help: str, **metadata: object) -> object:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class TrainSettings:
    """Every setting of a run. Paths are stored as strings so that the settings are JSON."""

    data: str = _option(
        None, "folder of training images (captions X.txt or captions.jsonl/.csv; masks X_mask.png)"
    )
    out: str = _option(None, "run folder to create (never overwritten)")
    steps: int = _option(None, "total number of optimizer steps of the run")
    batch_size: int = _option(None, "global batch per optimizer step, split over processes and accumulation")
    lr: float = _option(None, "learning rate reached after the warm-up (AdamW)")
    ckpt: str | None = _option(
        None, "checkpoint to start from (original layout); without it, --config from scratch"
    )
    stage: str = _option(
        "unet",
        "what is trained: the UNet (diffusion loss) or the autoencoder (L1 + KL)",
        choices=("unet", "autoencoder"),
    )
    kl_weight: float = _option(
        1e-6, "--stage autoencoder: weight of the KL term against the L1 term (the original's)"
    )
    config: str | None = _option(None, "YAML config (original schema); default: detected from --ckpt")
    resolution: int = _option(512, "training crop side in pixels (short side resized to it, random crop)")
    grad_accum: int = _option(1, "micro-batches accumulated per optimizer step")
    ema_decay: float = _option(0.9999, "EMA decay (LitEma warm-up); 0 turns EMA off")
    precision: str = _option(
        "fp32", "fp32, or bf16 autocast, or fp16 autocast with a loss scaler", choices=tuple(PRECISIONS)
    )
    grad_checkpointing: bool = _option(False, "recompute UNet activations in the backward pass (less memory)")
    masks: str = _option(
        "sd-large", "mask generator, or 'files' (X_mask.png beside each image)", choices=MASK_SOURCES
    )
    p_full_mask: float = _option(0.25, "probability that a sample's mask is the whole image")
    p_drop_text: float = _option(0.1, "probability that a caption is replaced by the empty prompt")
    warmup: int = _option(2500, "linear warm-up steps of the learning rate (the SD1 inpainting recipe)")
    snr_gamma: float | None = _option(None, "min-SNR-gamma loss weighting (Hang et al. 2023); default off")
    grad_clip: float = _option(1.0, "clip the gradient norm to this (0: no clipping)")
    weight_decay: float = _option(0.01, "AdamW weight decay")
    seed: int = _option(0, "seed of every random draw (crops, masks, caption dropout, t, noise)")
    save_every: int = _option(
        1000, "save last.ckpt, the resume state and a kept step-N.ckpt every N steps (0: at the end only)"
    )
    sample_every: int = _option(500, "write a sample grid every N steps and at the end (0: none)")
    lora: int | None = _option(None, "train LoRA adapters of this rank instead of the UNet")
    safetensors: bool = _option(False, "also write each checkpoint as .safetensors")
    device: str | None = _option(
        None, "cpu, cuda or cuda:N (default: cuda when available; torchrun: the local rank)"
    )

    def check(self, world_size: int = 1) -> None:
        """SettingsError unless the run can start on ``world_size`` processes."""
        for name in ("data", "out", "steps", "batch_size", "lr"):
            if getattr(self, name) is None:
                raise SettingsError(f"--{name.replace('_', '-')} is required (or --resume RUN)")
        if self.ckpt is None and self.config is None:
            raise SettingsError("--ckpt INIT is required, or --config CFG to train from scratch")
        positive = ("steps", "batch_size", "lr", "resolution", "grad_accum")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(
                    f"--{name.replace('_', '-')} must be positive, found {getattr(self, name)}"
                )
        for name in ("p_full_mask", "p_drop_text"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingsError(
                    f"--{name.replace('_', '-')} must be in [0, 1], found {getattr(self, name)}"
                )
        if not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
            raise SettingsError(f"--ema-decay must be 0 (off) or in (0, 1), found {self.ema_decay}")
        for name in ("warmup", "save_every", "sample_every", "seed"):
            if getattr(self, name) < 0:
                raise SettingsError(f"--{name.replace('_', '-')} must be >= 0, found {getattr(self, name)}")
        if self.lora is not None and self.lora <= 0:
            raise SettingsError(f"--lora must be a positive rank, found {self.lora}")
        if self.resolution <= 0:
            raise SettingsError(f"--resolution must be positive, found {self.resolution}")
        per_step = world_size * self.grad_accum
        if self.batch_size % per_step:
            raise SettingsError(
                f"--batch-size {self.batch_size} must be a multiple of processes x --grad-accum = "
                f"{world_size} x {self.grad_accum}, so that every micro-batch has the same size"
            )

    def check_resolution(self, multiple: int) -> None:
        """The training side must be a multiple of the model's ``multiple`` (the VAE's factor times
        2 ** the UNet's downsamplings: 64 for SD), so that every skip connection meets its twin."""
        if self.resolution % multiple:
            raise SettingsError(
                f"--resolution must be a multiple of {multiple} for this model (its VAE's factor times 2 ** its "
                f"UNet's downsamplings), found {self.resolution}"
            )

    def micro_batch(self, world_size: int) -> int:
        """Samples per process per forward pass."""
        return self.batch_size // (world_size * self.grad_accum)


SETTINGS_FILE = "settings.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field, every default None ("not given") so that ``--resume`` can tell what was given."""
    for option in fields(TrainSettings):
        flag = "--" + option.name.replace("_", "-")
        default = option.default if option.default is not MISSING else None
        help_text = f"{option.metadata['help']} (default {default})".replace("%", "%%")
        if option.type == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(option.type, str)
        choices = option.metadata.get("choices")
        parser.add_argument(flag, type=kind, choices=choices, default=None, help=help_text)


def given(args: argparse.Namespace) -> dict[str, object]:
    """The settings named on the command line."""
    names = {option.name for option in fields(TrainSettings)}
    return {name: value for name, value in vars(args).items() if name in names and value is not None}


def new_settings(args: argparse.Namespace) -> TrainSettings:
    return replace(TrainSettings(), **given(args))


def resumed_settings(run: Path, args: argparse.Namespace) -> TrainSettings:
    """RUN's stored settings with ``--steps`` (and ``--device``, which does not change the result) taken from
    the command line; SettingsError if any other option differs from its stored value."""
    path = run / SETTINGS_FILE
    if not path.is_file():
        raise SettingsError(
            f"--resume {run}: no {SETTINGS_FILE} there; expected a run folder made by ldm-inpaint train"
        )
    stored = TrainSettings(**json.loads(path.read_text()))
    changed = {
        name: (getattr(stored, name), value)
        for name, value in given(args).items()
        if name not in ("steps", "device") and getattr(stored, name) != value
    }
    if changed:
        what = ", ".join(
            f"--{name.replace('_', '-')} {new!r} (run has {old!r})" for name, (old, new) in changed.items()
        )
        raise SettingsError(
            f"--resume {run} cannot change the run's settings: {what}; only --steps may change"
        )
    return replace(stored, **{k: v for k, v in given(args).items() if k in ("steps", "device")})


def to_json(settings: TrainSettings) -> str:
    return json.dumps(asdict(settings), indent=2) + "\n"
