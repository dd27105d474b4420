"""UNet: key layout against the real checkpoints' manifests; parity with diffusers' UNet2DConditionModel.

The oracle gets the same random weights in the original layout (``model.diffusion_model.*``), converted by
diffusers' own original-checkpoint conversion code; both sides load strictly.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ldm_inpaint.config import load_config
from ldm_inpaint.models.unet import UNetModel, UNetParams
from ldm_inpaint.random_weights import random_state_dict

from .conftest import FULL_CONFIGS, MANIFESTS, TINY_CONFIGS
from .oracles import diffusers_unet, original_yaml
from .parity import assert_parity

PREFIX = "model.diffusion_model."


def _meta_unet(params: UNetParams) -> UNetModel:
    with torch.device("meta"):
        return UNetModel(params)


def _check_parity(config_path: Path, in_channels: int, size: int, timesteps: list[float]) -> None:
    """Ours vs diffusers on one random checkpoint; the two models share its tensors (assign=True), so the
    full-size check holds one copy of the weights."""
    params = replace(load_config(config_path).unet, in_channels=in_channels)
    ours = _meta_unet(params)
    shapes = [(PREFIX + key, tuple(value.shape)) for key, value in ours.state_dict().items()]
    checkpoint = random_state_dict(shapes, seed=1)
    ours.load_state_dict(
        {key[len(PREFIX) :]: value for key, value in checkpoint.items()}, strict=True, assign=True
    )
    theirs = diffusers_unet(original_yaml(config_path, in_channels), checkpoint)

    generator = torch.Generator().manual_seed(2)
    batch = len(timesteps)
    x = torch.randn(batch, in_channels, size, size, generator=generator)
    t = torch.tensor(timesteps)
    context = torch.randn(batch, 77, params.context_dim, generator=generator)
    with torch.no_grad():
        actual = ours.eval()(x, t, context)
        expected = theirs(x, t, encoder_hidden_states=context).sample
    max_diff, scale = (actual - expected).abs().max().item(), expected.std().item()
    print(f"{config_path.stem} in={in_channels} t={timesteps}: max diff {max_diff:.3g}, std {scale:.3g}")
    assert_parity(actual, expected)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_key_layout_matches_checkpoint_manifest(version: str) -> None:
    manifest = json.loads(MANIFESTS[version].read_text())
    expected = {
        key: (tuple(shape), dtype) for key, (shape, dtype) in manifest.items() if key.startswith(PREFIX)
    }
    model = _meta_unet(load_config(FULL_CONFIGS[version]).unet)
    actual = {
        PREFIX + key: (tuple(value.shape), str(value.dtype).removeprefix("torch."))
        for key, value in model.state_dict().items()
    }
    assert sorted(set(actual) ^ set(expected)) == []
    assert actual == expected
    assert list(model.buffers()) == [], (
        "buffers would stay on the meta device after load_state_dict(assign=True)"
    )


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_parity_with_diffusers_tiny(version: str) -> None:
    _check_parity(TINY_CONFIGS[version], in_channels=9, size=16, timesteps=[1.0, 500.5, 981.0])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_text_to_image_variant_matches_diffusers_tiny(version: str) -> None:
    """The 4-channel text-to-image UNet, with integer timesteps as a sampler may pass them."""
    _check_parity(TINY_CONFIGS[version], in_channels=4, size=16, timesteps=[1, 981])


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_parity_with_diffusers_full_size(version: str) -> None:
    _check_parity(FULL_CONFIGS[version], in_channels=9, size=32, timesteps=[1.0, 500.5, 981.0])


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 9, 14, 16), r"multiples of 4 .* found 14x16"),
        ((1, 4, 16, 16), r"\(batch, 9, height, width\), found shape \(1, 4, 16, 16\)"),
    ],
)
def test_rejects_bad_input_shape(shape: tuple[int, ...], message: str) -> None:
    params = load_config(TINY_CONFIGS["v1"]).unet
    model = UNetModel(params)
    context = torch.randn(1, 77, params.context_dim)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(shape), torch.tensor([10]), context)
