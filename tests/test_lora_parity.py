"""LoRA files against diffusers' own loader (``load_lora_weights``, PEFT layers): the same random checkpoint
and the same kohya file, with random A and B on every UNet module and every text-encoder matrix, give the
same UNet outputs and text contexts; diffusers' own writer's (PEFT) file merges to the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ldm_inpaint.checkpoint import build_model
from ldm_inpaint.config import ModelConfig, load_config
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.random_weights import random_checkpoint
from scripts.benchmarking.diffusers_files import diffusers_pipeline

from .conftest import TINY_CONFIGS
from .loras import random_lora, text_shapes, unet_shapes
from .parity import PARITY_RTOL, assert_parity
from .test_lora import assert_same_bits, state, unet_inputs

WEIGHT = 0.7
PROMPT = "a red bench in a park"


def used_layers(config: ModelConfig) -> int:
    """The text encoder layers that diffusers' model has (SD2's stops before the last)."""
    return config.text_encoder.layers - (config.text_encoder.layer == "penultimate")


@pytest.fixture(scope="module", params=["v1", "v2"])
def both(request, tmp_path_factory) -> tuple[InpaintPipeline, object, Path]:
    """Ours and diffusers' pipeline on one random checkpoint, each with one random kohya LoRA at 0.7."""
    config_path = TINY_CONFIGS[request.param]
    config = load_config(config_path)
    checkpoint = random_checkpoint(config, seed=3)
    # our model gets copies: merging changes weights in place, and diffusers' model shares the checkpoint's
    model = build_model({key: value.clone() for key, value in checkpoint.items()}, config).model
    entries = random_lora(
        unet_shapes(model) | text_shapes(model, used_layers(config)), rank=4, alpha=2.0, seed=1
    )
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(entries, path)
    theirs = diffusers_pipeline(config_path, checkpoint)
    theirs.load_lora_weights(dict(entries), adapter_name="style")
    theirs.set_adapters(["style"], [WEIGHT])
    return InpaintPipeline(model, loras=[(path, WEIGHT)]), theirs, path


def test_unet_and_text_encoder_match_diffusers(both) -> None:
    ours, theirs, _ = both
    x, t, context = unet_inputs(ours.model)
    with torch.no_grad():
        actual = ours.unet(x, t, context)
        assert_parity(actual, theirs.unet(x, t, encoder_hidden_states=context).sample)
        expected_context, _ = theirs.encode_prompt(PROMPT, "cpu", 1, False)
        actual_context = ours.encode_prompts([PROMPT])
        assert_parity(actual_context, expected_context)
        applied = ours.loras
        ours.set_loras([])
        # the LoRA's effect is far above the parity bar, so the match says something
        assert (actual - ours.unet(x, t, context)).abs().max() > 1000 * PARITY_RTOL * actual.std()
        assert (actual_context - ours.encode_prompts([PROMPT])).abs().max() > 1000 * PARITY_RTOL
        ours.set_loras([(applied[0].lora.path, WEIGHT)])


def test_diffusers_written_peft_file_merges_as_the_kohya_file(both, tmp_path: Path) -> None:
    ours, theirs, kohya = both
    folder = tmp_path / "peft"
    StableDiffusionInpaintPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(theirs.unet, adapter_name="style"),
        text_encoder_lora_layers=get_peft_model_state_dict(theirs.text_encoder, adapter_name="style"),
        unet_lora_adapter_metadata=theirs.unet.peft_config["style"].to_dict(),
        text_encoder_lora_adapter_metadata=theirs.text_encoder.peft_config["style"].to_dict(),
    )
    (peft_file,) = folder.iterdir()
    merged_from_kohya = state(ours.model)
    ours.set_loras([(peft_file, WEIGHT)])
    try:
        counts = [(lora.unet_modules, lora.text_modules) for lora in ours.loras]
        assert_same_bits(state(ours.model), merged_from_kohya)
    finally:
        ours.set_loras([(kohya, WEIGHT)])
    assert counts == [(len(unet_shapes(ours.model)), 6 * used_layers(ours.config))]
