"""The CLIP text transformer behind both text encoders (SD1: OpenAI ViT-L/14, SD2: OpenCLIP ViT-H/14).

The text tower of CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", 2021, Sec. 2.4): token + learned positional embeddings, a stack of pre-norm residual blocks
(causally masked multi-head self-attention, then a 4x-wide MLP), and a final LayerNorm. Stable Diffusion uses
the per-token hidden states as the UNet's cross-attention context, not the pooled CLIP embedding:

- SD1 (``FrozenCLIPEmbedder``): transformers' ``last_hidden_state`` = ``final_layer_norm`` of the last block;
  quick_gelu MLP.
- SD2 (``FrozenOpenCLIPEmbedder``, ``layer: penultimate``): every block except the last, then ``ln_final``;
  gelu MLP. ``text_projection`` and ``logit_scale`` are in the checkpoint but unused.

Attribute names are open_clip's, so SD2's ``cond_stage_model.model.*`` keys load as they are; SD1's
transformers keys go through the one table :data:`OPENAI_TO_OPENCLIP`. LayerNorm eps is 1e-5 in both originals
(torch's default in open_clip, ``layer_norm_eps`` of the ViT-L/14 transformers config).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_inpaint.errors import CheckpointError
from ldm_inpaint.models.attention import attention


@dataclass(frozen=True)
class TextEncoderParams:
    """One CLIP text tower.

    ``layout`` names the key layout of the checkpoint: ``"openai"`` = transformers' ``CLIPTextModel`` keys
    under ``cond_stage_model.transformer.text_model.`` (SD1), ``"openclip"`` = open_clip keys under
    ``cond_stage_model.model.`` (SD2). ``layer`` is which hidden state is the context: the output of the last
    block or of the penultimate one, in both cases followed by the final layer norm.
    """

    layout: Literal["openai", "openclip"]
    width: int
    layers: int
    heads: int
    activation: Literal["quick_gelu", "gelu"]
    layer: Literal["last", "penultimate"]
    pad_token: int
    vocab_size: int = 49408
    context_length: int = 77
    projection_dim: int = 0


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters: one ``in_proj`` holding the q, k
    and v projections stacked in that order, and ``out_proj``. Token i attends to tokens 0..i only."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        # (b, n, width) -> 3 x (b, n, width)
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(attention(q, k, v, self.heads, causal=True))


class MLP(nn.Module):
    """c_proj(activation(c_fc(x))), hidden width 4 x width."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, activation: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = MLP(width, activation)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Token ids (b, context_length) -> context (b, context_length, width), see the module docstring."""

    def __init__(self, params: TextEncoderParams) -> None:
        super().__init__()
        self.params = params
        width = params.width
        # Zeros, as the positional embedding: the weights come from a checkpoint. (nn.Embedding's own N(0, 1)
        # init runs torch._refs on the meta device, which imports torch._dynamo: 0.17 GiB of resident memory.)
        self.token_embedding = nn.Embedding(
            params.vocab_size, width, _weight=torch.zeros(params.vocab_size, width)
        )
        self.positional_embedding = nn.Parameter(torch.zeros(params.context_length, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, params.heads, params.activation) for _ in range(params.layers)
        )
        self.ln_final = nn.LayerNorm(width, eps=1e-5)
        if params.projection_dim > 0:
            # Stored in SD2 checkpoints for the CLIP contrastive head; the context does not use them.
            self.text_projection = nn.Parameter(torch.zeros(width, params.projection_dim))
            self.logit_scale = nn.Parameter(torch.zeros(()))

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.params.context_length:
            expected = f"(batch, {self.params.context_length})"
            raise ValueError(f"expected token ids of shape {expected}, found {tuple(tokens.shape)}")
        # (b, n) -> (b, n, width)
        x = self.token_embedding(tokens) + self.positional_embedding
        used_blocks = self.params.layers - (1 if self.params.layer == "penultimate" else 0)
        for block in self.transformer.resblocks[:used_blocks]:
            x = block(x)
        return self.ln_final(x)


# SD1 checkpoints store the text tower in transformers' CLIPTextModel layout (keys relative to
# ``text_model.``); ours is open_clip's (relative to ``model.``). One row per parameter: transformers name ->
# open_clip name, where ``{i}`` is a block index and ``{p}`` is ``weight`` or ``bias``. The ``{qkv}`` row is
# not a rename: transformers keeps separate q, k, v projections that open_clip stacks, in q, k, v order, into
# one ``in_proj``.
OPENAI_TO_OPENCLIP: tuple[tuple[str, str], ...] = (
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("encoder.layers.{i}.layer_norm1.{p}", "transformer.resblocks.{i}.ln_1.{p}"),
    ("encoder.layers.{i}.self_attn.{qkv}_proj.{p}", "transformer.resblocks.{i}.attn.in_proj_{p}"),
    ("encoder.layers.{i}.self_attn.out_proj.{p}", "transformer.resblocks.{i}.attn.out_proj.{p}"),
    ("encoder.layers.{i}.layer_norm2.{p}", "transformer.resblocks.{i}.ln_2.{p}"),
    ("encoder.layers.{i}.mlp.fc1.{p}", "transformer.resblocks.{i}.mlp.c_fc.{p}"),
    ("encoder.layers.{i}.mlp.fc2.{p}", "transformer.resblocks.{i}.mlp.c_proj.{p}"),
    ("final_layer_norm.{p}", "ln_final.{p}"),
)
_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "qkv": r"(?P<qkv>[qkv])"}
_QKV_ORDER = ("q", "k", "v")  # the stacking order of in_proj


@cache
def _compile(template: str) -> re.Pattern[str]:
    # re.split with a group alternates literal text and placeholder names.
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(_PLACEHOLDERS[s] if n % 2 else re.escape(s) for n, s in enumerate(parts)))


def _lookup(key: str, column: int, layout: str) -> tuple[str, dict[str, str]]:
    """The other layout's template for ``key`` (looked up in ``column`` of the table) and the placeholders."""
    for row in OPENAI_TO_OPENCLIP:
        match = _compile(row[column]).fullmatch(key)
        if match:
            return row[1 - column], match.groupdict()
    known = [row[column] for row in OPENAI_TO_OPENCLIP]
    raise CheckpointError(f"unknown text encoder key {key!r} in the {layout} layout; known keys: {known}")


def openai_to_openclip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``CLIPTextModel`` keys (relative to ``text_model.``) -> ours / open_clip's (relative to
    ``model.``). Any key outside :data:`OPENAI_TO_OPENCLIP` is a :class:`CheckpointError`."""
    converted: dict[str, Tensor] = {}
    stacked: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        template, fields = _lookup(key, 0, "transformers CLIPTextModel")
        if "qkv" in fields:
            stacked.setdefault(template.format(**fields), {})[fields["qkv"]] = tensor
        else:
            converted[template.format(**fields)] = tensor
    for key, parts in stacked.items():
        if set(parts) != set(_QKV_ORDER):
            raise CheckpointError(
                f"text encoder {key!r} needs the q, k and v projections; found only {sorted(parts)}"
            )
        # 3 x (width, ...) -> (3 * width, ...)
        converted[key] = torch.cat([parts[name] for name in _QKV_ORDER])
    return converted


def openclip_to_openai(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The exact inverse of :func:`openai_to_openclip`: ours / open_clip's keys -> transformers
    ``CLIPTextModel`` keys. Any key outside :data:`OPENAI_TO_OPENCLIP` (e.g. ``text_projection``) is a
    :class:`CheckpointError`."""
    converted: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        template, fields = _lookup(key, 1, "open_clip")
        if "{qkv}" not in template:
            converted[template.format(**fields)] = tensor
            continue
        if tensor.shape[0] % 3:
            shape = tuple(tensor.shape)
            raise CheckpointError(
                f"text encoder {key!r} must stack q, k and v (3 equal parts); found {shape}"
            )
        # (3 * width, ...) -> 3 x (width, ...), each its own storage so the dict can be saved as safetensors
        for name, part in zip(_QKV_ORDER, tensor.chunk(3), strict=True):
            converted[template.format(qkv=name, **fields)] = part.clone()
    return converted
