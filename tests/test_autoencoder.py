"""AutoencoderKL: key layout against the real checkpoints' manifests, numerical parity with diffusers'
``AutoencoderKL`` on random weights in the original layout (converted by diffusers' own single-file code),
and the posterior's statistics."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from ldm_inpaint.config import load_config
from ldm_inpaint.errors import ConfigError
from ldm_inpaint.models.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm_inpaint.random_weights import random_state_dict

from .conftest import FULL_CONFIGS, MANIFESTS, TINY_CONFIGS
from .oracles import diffusers_vae, original_yaml
from .parity import assert_parity

PREFIX = "first_stage_model."
# The v1 and v2 VAEs share one architecture: different weights make the second parity test add evidence.
SEEDS = {"v1": 0, "v2": 1}


def build_pair(config_path: Path, seed: int) -> tuple[AutoencoderKL, DiffusersAutoencoderKL]:
    """Ours and diffusers' VAE holding the same random weights, drawn in the original checkpoint layout."""
    with torch.device("meta"):
        ours = AutoencoderKL(load_config(config_path).autoencoder)
    checkpoint = random_state_dict(((PREFIX + key, t.shape) for key, t in ours.state_dict().items()), seed)
    ours.load_state_dict(
        {key.removeprefix(PREFIX): t for key, t in checkpoint.items()}, strict=True, assign=True
    )
    return ours.eval(), diffusers_vae(original_yaml(config_path), checkpoint)


def parity_outputs(
    config_path: Path, height: int, width: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(ours, diffusers) for the posterior mean and log-variance of a batch of images and the decoding of a
    batch of latents; non-square, so that a height/width mix-up shows."""
    ours, theirs = build_pair(config_path, seed)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, height, width, generator=generator) * 2 - 1
    f = ours.downscale_factor
    z = torch.randn(2, ours.params.embed_dim, height // f, width // f, generator=generator)
    with torch.no_grad():
        posterior, reference = ours.encode(x), theirs.encode(x).latent_dist
        return {
            "mean": (posterior.mean, reference.mean),
            "logvar": (posterior.logvar, reference.logvar),
            "decode": (ours.decode(z), theirs.decode(z).sample),
        }


def check_parity(config_path: Path, height: int, width: int, seed: int) -> None:
    for actual, expected in parity_outputs(config_path, height, width, seed).values():
        assert_parity(actual, expected)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_key_layout_matches_checkpoint_manifest(version: str) -> None:
    with torch.device("meta"):
        model = AutoencoderKL(load_config(FULL_CONFIGS[version]).autoencoder)
    manifest = json.loads(MANIFESTS[version].read_text())
    expected = [(key, shape) for key, (shape, _) in manifest.items() if key.startswith(PREFIX)]
    assert len(expected) == 248
    assert [(PREFIX + key, list(t.shape)) for key, t in model.state_dict().items()] == expected
    assert list(model.buffers()) == []


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_parity_with_diffusers_tiny(version: str) -> None:
    check_parity(TINY_CONFIGS[version], height=32, width=48, seed=SEEDS[version])


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_parity_with_diffusers_full(version: str) -> None:
    check_parity(FULL_CONFIGS[version], height=256, width=192, seed=SEEDS[version])


def test_encode_rejects_sizes_that_do_not_downscale() -> None:
    model = AutoencoderKL(load_config(TINY_CONFIGS["v1"]).autoencoder)
    with pytest.raises(ValueError, match=r"multiples of 8 .* found 64x60"):
        model.encode(torch.zeros(1, 3, 64, 60))
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\), found \(1, 4, 64, 64\)"):
        model.encode(torch.zeros(1, 4, 64, 64))


def test_single_moment_autoencoder_is_rejected() -> None:
    params = replace(load_config(TINY_CONFIGS["v1"]).autoencoder, double_z=False)
    with pytest.raises(ConfigError, match="double_z"):
        AutoencoderKL(params)


def test_diagonal_gaussian() -> None:
    mean = torch.linspace(-3, 3, 256).expand(2, 4, 256, 256)
    logvar = torch.full_like(mean, math.log(0.25))
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert torch.equal(posterior.mode(), mean)
    assert torch.allclose(posterior.std, torch.full_like(mean, 0.5))

    sample = posterior.sample(torch.Generator().manual_seed(7))
    assert torch.equal(sample, posterior.sample(torch.Generator().manual_seed(7)))
    assert not torch.equal(sample, posterior.sample(torch.Generator().manual_seed(8)))
    noise = (sample - mean) / 0.5
    count = noise.numel()
    assert abs(noise.mean().item()) < 5 / math.sqrt(count)
    assert abs(noise.std().item() - 1) < 5 / math.sqrt(2 * count)

    out_of_range = torch.tensor([-100.0, -30.5, 19.5, 100.0]).view(1, 4, 1, 1)
    clamped = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 1, 1), out_of_range], dim=1)).logvar
    assert clamped.flatten().tolist() == [-30.0, -30.0, 19.5, 20.0]


def tiny_vae() -> AutoencoderKL:
    ours, _ = build_pair(TINY_CONFIGS["v1"], seed=0)
    return ours


def test_inference_overwrites_temporaries_without_changing_values() -> None:
    """Under inference the blocks write silu and the residual sums into their own temporaries; the values
    are those of the autograd path, bit for bit, and gradients still flow when autograd is on."""
    vae = tiny_vae()
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 64, 48, generator=generator) * 2 - 1
    z = torch.randn(1, 4, 8, 6, generator=generator)
    with torch.inference_mode():
        fast_mean, fast_image = vae.encode(x).mean, vae.decode(z)
    vae.requires_grad_(True)
    z_grad = z.clone().requires_grad_(True)
    image = vae.decode(z_grad)
    assert torch.equal(vae.encode(x).mean.detach(), fast_mean)
    assert torch.equal(image.detach(), fast_image)
    image.square().mean().backward()
    assert z_grad.grad is not None and torch.isfinite(z_grad.grad).all() and z_grad.grad.abs().sum() > 0
    assert all(p.grad is not None for p in vae.decoder.parameters())


@pytest.mark.parametrize("scope", ["module", "global"])
def test_forward_hooks_keep_the_outputs_they_saw(scope: str) -> None:
    """A forward hook may keep a reference to a norm's or a conv's output (to record activations): those
    outputs are then left as computed, not overwritten by the swish or the residual sum that follow."""
    vae = tiny_vae()
    block = vae.decoder.mid.block_1
    seen: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor], output: torch.Tensor) -> None:
            if module is getattr(block, name):
                inputs[name], seen[name] = args[0].clone(), output

        return hook

    handles = []
    for name in ("norm1", "conv2"):
        hook = keep(name)
        if scope == "module":
            handles.append(getattr(block, name).register_forward_hook(hook))
        else:
            handles.append(torch.nn.modules.module.register_module_forward_hook(hook))
    try:
        with torch.inference_mode():
            vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)))
            expected_norm = block.norm1(inputs["norm1"])
            expected_conv = block.conv2(inputs["conv2"])
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(seen["norm1"], expected_norm)
    assert torch.equal(seen["conv2"], expected_conv)
