from __future__ import annotations

import json
import re
from dataclasses import replace

import open_clip
import pytest
import torch
from torch import Tensor

from ldm_inpaint.config import load_config
from ldm_inpaint.errors import CheckpointError
from ldm_inpaint.models.clip import TextEncoderParams, TextTransformer, openai_to_openclip, openclip_to_openai
from ldm_inpaint.random_weights import random_state_dict
from ldm_inpaint.tokenizer import tokenize

from .conftest import FULL_CONFIGS, MANIFESTS, TINY_CONFIGS
from .oracles import openclip_context, openclip_tower, tiny_text_cfg, transformers_clip
from .parity import assert_parity

SD1_PREFIX = "cond_stage_model.transformer.text_model."
SD2_PREFIX = "cond_stage_model.model."
PROMPTS = [
    "",
    "a photograph of an astronaut riding a horse, highly detailed!!",
    "Café in Tōkyō at night 🙂",
    "an oil painting of a lighthouse on a cliff above a stormy sea, " * 6,  # > 77 tokens: truncated
]


def manifest_shapes(version: str, prefix: str) -> dict[str, tuple[int, ...]]:
    manifest = json.loads(MANIFESTS[version].read_text())
    return {
        key.removeprefix(prefix): tuple(shape)
        for key, (shape, _) in manifest.items()
        if key.startswith(prefix)
    }


def shapes(state_dict: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state_dict.items()}


def random_encoder(params: TextEncoderParams, seed: int = 0) -> tuple[TextTransformer, dict[str, Tensor]]:
    """Ours, built on the meta device and loaded with random weights (returned too: open_clip layout)."""
    with torch.device("meta"):
        model = TextTransformer(params)
    weights = random_state_dict(shapes(model.state_dict()).items(), seed=seed)
    model.load_state_dict(weights, assign=True)
    return model.eval(), weights


# ---- key layout ------------------------------------------------------------------------------------------


def test_sd1_layout_through_the_mapping_matches_the_checkpoint() -> None:
    with torch.device("meta"):
        model = TextTransformer(load_config(FULL_CONFIGS["v1"]).text_encoder)
    assert shapes(openclip_to_openai(model.state_dict())) == manifest_shapes("v1", SD1_PREFIX)


def test_sd2_layout_matches_the_checkpoint_directly() -> None:
    with torch.device("meta"):
        model = TextTransformer(load_config(FULL_CONFIGS["v2"]).text_encoder)
    assert shapes(model.state_dict()) == manifest_shapes("v2", SD2_PREFIX)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nothing_left_on_meta_after_assign_load(version: str) -> None:
    model, _ = random_encoder(load_config(TINY_CONFIGS[version]).text_encoder)
    assert not any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])
    assert model(tokenize(["a cat"], pad_token=0).ids).shape == (1, 77, 32)


# ---- the SD1 key mapping ---------------------------------------------------------------------------------


def test_mapping_round_trips_both_ways() -> None:
    _, ours = random_encoder(load_config(TINY_CONFIGS["v1"]).text_encoder)
    openai = openclip_to_openai(ours)
    for start, back in [
        (ours, openai_to_openclip(openai)),
        (openai, openclip_to_openai(openai_to_openclip(openai))),
    ]:
        assert start.keys() == back.keys()
        assert all(torch.equal(start[key], back[key]) for key in start)


def test_mapping_stacks_q_k_v_in_that_order() -> None:
    _, ours = random_encoder(load_config(TINY_CONFIGS["v1"]).text_encoder)
    openai = openclip_to_openai(ours)
    in_proj = ours["transformer.resblocks.2.attn.in_proj_weight"]
    expected = [openai[f"encoder.layers.2.self_attn.{name}_proj.weight"] for name in "qkv"]
    assert torch.equal(in_proj, torch.cat(expected))
    assert torch.equal(ours["positional_embedding"], openai["embeddings.position_embedding.weight"])


@pytest.mark.parametrize(
    ("convert", "key"),
    [
        (openai_to_openclip, "encoder.layers.0.self_attn.qq_proj.weight"),
        (openai_to_openclip, "embeddings.position_ids"),
        (openai_to_openclip, "text_model.final_layer_norm.weight"),
        (openclip_to_openai, "text_projection"),
        (openclip_to_openai, "transformer.resblocks.0.attn.in_proj_weights"),
    ],
)
def test_unknown_key_is_an_error_naming_it(convert, key: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(f"unknown text encoder key '{key}'")):
        convert({key: torch.zeros(3, 2)})


def test_missing_projection_is_an_error() -> None:
    incomplete = {f"encoder.layers.0.self_attn.{name}_proj.bias": torch.zeros(4) for name in "qv"}
    with pytest.raises(CheckpointError, match=r"q, k and v projections; found only \['q', 'v'\]"):
        openai_to_openclip(incomplete)


# ---- parity with the original implementations ------------------------------------------------------------


def sd1_parity(params: TextEncoderParams) -> None:
    """Ours vs transformers' CLIPTextModel (the SD1 original) on the same random weights, SD1 tokens."""
    ours, weights = random_encoder(params, seed=1)
    reference = transformers_clip(params, openclip_to_openai(weights))
    del weights
    tokens = tokenize(PROMPTS, pad_token=params.pad_token).ids
    with torch.no_grad():
        expected = reference(input_ids=tokens).last_hidden_state
        del reference
        assert_parity(ours(tokens), expected)


def sd2_parity(params: TextEncoderParams, text_cfg: dict) -> None:
    """Ours vs the original FrozenOpenCLIPEmbedder computation on open_clip's text tower, same weights."""
    ours, weights = random_encoder(params, seed=2)
    tower = openclip_tower(params, text_cfg, weights)
    del weights
    tokens = tokenize(PROMPTS, pad_token=params.pad_token).ids
    assert torch.equal(tokens, open_clip.tokenize(PROMPTS))
    with torch.no_grad():
        expected = openclip_context(tower, tokens, params.layer)
        del tower
        assert_parity(ours(tokens), expected)


def test_sd1_parity_tiny() -> None:
    sd1_parity(load_config(TINY_CONFIGS["v1"]).text_encoder)


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_sd2_parity_tiny(layer: str) -> None:
    params = replace(load_config(TINY_CONFIGS["v2"]).text_encoder, layer=layer)
    sd2_parity(params, tiny_text_cfg(params))


@pytest.mark.slow
def test_sd1_parity_full() -> None:
    sd1_parity(load_config(FULL_CONFIGS["v1"]).text_encoder)


@pytest.mark.slow
def test_sd2_parity_full() -> None:
    params = load_config(FULL_CONFIGS["v2"]).text_encoder
    assert params.layer == "penultimate"
    # The ViT-H-14 text tower exactly as open_clip defines it.
    sd2_parity(params, open_clip.get_model_config("ViT-H-14")["text_cfg"])
