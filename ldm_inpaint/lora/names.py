"""The names LoRA files give our modules, and the weights those names stand for.

A kohya / AUTOMATIC1111 LoRA file names each adapted module by its path with every dot written as ``_``,
after a prefix per network: ``lora_unet_`` (UNet) or ``lora_te_`` (text encoder). Which paths depends on the
model code that trained it:

- kohya's sd-scripts trains SD1/SD2 on diffusers' UNet, so its files use DIFFUSERS paths
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); diffusers, AUTOMATIC1111
  (``lora_convert.convert_diffusers_name_to_compvis``) and ComfyUI (``comfy/lora.py``, through
  ``unet_to_diffusers``) all read these. We write them.
- files made from the original code use its COMPVIS paths, ours
  (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``); AUTOMATIC1111 and ComfyUI read these too
  (diffusers through ``_maybe_map_sgm_blocks_to_diffusers``). We read both.
- the text encoder always goes by transformers' ``CLIPTextModel`` paths
  (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, ``..._mlp_fc1``), for SD2's OpenCLIP tower too:
  kohya, diffusers and ComfyUI run it as a transformers model. Ours stacks q, k and v in one ``in_proj``
  (:mod:`ldm_inpaint.models.clip`), so a q/k/v module changes one third of its rows.

Since ``_`` also occurs inside names, a file name is never split: every name a module can have is listed
from the model itself and looked up whole, as AUTOMATIC1111 and ComfyUI do.

The diffusers path of a UNet module comes from the one map of the two layouts,
:mod:`ldm_inpaint.formats.diffusers_names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ldm_inpaint.formats.diffusers_names import to_diffusers_path, unet_block_paths
from ldm_inpaint.models.clip import OPENAI_TO_OPENCLIP, TextTransformer
from ldm_inpaint.models.packing import PackedConv2d
from ldm_inpaint.models.unet import (
    BasicTransformerBlock,
    UNetModel,
)

UNET_PREFIX = "lora_unet_"
TEXT_PREFIX = "lora_te_"
# Module types whose weight a LoRA changes: linear layers and convolutions (packed ones for CPU inference).
ADAPTABLE = (nn.Linear, nn.Conv2d, PackedConv2d)


@dataclass(frozen=True)
class Target:
    """The weight a LoRA module changes: ``parameter`` of the module at ``module`` (a path inside the UNet or
    the text transformer, by ``component``); ``part`` (0, 1, 2 = q, k, v) when it changes one third of the
    rows of a stacked ``in_proj`` only."""

    component: Literal["unet", "text"]
    module: str
    parameter: str = "weight"
    part: int | None = None


def file_name(prefix: str, path: str) -> str:
    """A module's name in a LoRA file: the prefix, then its path with ``_`` for ``.``."""
    return prefix + path.replace(".", "_")


def unet_paths(unet: UNetModel) -> dict[str, str]:
    """Our path of every module a LoRA can change -> its diffusers path."""
    blocks = unet_block_paths(unet)
    return {
        path: to_diffusers_path(path, blocks)
        for path, module in unet.named_modules()
        if isinstance(module, ADAPTABLE)
    }


def unet_targets(unet: UNetModel) -> dict[str, Target]:
    """Every file name of a UNet module, in both styles (``lora_unet_`` + diffusers or our path) -> its
    target."""
    targets: dict[str, Target] = {}
    for ours, theirs in unet_paths(unet).items():
        for name in (file_name(UNET_PREFIX, theirs), file_name(UNET_PREFIX, ours)):
            if targets.setdefault(name, Target("unet", ours)) != Target("unet", ours):
                raise AssertionError(f"the LoRA name {name} would stand for two modules")
    return targets


def text_targets(text: TextTransformer) -> dict[str, Target]:
    """Every file name of a text-encoder module (transformers' paths, see the module docstring) -> its
    target. Derived from :data:`~ldm_inpaint.models.clip.OPENAI_TO_OPENCLIP`, the one table of the two
    layouts: its rows for the matrices of each encoder layer."""
    weights = {key for key, value in text.state_dict().items() if value.ndim == 2}
    targets: dict[str, Target] = {}
    for transformers, ours in OPENAI_TO_OPENCLIP:
        if not transformers.startswith("encoder.layers.{i}."):
            continue
        for layer in range(text.params.layers):
            parts = enumerate("qkv") if "{qkv}" in transformers else [(None, "")]
            for part, qkv in parts:
                parameter_path = ours.format(i=layer, p="weight")
                if parameter_path not in weights:
                    continue  # layer norms
                path = transformers.format(i=layer, qkv=qkv, p="weight").removesuffix(".weight")
                module, _, parameter = parameter_path.rpartition(".")
                targets[file_name(TEXT_PREFIX, "text_model." + path)] = Target(
                    "text", module, parameter, part
                )
    return targets


def attention_paths(unet: UNetModel, projections: tuple[str, ...]) -> list[str]:
    """Our paths of the given ``projections`` (e.g. ``attn1.to_q``) in every transformer layer, in order."""
    return [
        f"{path}.{projection}"
        for path, module in unet.named_modules()
        if isinstance(module, BasicTransformerBlock)
        for projection in projections
    ]
