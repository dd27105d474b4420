"""The one map between diffusers' parameter names and the original checkpoints' (ours, since our module
names are the original keys). A rename table is right here and nowhere else: diffusers' layout is foreign.

- UNet: derived from the UNet's own structure, as diffusers' conversion of original checkpoints does: walking
  the stages in order, a ``Downsample`` closes a level on the way down (diffusers' ``down_blocks.N``), an
  ``Upsample`` on the way up; within a level the k-th residual block is ``resnets.k`` and the transformer
  beside it ``attentions.k``. Any ``channel_mult`` / ``num_res_blocks`` / ``attention_resolutions`` maps
  without a table per model. Inside the transformers both codes agree (``transformer_blocks.0.attn1.to_q``).
- VAE: one table of prefixes; diffusers counts the decoder's levels from the bottom (``up_blocks.0`` is our
  ``up.{levels - 1}``) and stores the mid-block attention's 1 x 1 convolutions as linear layers.
- Text encoder: transformers' ``CLIPTextModel`` names, which are SD1's own file layout (relative to
  ``text_model.``), and through :data:`~ldm_inpaint.models.clip.OPENAI_TO_OPENCLIP` SD2's OpenCLIP layout.

LoRA files name modules by the same UNet paths (:mod:`ldm_inpaint.lora.names`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

from ldm_inpaint.models.unet import Downsample, ResBlock, SpatialTransformer, UNetModel, Upsample

# Inside the UNet's stages the two codes name some layers differently (diffusers' ``ResnetBlock2D``,
# ``Downsample2D``), and outside them all.
UNET_INNER_LAYERS = {
    "resnets": {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    },
    "downsamplers": {"op": "conv"},
}
UNET_TOP_LEVEL = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# Our VAE prefix -> diffusers' ({i}, {j}: indices; {r}: the decoder level counted from the other end).
VAE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{i}.block.{j}.", "decoder.up_blocks.{r}.resnets.{j}."),
    ("decoder.up.{i}.upsample.", "decoder.up_blocks.{r}.upsamplers.0."),
    ("{c}.mid.block_1.", "{c}.mid_block.resnets.0."),
    ("{c}.mid.block_2.", "{c}.mid_block.resnets.1."),
    ("{c}.mid.attn_1.norm.", "{c}.mid_block.attentions.0.group_norm."),
    ("{c}.mid.attn_1.q.", "{c}.mid_block.attentions.0.to_q."),
    ("{c}.mid.attn_1.k.", "{c}.mid_block.attentions.0.to_k."),
    ("{c}.mid.attn_1.v.", "{c}.mid_block.attentions.0.to_v."),
    ("{c}.mid.attn_1.proj_out.", "{c}.mid_block.attentions.0.to_out.0."),
    ("{c}.norm_out.", "{c}.conv_norm_out."),
)
VAE_RESNET_LAYERS = {"nin_shortcut": "conv_shortcut"}
# Our VAE weights that diffusers stores as linear layers: (c, c, 1, 1) here, (c, c) there.
VAE_LINEAR_AS_CONV = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
# diffusers before 0.14 saved the VAE attention under other names; its loader still renames them.
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "c": r"(?P<c>encoder|decoder)"}


def _rename(path: str, table: dict[str, str]) -> str | None:
    """``path`` with its leading components renamed by the first matching entry of ``table``; None if none
    matches."""
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    return None


def unet_block_paths(unet: UNetModel) -> dict[str, str]:
    """Our path of every child of the UNet's stages -> diffusers' path, e.g. ``input_blocks.1.1`` ->
    ``down_blocks.0.attentions.0``, ``output_blocks.2.1`` -> ``up_blocks.0.upsamplers.0``."""
    paths: dict[str, str] = {}
    kinds = {ResBlock: "resnets", SpatialTransformer: "attentions", Downsample: "downsamplers"}
    for ours, theirs, closer in (
        ("input_blocks", "down_blocks", Downsample),
        ("output_blocks", "up_blocks", Upsample),
    ):
        level, index = 0, 0
        stages = getattr(unet, ours)
        for number, stage in enumerate(stages):
            if ours == "input_blocks" and number == 0:
                continue  # conv_in, in UNET_TOP_LEVEL
            for child_number, child in enumerate(stage):
                kind = kinds.get(type(child), "upsamplers")
                position = 0 if kind.endswith("samplers") else index
                paths[f"{ours}.{number}.{child_number}"] = f"{theirs}.{level}.{kind}.{position}"
            if isinstance(stage[-1], closer):
                level, index = level + 1, 0
            else:
                index += 1
    counts = {"resnets": 0, "attentions": 0}
    for number, child in enumerate(unet.middle_block):
        kind = kinds[type(child)]
        paths[f"middle_block.{number}"] = f"mid_block.{kind}.{counts[kind]}"
        counts[kind] += 1
    return paths


def to_diffusers_path(path: str, blocks: dict[str, str]) -> str:
    """Our path of a UNet module or parameter -> diffusers' (``blocks`` from :func:`unet_block_paths`)."""
    top = _rename(path, UNET_TOP_LEVEL)
    if top is not None:
        return top
    parts = path.split(".")
    for length in (3, 2):  # input_blocks.N.M / output_blocks.N.M; middle_block.N
        stage = ".".join(parts[:length])
        if stage in blocks:
            inner = ".".join(parts[length:])
            table = UNET_INNER_LAYERS.get(blocks[stage].split(".")[-2], {})
            inner = _rename(inner, table) or inner
            return f"{blocks[stage]}.{inner}" if inner else blocks[stage]
    raise AssertionError(f"UNet module {path} lies outside the stages diffusers' names know")


def unet_names(unet: UNetModel) -> dict[str, str]:
    """Every state-dict key of ``unet`` (relative to ``model.diffusion_model.``) -> diffusers' key."""
    blocks = unet_block_paths(unet)
    return {key: to_diffusers_path(key, blocks) for key in unet.state_dict()}


@cache
def _prefix_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(_PLACEHOLDERS[s] if n % 2 else re.escape(s) for n, s in enumerate(parts)))


def vae_name(key: str, levels: int) -> str:
    """Our VAE key (relative to ``first_stage_model.``) -> diffusers', for a VAE of ``levels`` resolutions
    (``len(ch_mult)``). Keys outside :data:`VAE_PREFIXES` (``conv_in``, ``quant_conv``, ...) are the same."""
    for ours, theirs in VAE_PREFIXES:
        match = _prefix_pattern(ours).match(key)
        if match is None:
            continue
        fields = match.groupdict()
        if "i" in fields:
            fields["r"] = str(levels - 1 - int(fields["i"]))
        rest = key[match.end() :]
        if "block" in ours:
            rest = _rename(rest, VAE_RESNET_LAYERS) or rest
        return theirs.format(**fields) + rest
    return key


def vae_names(keys: Iterable[str], levels: int) -> dict[str, str]:
    """:func:`vae_name` of every key."""
    return {key: vae_name(key, levels) for key in keys}


def modern_vae_key(key: str) -> str:
    """A diffusers VAE key in today's names (:data:`LEGACY_VAE_ATTENTION` renamed)."""
    head, found, tail = key.partition("mid_block.attentions.0.")
    if not found:
        return key
    return head + found + (_rename(tail, LEGACY_VAE_ATTENTION) or tail)
