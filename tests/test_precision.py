"""Half precision and low-memory attention.

- fp16 attention cannot overflow: q k^T far beyond float16's range gives the float32 answer (both CPU SDPA
  backends; naive fp16 attention gives inf/NaN on the same inputs);
- sliced attention equals whole attention (1e-6 absolute on unit-scale outputs), in the kernel and through
  ``set_attention_slicing`` on a UNet and a VAE; float32 without slicing is bitwise the plain SDPA call;
- bf16 and fp16 pipelines on the tiny random checkpoints give finite images close to float32 (tolerances
  below; measured on 5-step DDIM runs: bf16 mean |diff| 0.023-0.024 x the image std, max 0.16-0.21 x; fp16
  0.003 x and 0.03 x), and so do single full-size UNet and VAE passes under -m slow (bf16 0.013-0.014 x and
  0.06-0.14 x; fp16 0.008-0.009 x and 0.04-0.07 x);
- a VAE whose half-precision pass overflows is run again in float32, with exactly one note, and the result
  is that float32 pass; non-finite values that float32 cannot fix raise ``LdmInpaintError``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm_inpaint.checkpoint import build_model
from ldm_inpaint.conditioning import mask_image
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.models.attention import attention, set_attention_slicing
from ldm_inpaint.models.autoencoder import AttnBlock, AutoencoderKL
from ldm_inpaint.models.tiling import decode_tiled
from ldm_inpaint.models.unet import CrossAttention, UNetModel
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.random_weights import random_checkpoint, random_state_dict

from .conftest import FULL_CONFIGS, TINY_CONFIGS
from .parity import assert_parity
from .test_pipeline import PROMPT, sample_image, sample_mask

# Half precision vs float32, as fractions of the float32 output's std: (mean |diff|, max |diff|).
HALF_TOLERANCE = {torch.bfloat16: (0.05, 0.4), torch.float16: (0.02, 0.2)}
# The note the pipeline gives when a half-precision VAE pass is redone in float32.
FALLBACK_WARNING = "VAE {} gave NaN/inf in float16 (overflow): redone in float32"
# The weight scale that makes the tiny VAE overflow in fp16 (a power of two: exact in both dtypes).
OVERFLOW_SCALE = 2.0**15


def random_module(module_type: type, params: object, seed: int = 0) -> torch.nn.Module:
    with torch.device("meta"):
        module = module_type(params)
    weights = random_state_dict(((key, t.shape) for key, t in module.state_dict().items()), seed)
    module.load_state_dict(weights, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def qkv(n: int, m: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, length, width, generator=generator) for length in (n, m, m))


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_fp16_attention_does_not_overflow(backend: SDPBackend) -> None:
    q, k, v = qkv(64, 48, 2 * 64)
    # Raw dot products up to ~2e5 (float16 ends at 65504), as in SD2's UNet under fp16.
    q, k, v = (80 * q).half(), (80 * k).half(), v.half()
    head_q, head_k = q[..., :64], k[..., :64]
    assert torch.isinf(head_q @ head_k.transpose(1, 2)).any()  # naive fp16 scores overflow
    with sdpa_kernel(backend):
        out = attention(q, k, v, heads=2)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    expected = attention(q.float(), k.float(), v.float(), heads=2)
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=1e-2)


def test_float32_attention_is_the_plain_sdpa_call() -> None:
    q, k, v = qkv(50, 30, 2 * 16)
    split = lambda t: t.unflatten(-1, (2, 16)).transpose(1, 2)  # noqa: E731
    expected = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
    assert torch.equal(attention(q, k, v, heads=2), expected)
    assert torch.equal(attention(q, k, v, heads=2, slice_size=50), expected)


@pytest.mark.parametrize("slice_size", [1, 7, 49])
@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_sliced_attention_matches_whole(slice_size: int, backend: SDPBackend) -> None:
    q, k, v = qkv(50, 30, 2 * 16)
    with sdpa_kernel(backend):
        whole = attention(q, k, v, heads=2)
        sliced = attention(q, k, v, heads=2, slice_size=slice_size)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-6)


def test_sliced_causal_attention_is_refused() -> None:
    q, k, v = qkv(10, 10, 16)
    with pytest.raises(ValueError, match="non-causal"):
        attention(q, k, v, heads=1, causal=True, slice_size=4)


def test_set_attention_slicing_on_unet_and_vae() -> None:
    config = load_config(TINY_CONFIGS["v1"])
    unet = random_module(UNetModel, config.unet)
    vae = random_module(AutoencoderKL, config.autoencoder)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 9, 16, 16, generator=generator)
    t, context = torch.tensor([500]), torch.randn(1, 77, 32, generator=generator)
    z = torch.randn(1, 4, 16, 16, generator=generator)
    with torch.no_grad():
        whole = unet(x, t, context), vae.decode(z)
        for model in (unet, vae):
            set_attention_slicing(model, 5)
        attention_modules = [
            m for m in [*unet.modules(), *vae.modules()] if isinstance(m, CrossAttention | AttnBlock)
        ]
        assert len(attention_modules) > 2 and all(m.attention_slice == 5 for m in attention_modules)
        sliced = unet(x, t, context), vae.decode(z)
        for model in (unet, vae):
            set_attention_slicing(model, None)
        unsliced = unet(x, t, context), vae.decode(z)
    for a, b, c in zip(whole, sliced, unsliced, strict=True):
        # Slicing reorders float32 sums inside attention; through a random network that moves outputs by
        # ulps that some torch releases (2.6) round past 1e-5 x std: the one parity bar of tests/parity.py.
        assert_parity(b, a)
        assert torch.equal(c, a)
    with pytest.raises(LdmInpaintError, match="found 0"):
        set_attention_slicing(unet, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_half_precision_pipeline_is_close_to_float32(version: str, dtype: torch.dtype) -> None:
    config = load_config(TINY_CONFIGS[version])
    checkpoint = random_checkpoint(config, seed=5)
    image, mask = sample_image(128), sample_mask(128)
    options = dict(steps=5, guidance_scale=5.0, seed=1)
    expected = InpaintPipeline(build_model(checkpoint, config).model)(
        image, mask, prompt=PROMPT, **options
    ).images
    half = InpaintPipeline(build_model(checkpoint, config, dtype=dtype).model)
    images = half(image, mask, prompt=PROMPT, **options).images
    assert images.dtype == torch.float32
    assert_close_to_float32(images, expected, dtype)


def assert_close_to_float32(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    actual = actual.float()
    assert torch.isfinite(actual).all()
    diff, scale = (actual - expected).abs(), expected.std()
    print(f"{dtype}: mean |diff| {diff.mean() / scale:.3g} x std, max {diff.max() / scale:.3g} x std")
    mean_tolerance, max_tolerance = HALF_TOLERANCE[dtype]
    assert diff.mean() <= mean_tolerance * scale and diff.max() <= max_tolerance * scale


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_half_precision_full_size_unet_and_vae(version: str) -> None:
    """One full-size UNet pass (v2: the SD2 UNet whose attention overflowed in fp16 in the original) and one
    VAE decode, each in bf16 and fp16 against float32, on random weights."""
    config = load_config(FULL_CONFIGS[version])
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 9, 32, 32, generator=generator), torch.tensor([500])
    context = torch.randn(1, 77, config.unet.context_dim, generator=generator)
    z = torch.randn(1, 4, 32, 32, generator=generator)
    with torch.no_grad():
        for module_type, params, run in [
            (UNetModel, config.unet, lambda unet, dtype: unet(x.to(dtype), t, context.to(dtype))),
            (AutoencoderKL, config.autoencoder, lambda vae, dtype: vae.decode(z.to(dtype))),
        ]:
            model = random_module(module_type, params)
            expected = run(model, torch.float32)
            for dtype in (torch.bfloat16, torch.float16):
                assert_close_to_float32(run(model.to(dtype), dtype), expected, dtype)
            del model


@pytest.fixture(scope="module")
def fp16_pipeline() -> InpaintPipeline:
    config = load_config(TINY_CONFIGS["v1"])
    return InpaintPipeline(build_model(random_checkpoint(config, seed=5), config, dtype=torch.float16).model)


def overflowing(pipeline: InpaintPipeline, weight: str) -> InpaintPipeline:
    """A copy of ``pipeline`` whose VAE ``weight`` is scaled up until fp16 overflows (float32 does not)."""
    model = copy.deepcopy(pipeline.model)
    model.first_stage_model.get_parameter(weight).mul_(OVERFLOW_SCALE)
    return InpaintPipeline(model)


def float32_vae(pipeline: InpaintPipeline) -> AutoencoderKL:
    return copy.deepcopy(pipeline.model.first_stage_model).float()


@pytest.mark.parametrize("tile", [False, True])
def test_overflowing_half_decode_is_redone_in_float32_with_one_note(
    fp16_pipeline: InpaintPipeline, tile: bool
) -> None:
    pipeline = overflowing(fp16_pipeline, "decoder.conv_in.weight")
    # 72 x 16 latent cells: two 64-cell tiles when tiled; one note whatever the number of tiles.
    latents = torch.randn(1, 4, 72, 16, generator=torch.Generator().manual_seed(0))
    z = (latents / pipeline.config.scale_factor).half()
    with torch.no_grad():
        assert not torch.isfinite(pipeline.model.first_stage_model.decode(z)).all()
        notes: list[str] = []
        images = pipeline.decode(latents, tile=tile, notes=notes)
        vae = float32_vae(pipeline)
        expected = decode_tiled(vae, z.float()) if tile else vae.decode(z.float())
    assert notes == [FALLBACK_WARNING.format("decoding")]
    assert images.dtype == torch.float32 and torch.equal(images, expected)


def test_overflowing_half_encode_is_redone_in_float32(fp16_pipeline: InpaintPipeline) -> None:
    pipeline = overflowing(fp16_pipeline, "encoder.conv_in.weight")
    pipeline.model.first_stage_model.encoder.conv_in.weight.mul_(2.0)  # the encoder needs 2 ** 16
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    with torch.no_grad():
        assert not torch.isfinite(pipeline.model.first_stage_model.encode(image.half()).mean).all()
        notes: list[str] = []
        latent = pipeline.encode_image(mask_image(image, mask), notes=notes)
        expected = float32_vae(pipeline).encode(image.half().float()).mean * pipeline.config.scale_factor
    assert notes == [FALLBACK_WARNING.format("encoding")]
    assert latent.dtype == torch.float16 and torch.equal(latent, expected.half())


def test_non_finite_results_raise(fp16_pipeline: InpaintPipeline) -> None:
    latents = torch.zeros(1, 4, 8, 8)
    with pytest.raises(LdmInpaintError, match="non-finite latents"):
        fp16_pipeline.decode(torch.full_like(latents, float("nan")))
    broken = copy.deepcopy(fp16_pipeline.model).float()
    broken.first_stage_model.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(LdmInpaintError, match="non-finite values"):
        InpaintPipeline(broken).decode(latents)
