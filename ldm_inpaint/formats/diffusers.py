"""diffusers-format model folders, and ppdiffusers' PaddlePaddle ones, read into the original checkpoint layout.

A folder holds ``model_index.json`` and one sub-folder per component: ``unet/``, ``vae/``, ``text_encoder/``
with their weights (:data:`WEIGHT_FILES`, the first that exists; sharded files through their
``.index.json``) and a ``config.json`` (PaddleNLP's text encoder: ``model_config.json``), plus ``tokenizer/``
and ``scheduler/``. A Hugging Face cache folder ``models--ORG--NAME`` stands for its snapshot of ``refs/main``.

The weights are renamed through :mod:`~ldm_inpaint.formats.diffusers_names` into the original file's keys,
so the loader's strict checks (every weight with its shape, nothing else) judge them as they judge a
checkpoint file, and ``convert`` writes them as one. Every UNet and VAE weight of the model must be in the
folder and every weight of the folder must be used. Two entries are named and counted instead: the text
encoder's ``position_ids`` (implied by position), and, for SD2, the OpenCLIP weights that diffusers' folders
leave out because SD2 never runs them (the last block, ``text_projection``, ``logit_scale``: SD2 reads the
penultimate block), which are filled with zeros so the original layout is whole.

The config is the one given, else detected from ``unet/config.json`` (input channels, cross-attention
width) and ``scheduler/scheduler_config.json`` (prediction type), and the scheduler's betas are checked
against it either way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm_inpaint.checkpoint_files import folder_root, read_checkpoint
from ldm_inpaint.config import BUNDLED_CONFIGS, ModelConfig, load_config
from ldm_inpaint.errors import CheckpointError
from ldm_inpaint.formats import paddle
from ldm_inpaint.formats.diffusers_names import VAE_LINEAR_AS_CONV, modern_vae_key, unet_names, vae_names
from ldm_inpaint.models.clip import openai_to_openclip
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.schedule import ddpm_buffers
from ldm_inpaint.weight_checks import describe_keys

# The weight files of each component, by preference: full precision, then the fp16 variant, then Paddle's.
_MODEL_FILES = tuple(
    f"diffusion_pytorch_model.{ending}" for ending in ("safetensors", "bin", "fp16.safetensors", "fp16.bin")
)
_TEXT_FILES = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin")
PADDLE_FILE = "model_state.pdparams"
WEIGHT_FILES = {
    "unet": (*_MODEL_FILES, PADDLE_FILE),
    "vae": (*_MODEL_FILES, PADDLE_FILE),
    "text_encoder": (*_TEXT_FILES, PADDLE_FILE),
}
# Our prefix of each component in the original layout (SD1's text encoder: transformers' own names).
ORIGINAL_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "openai": "cond_stage_model.transformer.text_model.",
    "openclip": "cond_stage_model.model.",
}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v"}
POSITION_IDS = "embeddings.position_ids"
UNUSED_OPENCLIP = "OpenCLIP weights SD2 never runs, absent from diffusers' folders (filled with zeros)"


@dataclass
class ModelFolder:
    """A folder read into the original layout: ``entries`` as a checkpoint file would hold them."""

    root: Path
    format: str
    files: dict[str, list[Path]]
    entries: dict[str, Tensor]
    config: ModelConfig
    config_source: str
    skipped: dict[str, list[str]] = field(default_factory=dict)


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a diffusers folder has it for each component") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def _component_config(folder: Path) -> dict:
    for name in ("config.json", "model_config.json"):
        if (folder / name).is_file():
            return _json(folder / name)
    return _json(folder / "config.json")


def detect_folder_config(root: Path) -> str:
    """The bundled config of a folder's model, from ``unet/config.json`` and the scheduler's prediction type."""
    unet = _component_config(root / "unet")
    scheduler = _json(root / "scheduler" / "scheduler_config.json")
    in_channels, context = unet.get("in_channels"), unet.get("cross_attention_dim")
    prediction = scheduler.get("prediction_type", "epsilon")
    kind = {9: "inpainting", 4: "text-to-image"}.get(in_channels, "")
    name = BUNDLED_CONFIGS.get((kind, context))
    if name is not None and prediction == "v_prediction":
        name = "v2-inference-v" if name == "v2-inference" else None
    if name is None:
        raise CheckpointError(
            f"{root}: cannot detect the model from unet/config.json (in_channels {in_channels}, "
            f"cross_attention_dim {context}) and the scheduler's prediction_type {prediction!r}; supported: "
            "9 or 4 channels with 768 (SD1) or 1024 (SD2), v_prediction for SD2 text-to-image. Pass --config"
        )
    return name


def check_scheduler(root: Path, config: ModelConfig) -> None:
    """The folder's training schedule and prediction type must be the config's."""
    path = root / "scheduler" / "scheduler_config.json"
    scheduler = _json(path)
    found = (
        scheduler.get("beta_schedule", "linear"),
        scheduler.get("beta_start"),
        scheduler.get("beta_end"),
        scheduler.get("num_train_timesteps"),
        PREDICTION_TYPES.get(scheduler.get("prediction_type", "epsilon"), "unknown"),
    )
    schedule = config.schedule
    expected = ("scaled_linear", schedule.linear_start, schedule.linear_end, schedule.timesteps)
    if found != (*expected, config.parameterization):
        raise CheckpointError(
            f"{path}: (beta_schedule, beta_start, beta_end, num_train_timesteps, prediction) = {found}, "
            f"config {config.name!r} has {(*expected, config.parameterization)}: the config does not fit"
        )


def weight_files(folder: Path, component: str) -> list[Path]:
    """The files holding a component's weights: the first of :data:`WEIGHT_FILES` that exists (or its
    shards, listed in ``NAME.index.json``)."""
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is missing: a Stable Diffusion folder has unet/, vae/ and text_encoder/"
        )
    for name in WEIGHT_FILES[component]:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = _json(index).get("weight_map", {})
            return sorted({folder / shard for shard in shards.values()})
    raise CheckpointError(
        f"{folder}: no weights; expected one of {', '.join(WEIGHT_FILES[component])} (or a sharded .index.json)"
    )


def read_component(files: list[Path], component: str) -> dict[str, Tensor]:
    """A component's weights under diffusers' / transformers' names, in torch's layout."""
    state: dict[str, Tensor] = {}
    for path in files:
        if path.suffix == ".pdparams":
            state.update(paddle.paddle_to_torch(component, paddle.read_pdparams(path)))
            continue
        entries = read_checkpoint(path)
        tensors = {key: value for key, value in entries.items() if isinstance(value, Tensor)}
        if len(tensors) != len(entries):
            others = sorted(set(entries) - set(tensors))
            raise CheckpointError(f"{path}: expected tensors only, found other entries: {others[:5]}")
        state.update(tensors)
    return state


def _take(state: dict[str, Tensor], names: dict[str, str], prefix: str, folder: Path) -> dict[str, Tensor]:
    """``names`` (our key -> the folder's) applied to ``state``: every name must be there and every entry of
    ``state`` named; entries keyed ``prefix`` + our key."""
    missing = [theirs for theirs in names.values() if theirs not in state]
    unexpected = sorted(set(state) - set(names.values()))
    if missing or unexpected:
        problems = [
            describe_keys(k, what) for k, what in ((missing, "missing"), (unexpected, "unexpected")) if k
        ]
        raise CheckpointError(f"{folder}: the weights do not fit the config: " + "; ".join(problems))
    return {prefix + ours: state[theirs] for ours, theirs in names.items()}


def vae_from_diffusers(
    state: dict[str, Tensor], vae: nn.Module, levels: int, source: Path
) -> dict[str, Tensor]:
    """A diffusers VAE's weights (older attention names accepted) under the keys of ``vae`` (of ``levels``
    resolutions), its attention's linear weights as 1 x 1 convolutions."""
    state = {modern_vae_key(key): value for key, value in state.items()}
    weights = _take(state, vae_names(vae.state_dict(), levels), "", source)
    for key, value in weights.items():
        if VAE_LINEAR_AS_CONV.fullmatch(key) and value.ndim == 2:
            weights[key] = value[:, :, None, None]  # (c, c) -> (c, c, 1, 1)
    return weights


def _text_entries(
    state: dict[str, Tensor], model: LatentDiffusion, config: ModelConfig
) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """The text encoder's entries in the original layout, and what was skipped or filled."""
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    skipped = {"text-encoder position ids (implied by position)": [k for k in state if k == POSITION_IDS]}
    state.pop(POSITION_IDS, None)
    if config.text_encoder.layout == "openai":
        return {ORIGINAL_PREFIXES["openai"] + key: value for key, value in state.items()}, skipped
    prefix = ORIGINAL_PREFIXES["openclip"]
    entries = {prefix + key: value for key, value in openai_to_openclip(state).items()}
    expected = {key: value for key, value in model.state_dict().items() if key.startswith(prefix)}
    last_block = f"{prefix}transformer.resblocks.{config.text_encoder.layers - 1}."
    unused = [
        key
        for key in expected
        if key not in entries
        and (key.startswith(last_block) or key in (prefix + "text_projection", prefix + "logit_scale"))
    ]
    if config.text_encoder.layer == "penultimate" and unused:
        dtype = next(iter(entries.values())).dtype
        entries.update({key: torch.zeros(expected[key].shape, dtype=dtype) for key in unused})
        skipped[UNUSED_OPENCLIP] = unused
    return entries, skipped


def _schedule_buffers(config: ModelConfig) -> dict[str, Tensor]:
    """The original's DDPM buffers of the (checked) scheduler, float32 as original files store them, so that
    a converted folder is a whole original checkpoint."""
    return {key: value.float() for key, value in ddpm_buffers(config.schedule).items()}


def read_folder(path: Path, config: str | Path | ModelConfig | None = None) -> ModelFolder:
    """Read a model folder (see the module docstring) into the original checkpoint layout."""
    root = folder_root(path)
    if not (root / "model_index.json").is_file():
        raise CheckpointError(
            f"{root}: expected a diffusers-format folder (with model_index.json), found none"
        )
    if config is None:
        name, how = detect_folder_config(root), "detected from unet/config.json and the scheduler config"
        config = load_config(name)
    else:
        how = "given"
        config = config if isinstance(config, ModelConfig) else load_config(config)
    check_scheduler(root, config)
    with torch.device("meta"):
        model = LatentDiffusion(config)
    files = {component: weight_files(root / component, component) for component in WEIGHT_FILES}
    states = {component: read_component(paths, component) for component, paths in files.items()}
    unet = _take(
        states["unet"], unet_names(model.model.diffusion_model), ORIGINAL_PREFIXES["unet"], root / "unet"
    )
    vae = model.first_stage_model
    vae_weights = vae_from_diffusers(states["vae"], vae, len(config.autoencoder.ch_mult), root / "vae")
    vae_entries = {ORIGINAL_PREFIXES["vae"] + key: value for key, value in vae_weights.items()}
    text, skipped = _text_entries(states["text_encoder"], model, config)
    paddle_files = any(p.suffix == ".pdparams" for paths in files.values() for p in paths)
    return ModelFolder(
        root=root,
        format="ppdiffusers folder (PaddlePaddle weights)" if paddle_files else "diffusers folder",
        files=files,
        entries={**unet, **vae_entries, **text, **_schedule_buffers(config)},
        config=config,
        config_source=how,
        skipped={kind: keys for kind, keys in skipped.items() if keys},
    )
