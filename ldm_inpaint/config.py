"""YAML configs in the original repos' schema -> typed hyperparameters.

The original code instantiates whatever dotted path a YAML ``target:`` names. Here every ``target:`` string is
looked up in :data:`TARGETS`, an explicit table of the few original classes we rebuild; anything else is an error.
Keys that only matter for training or for the original runtime (``monitor``, ``use_checkpoint``, ...) are listed
and ignored; any other key is an error, so a config for an architecture we do not build never loads silently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from omegaconf import OmegaConf

from ldm_inpaint.errors import ConfigError
from ldm_inpaint.models.autoencoder import AutoencoderParams
from ldm_inpaint.models.clip import TextEncoderParams
from ldm_inpaint.models.unet import UNetParams

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# The bundled YAML files, package data: read through importlib.resources so they resolve from a wheel too.
CONFIG_DIR = resources.files(__package__) / "configs"


@dataclass(frozen=True)
class ScheduleParams:
    """The DDPM noise schedule of the original ``DDPM`` class (only ``beta_schedule: linear`` is used by SD)."""

    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000


# The bundled config of each model, by (kind, cross-attention context width) as a checkpoint shows them.
BUNDLED_CONFIGS = {
    ("inpainting", 768): "v1-inpainting-inference",
    ("inpainting", 1024): "v2-inpainting-inference",
    ("text-to-image", 768): "v1-inference",
    ("text-to-image", 1024): "v2-inference",
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild one latent diffusion model and run it."""

    name: str
    unet: UNetParams
    autoencoder: AutoencoderParams
    text_encoder: TextEncoderParams
    schedule: ScheduleParams
    scale_factor: float
    parameterization: Literal["eps", "v"]
    conditioning_key: Literal["hybrid", "crossattn"]
    image_size: int = 64  # latent side the model was trained at (64 -> 512 px; 96 -> 768 px for SD2-v)

    @property
    def is_inpainting(self) -> bool:
        """True for the 9-channel inpainting UNets (noisy latent + mask + masked-image latent)."""
        return self.conditioning_key == "hybrid"


# Text encoder presets, keyed by the ``version`` / ``arch`` the original embedder classes take.
TEXT_ENCODER_PRESETS: dict[str, TextEncoderParams] = {
    "openai/clip-vit-large-patch14": TextEncoderParams(
        layout="openai",
        width=768,
        layers=12,
        heads=12,
        activation="quick_gelu",
        layer="last",
        pad_token=49407,
    ),
    "ViT-H-14": TextEncoderParams(
        layout="openclip",
        width=1024,
        layers=24,
        heads=16,
        activation="gelu",
        layer="last",
        pad_token=0,
        projection_dim=1024,
    ),
}

# Keys of the original configs that do not change the networks or the sampling math.
_RUNTIME_KEYS = {
    "unet": {"use_checkpoint", "use_fp16", "image_size", "legacy", "use_spatial_transformer", "dropout"},
    "autoencoder": {"monitor", "lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels"},
    "ddconfig": {"dropout", "attn_type"},
    "text": {"freeze", "device", "max_length", "version", "arch"},
    "model": {
        "num_timesteps_cond",
        "log_every_t",
        "first_stage_key",
        "cond_stage_key",
        "channels",
        "cond_stage_trainable",
        "monitor",
        "finetune_keys",
        "scheduler_config",
        "use_ema",
        "ckpt_path",
        "ignore_keys",
        "load_ema",
        "load_only_unet",
        "concat_keys",
        "masked_image_key",
        "keep_finetune_dims",
        "c_concat_log_start",
        "c_concat_log_end",
        "loss_type",
        "use_positional_encodings",
        "learn_logvar",
        "logvar_init",
        "l_simple_weight",
        "original_elbo_weight",
        "v_posterior",
        "clip_denoised",
        "make_it_fit",
        "reset_ema",
        "reset_num_ema_updates",
        "cosine_s",
        "use_fp16",
    },
}


def _check_keys(section: str, params: Mapping[str, Any], used: set[str]) -> None:
    unknown = sorted(set(params) - used - _RUNTIME_KEYS[section])
    if unknown:
        raise ConfigError(
            f"unsupported {section} parameter(s) {unknown}: ldm-inpaint builds the SD1/SD2 architectures, which "
            f"take {sorted(used)} (plus the ignored runtime keys {sorted(_RUNTIME_KEYS[section])})"
        )


def _require(section: str, params: Mapping[str, Any], key: str) -> Any:
    if key not in params:
        raise ConfigError(
            f"{section} config is missing the required parameter {key!r}; found {sorted(params)}"
        )
    return params[key]


def _parse_unet(params: Mapping[str, Any]) -> UNetParams:
    fields = {
        "in_channels",
        "out_channels",
        "model_channels",
        "attention_resolutions",
        "num_res_blocks",
        "channel_mult",
        "context_dim",
        "num_heads",
        "num_head_channels",
        "transformer_depth",
        "use_linear_in_transformer",
    }
    _check_keys("unet", params, fields)
    if not params.get("use_spatial_transformer", False):
        raise ConfigError("unet: only use_spatial_transformer: True (text-conditioned SD UNets) is supported")
    num_res_blocks = _require("unet", params, "num_res_blocks")
    if not isinstance(num_res_blocks, int):
        raise ConfigError(f"unet: num_res_blocks must be one integer, found {num_res_blocks!r}")
    depth = params.get("transformer_depth", 1)
    if not isinstance(depth, int):
        raise ConfigError(f"unet: transformer_depth must be one integer, found {depth!r}")
    num_heads = params.get("num_heads", -1)
    num_head_channels = params.get("num_head_channels", -1)
    if (num_heads == -1) == (num_head_channels == -1):
        raise ConfigError(
            f"unet: set exactly one of num_heads and num_head_channels, found num_heads={num_heads}, "
            f"num_head_channels={num_head_channels}"
        )
    return UNetParams(
        in_channels=int(_require("unet", params, "in_channels")),
        out_channels=int(_require("unet", params, "out_channels")),
        model_channels=int(_require("unet", params, "model_channels")),
        attention_resolutions=tuple(int(r) for r in _require("unet", params, "attention_resolutions")),
        num_res_blocks=num_res_blocks,
        channel_mult=tuple(int(m) for m in _require("unet", params, "channel_mult")),
        context_dim=int(_require("unet", params, "context_dim")),
        num_heads=int(num_heads),
        num_head_channels=int(num_head_channels),
        transformer_depth=depth,
        use_linear_in_transformer=bool(params.get("use_linear_in_transformer", False)),
    )


def _parse_autoencoder(params: Mapping[str, Any]) -> AutoencoderParams:
    _check_keys("autoencoder", params, {"embed_dim", "ddconfig"})
    dd = _require("autoencoder", params, "ddconfig")
    fields = {
        "double_z",
        "z_channels",
        "resolution",
        "in_channels",
        "out_ch",
        "ch",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
    }
    _check_keys("ddconfig", dd, fields)
    if not dd.get("double_z", True):
        raise ConfigError(
            "autoencoder: only double_z: true (a KL autoencoder with mean and log-variance) is supported"
        )
    return AutoencoderParams(
        embed_dim=int(_require("autoencoder", params, "embed_dim")),
        z_channels=int(_require("ddconfig", dd, "z_channels")),
        in_channels=int(_require("ddconfig", dd, "in_channels")),
        out_ch=int(_require("ddconfig", dd, "out_ch")),
        ch=int(_require("ddconfig", dd, "ch")),
        ch_mult=tuple(int(m) for m in _require("ddconfig", dd, "ch_mult")),
        num_res_blocks=int(_require("ddconfig", dd, "num_res_blocks")),
        attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions", ())),
        resolution=int(_require("ddconfig", dd, "resolution")),
    )


def _text_encoder(preset: str, params: Mapping[str, Any], layer: str) -> TextEncoderParams:
    """A preset with the config's overrides; ``width``/``layers``/``heads`` exist for the tiny test towers."""
    _check_keys("text", params, {"layer", "layer_idx", "width", "layers", "heads"})
    if preset not in TEXT_ENCODER_PRESETS:
        raise ConfigError(f"unknown text encoder {preset!r}; supported: {sorted(TEXT_ENCODER_PRESETS)}")
    if layer not in ("last", "penultimate"):
        raise ConfigError(f"text encoder layer must be 'last' or 'penultimate', found {layer!r}")
    if params.get("layer_idx") is not None:
        raise ConfigError("text encoder layer_idx is not supported; use layer: last or penultimate")
    base = TEXT_ENCODER_PRESETS[preset]
    overrides = {key: int(params[key]) for key in ("width", "layers", "heads") if key in params}
    if "width" in overrides and base.projection_dim:
        overrides["projection_dim"] = overrides["width"]
    return replace(base, layer=layer, **overrides)


def _parse_openai_clip(params: Mapping[str, Any]) -> TextEncoderParams:
    return _text_encoder(
        params.get("version", "openai/clip-vit-large-patch14"), params, params.get("layer", "last")
    )


def _parse_openclip(params: Mapping[str, Any]) -> TextEncoderParams:
    return _text_encoder(params.get("arch", "ViT-H-14"), params, params.get("layer", "last"))


# target string -> (role, parser of its params). Nothing outside this table can be named by a config.
TARGETS: dict[str, tuple[str, Callable[[Mapping[str, Any]], Any]]] = {
    "ldm.modules.diffusionmodules.openaimodel.UNetModel": ("unet", _parse_unet),
    "ldm.models.autoencoder.AutoencoderKL": ("autoencoder", _parse_autoencoder),
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": ("text", _parse_openai_clip),
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": ("text", _parse_openclip),
}
MODEL_TARGETS: dict[str, str] = {
    "ldm.models.diffusion.ddpm.LatentDiffusion": "crossattn",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion": "hybrid",
}


def _component(model_params: Mapping[str, Any], key: str, role: str) -> Any:
    section = _require("model", model_params, key)
    target = _require(key, section, "target")
    if target not in TARGETS:
        raise ConfigError(f"{key}: unknown target {target!r}; supported targets: {sorted(TARGETS)}")
    found_role, parse = TARGETS[target]
    if found_role != role:
        raise ConfigError(f"{key}: target {target!r} builds a {found_role}, expected a {role}")
    return parse(section.get("params") or {})


def parse_config(raw: Mapping[str, Any], name: str) -> ModelConfig:
    """Turn a config (the parsed YAML, original schema) into a :class:`ModelConfig`."""
    model = raw.get("model") if isinstance(raw, Mapping) else None
    if not isinstance(model, Mapping):
        raise ConfigError(f"{name}: expected a top-level 'model:' section (original LDM schema), found none")
    target = model.get("target")
    if target not in MODEL_TARGETS:
        raise ConfigError(f"{name}: unknown model target {target!r}; supported: {sorted(MODEL_TARGETS)}")
    params = model.get("params") or {}
    used = {
        "linear_start",
        "linear_end",
        "timesteps",
        "scale_factor",
        "parameterization",
        "conditioning_key",
        "beta_schedule",
        "image_size",
        "unet_config",
        "first_stage_config",
        "cond_stage_config",
    }
    _check_keys("model", params, used)
    conditioning_key = params.get("conditioning_key", "crossattn")
    if conditioning_key != MODEL_TARGETS[target]:
        raise ConfigError(
            f"{name}: {target} needs conditioning_key {MODEL_TARGETS[target]!r}, found {conditioning_key!r}"
        )
    parameterization = params.get("parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise ConfigError(f"{name}: parameterization must be 'eps' or 'v', found {parameterization!r}")
    beta_schedule = params.get("beta_schedule", "linear")
    if beta_schedule != "linear":
        raise ConfigError(
            f"{name}: only beta_schedule 'linear' (the SD schedule) is supported, found {beta_schedule!r}"
        )
    unet = _component(params, "unet_config", "unet")
    text_encoder = _component(params, "cond_stage_config", "text")
    if unet.context_dim != text_encoder.width:
        raise ConfigError(
            f"{name}: unet context_dim {unet.context_dim} does not match the text encoder width {text_encoder.width}"
        )
    return ModelConfig(
        name=name,
        unet=unet,
        autoencoder=_component(params, "first_stage_config", "autoencoder"),
        text_encoder=text_encoder,
        schedule=ScheduleParams(
            linear_start=float(params.get("linear_start", 0.00085)),
            linear_end=float(params.get("linear_end", 0.012)),
            timesteps=int(params.get("timesteps", 1000)),
        ),
        scale_factor=float(params.get("scale_factor", 1.0)),
        parameterization=parameterization,
        conditioning_key=conditioning_key,
        image_size=int(params.get("image_size", 64)),
    )


def bundled_config_names() -> list[str]:
    """The names :func:`load_config` accepts for the full-size configs bundled in ``ldm_inpaint/configs/``
    (the tiny test configs resolve too, as ``tiny/<name>``)."""
    return sorted(
        entry.name.removesuffix(".yaml") for entry in CONFIG_DIR.iterdir() if entry.name.endswith(".yaml")
    )


def _find_config(path: Path) -> Path | Traversable:
    """``path`` itself when it is a file, else the bundled config that a bare name such as
    ``v1-inpainting-inference`` (or ``tiny/v1-inpainting-tiny``) means."""
    if path.is_file():
        return path
    if not path.exists() and path.suffix == "":
        bundled = CONFIG_DIR.joinpath(f"{path.as_posix()}.yaml")
        if bundled.is_file():
            return bundled
    raise ConfigError(
        f"config file not found: {path}; expected a YAML file or the name of a bundled config "
        f"({', '.join(bundled_config_names())})"
    )


def read_raw_config(path: str | Path) -> tuple[Any, str]:
    """The parsed YAML of a config file or bundled name (see :func:`load_config`), not yet checked, and the
    config's name (the file's stem)."""
    source = _find_config(Path(path))
    try:
        with source.open("r", encoding="utf-8") as file:
            raw = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    except Exception as error:  # omegaconf raises many types for malformed YAML
        raise ConfigError(f"{source}: not a readable YAML config ({error})") from error
    return raw, Path(source.name).stem


def load_config(path: str | Path) -> ModelConfig:
    """Read a YAML config in the original schema. A bare name such as ``v1-inpainting-inference`` means the
    bundled file in ``ldm_inpaint/configs/``."""
    raw, name = read_raw_config(path)
    return parse_config(raw, name=name)
