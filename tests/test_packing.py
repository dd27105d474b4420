"""Pre-packed oneDNN convolutions and the release of memory-mapped file pages.

- a packed UNet / VAE computes what the plain one does (the parity bar in float32; in bfloat16 the packed and
  plain results differ by less than bfloat16's own error against float32);
- packing keeps the state dict (same keys, bit-identical values), loads new weights, and unpacks back to
  ``nn.Conv2d`` bit-identically;
- what cannot be packed, or is fed to a packed model in the wrong dtype, is a clear error;
- a whole pipeline run loaded packed (the CPU default) matches the same file loaded plain; ``compile`` wraps
  the UNet that the denoiser calls;
- ``release_file_pages`` gives back the pages of memory-mapped weights only, and the values read afterwards
  are still the file's; a model cast to bfloat16 from a mapped file holds exactly the cast weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm_inpaint.checkpoint import build_model, load_model
from ldm_inpaint.checkpoint_files import read_checkpoint
from ldm_inpaint.compile import compile_unet
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.models.autoencoder import AutoencoderKL
from ldm_inpaint.models.packing import PackedConv2d, can_pack, pack_convolutions, unpack_convolutions
from ldm_inpaint.models.unet import UNetModel
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.random_weights import random_checkpoint
from ldm_inpaint.runtime import release_file_pages

from .conftest import FULL_CONFIGS, TINY_CONFIGS
from .parity import assert_parity
from .test_pipeline import PROMPT, sample_image, sample_mask
from .test_precision import random_module


def unet_inputs(config_version: str, dtype: torch.dtype = torch.float32) -> tuple[UNetModel, tuple]:
    params = load_config(TINY_CONFIGS[config_version]).unet
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, params.in_channels, 16, 16, generator=generator)
    context = torch.randn(2, 77, params.context_dim, generator=generator)
    t = torch.tensor([999.0, 250.0])
    return random_module(UNetModel, params).to(dtype), (x.to(dtype), t, context.to(dtype))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_packed_unet_matches_the_plain_one(version: str) -> None:
    unet, inputs = unet_inputs(version)
    packed = copy.deepcopy(unet)
    count = pack_convolutions(packed)
    assert count == sum(isinstance(m, nn.Conv2d) for m in unet.modules()) > 10
    assert not any(isinstance(m, nn.Conv2d) for m in packed.modules())
    with torch.inference_mode():
        assert_parity(packed(*inputs), unet(*inputs))


def test_packed_vae_matches_the_plain_one() -> None:
    vae = random_module(AutoencoderKL, load_config(TINY_CONFIGS["v1"]).autoencoder)
    packed = copy.deepcopy(vae)
    pack_convolutions(packed)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.inference_mode():
        assert_parity(packed.encode(image).mean, vae.encode(image).mean)
        latent = vae.encode(image).mean
        assert_parity(packed.decode(latent), vae.decode(latent))


def test_packed_bf16_is_as_close_to_float32_as_plain_bf16() -> None:
    reference, inputs = unet_inputs("v1")
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    if not can_pack("cpu", torch.bfloat16):
        # A CPU without oneDNN's bfloat16 kernels (AVX2 only): nothing is packed, and loading keeps plain
        # convolutions (``can_pack`` is what the loader asks).
        with pytest.raises(LdmInpaintError, match="this CPU has no bfloat16 kernels"):
            pack_convolutions(packed)
        return
    pack_convolutions(packed)
    half_inputs = tuple(v.to(torch.bfloat16) if v.is_floating_point() and v.ndim > 1 else v for v in inputs)
    with torch.inference_mode():
        expected = reference(*inputs)
        plain_error = (plain(*half_inputs).float() - expected).abs().mean()
        packed_error = (packed(*half_inputs).float() - expected).abs().mean()
    assert packed(*half_inputs).dtype == torch.bfloat16
    assert packed_error <= 1.5 * plain_error
    assert plain_error < 0.05 * expected.std()


def test_state_dict_is_kept_and_new_weights_load() -> None:
    unet, inputs = unet_inputs("v2")
    packed = copy.deepcopy(unet)
    pack_convolutions(packed)
    plain_state, packed_state = unet.state_dict(), packed.state_dict()
    assert list(packed_state) == list(plain_state)
    assert all(torch.equal(packed_state[key], plain_state[key]) for key in plain_state)

    other, _ = unet_inputs("v2")
    other.load_state_dict({key: value * 0.5 for key, value in plain_state.items()})
    packed.load_state_dict(other.state_dict(), strict=True)
    with torch.inference_mode():
        packed_output = packed(*inputs)
        assert_parity(packed_output, other(*inputs))

    twin = copy.deepcopy(packed)
    unpack_convolutions(packed)
    assert not any(isinstance(m, PackedConv2d) for m in packed.modules())
    with torch.inference_mode():
        assert torch.equal(packed(*inputs), other(*inputs))
        assert torch.equal(twin(*inputs), packed_output)


def test_wrong_shape_in_a_packed_load_is_reported() -> None:
    unet, _ = unet_inputs("v1")
    pack_convolutions(unet)
    state = unet.state_dict()
    state["out.2.weight"] = state["out.2.weight"][:, :1]
    with pytest.raises(RuntimeError, match=r"out\.2\.weight: expected shape"):
        unet.load_state_dict(state)


def test_what_cannot_pack_is_a_clear_error() -> None:
    unet, inputs = unet_inputs("v1", torch.float16)
    with pytest.raises(LdmInpaintError, match=r"float32, or in bfloat16 .* found torch\.float16 on cpu"):
        pack_convolutions(unet)
    conv = PackedConv2d(nn.Conv2d(4, 8, 3, padding=1))
    with pytest.raises(LdmInpaintError, match=r"run on CPU in torch\.float32, found a torch\.bfloat16 input"):
        conv(torch.zeros(1, 4, 8, 8, dtype=torch.bfloat16))


def test_release_file_pages_touches_only_mapped_tensors(tmp_path: Path) -> None:
    weights = {"a": torch.randn(512, 1024), "b": torch.randn(3)}
    path = tmp_path / "weights.ckpt"
    torch.save(weights, path)
    mapped = read_checkpoint(path)
    assert mapped["a"].sum().item() == pytest.approx(weights["a"].sum().item())
    released = release_file_pages(mapped["a"], path)
    assert released >= 512 * 1024 * 4 - 2 * 4096 > 0
    assert torch.equal(mapped["a"], weights["a"])  # read back from the file
    assert release_file_pages(mapped["a"], tmp_path / "other.ckpt") == 0
    in_memory = weights["a"].clone()
    assert release_file_pages(in_memory, path) == 0
    assert torch.equal(in_memory, weights["a"])


def test_a_cast_load_from_a_mapped_file_holds_the_cast_weights(tmp_path: Path) -> None:
    config = load_config(TINY_CONFIGS["v1"])
    checkpoint = random_checkpoint(config, seed=5)
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": checkpoint}, path)
    cast = load_model(path, config, dtype=torch.bfloat16).model.state_dict()
    expected = build_model(checkpoint, config, dtype=torch.bfloat16).model.state_dict()
    assert list(cast) == list(expected)
    assert all(torch.equal(cast[key], expected[key]) for key in expected)
    assert all(value.dtype == torch.bfloat16 for value in cast.values() if value.is_floating_point())


def run_pipelines(config_path: Path, tmp_path: Path, size: int, steps: int) -> None:
    """A whole run of the pipeline loaded with packed convolutions (the CPU default) against the same file
    loaded plain: the parity bar on the final latents and the images."""
    config = load_config(config_path)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": random_checkpoint(config, seed=3)}, path)
    packed = InpaintPipeline.from_checkpoint(path, config)
    plain = InpaintPipeline.from_checkpoint(path, config, pack=False)
    assert any(isinstance(m, PackedConv2d) for m in packed.model.first_stage_model.modules())
    assert not any(isinstance(m, PackedConv2d) for m in plain.model.modules())
    image, mask = sample_image(size), sample_mask(size)
    options = {"negative_prompt": "blurry", "steps": steps, "seed": 7}
    expected, actual = (
        plain(image, mask, prompt=PROMPT, **options),
        packed(image, mask, prompt=PROMPT, **options),
    )
    assert_parity(actual.latents, expected.latents)
    assert_parity(actual.images, expected.images)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_packed_pipeline_run_matches_the_plain_one_tiny(version: str, tmp_path: Path) -> None:
    run_pipelines(TINY_CONFIGS[version], tmp_path, size=64, steps=5)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_packed_pipeline_run_matches_the_plain_one_full_size(version: str, tmp_path: Path) -> None:
    run_pipelines(FULL_CONFIGS[version], tmp_path, size=256, steps=5)


@pytest.mark.slow
def test_compiled_frozen_unet_matches_eager_tiny() -> None:
    # A real inductor compile (with weight freezing on CPU), so the slow suite: about a minute on 2 cores.
    model = build_model(random_checkpoint(load_config(TINY_CONFIGS["v1"]), seed=3), TINY_CONFIGS["v1"]).model
    unet = model.model.diffusion_model
    compiled = compile_unet(unet)
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 9, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.inference_mode():
        for t in (torch.tensor([999, 999]), torch.tensor([10, 10])):
            assert_parity(compiled(x, t, context), unet(x, t, context))


def test_compile_wraps_the_unet_the_denoiser_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor import config as inductor_config

    model = build_model(random_checkpoint(load_config(TINY_CONFIGS["v1"]), seed=3), TINY_CONFIGS["v1"]).model
    compiled, freezing = [], []

    def fake_compile(module: nn.Module) -> Callable[..., torch.Tensor]:
        compiled.append(module)
        return lambda *args: freezing.append(inductor_config.freezing) or module(*args)

    monkeypatch.setattr(torch, "compile", fake_compile)
    pipeline = InpaintPipeline(model, compile=True)
    assert compiled == [model.model.diffusion_model]
    unet = model.model.diffusion_model
    x, t, context = torch.randn(1, 9, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.inference_mode():
        assert torch.equal(pipeline.unet(x, t, context), unet(x, t, context))
    # On CPU the compiled UNet runs under inductor's weight freezing, and only inside its own calls.
    assert freezing == [True] and not inductor_config.freezing
    assert InpaintPipeline(model).unet is unet and len(compiled) == 1
