"""make_denoiser: guidance batching and combination, concat order, v -> eps, dtypes, against hand computations
with a fake UNet that records its inputs."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ldm_inpaint.conditioning import Blend
from ldm_inpaint.config import ScheduleParams
from ldm_inpaint.denoiser import CountedDenoiser, make_denoiser
from ldm_inpaint.schedule import alphas_cumprod

ALPHAS_CUMPROD = alphas_cumprod(ScheduleParams())
B, H, W, D = 2, 4, 6, 8


class RecordingUNet:
    """A fake UNet: records every call and returns a smooth function of all three inputs, 4 channels."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def __call__(self, x_in: Tensor, t: Tensor, context: Tensor) -> Tensor:
        self.calls.append((x_in, t, context))
        return self.output(x_in, t, context)

    @staticmethod
    def output(x_in: Tensor, t: Tensor, context: Tensor) -> Tensor:
        context_term = context.float().mean(dim=(1, 2))[:, None, None, None]
        # (b, c, h, w) -> (b, 4, h, w): mixes the concat channels into the output
        mixed = x_in[:, :4] + x_in[:, 4:].sum(dim=1, keepdim=True)
        return (torch.sin(mixed) + context_term + t[:, None, None, None] / 1000).to(x_in.dtype)


def tensors(dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(B, 4, H, W, generator=g, dtype=dtype),
        "mask": (torch.rand(B, 1, H, W, generator=g) > 0.5).to(dtype),
        "masked": torch.randn(B, 4, H, W, generator=g, dtype=dtype),
        "context": torch.randn(B, 77, D, generator=g, dtype=dtype),
        "uncond": torch.randn(1, 77, D, generator=g, dtype=dtype),
        "t": torch.tensor([981.0, 21.0]),
    }


def test_guidance_batches_uncond_first_in_one_call_and_combines() -> None:
    v, unet, scale = tensors(), RecordingUNet(), 7.5
    concat = torch.cat([v["mask"], v["masked"]], dim=1)
    denoiser = make_denoiser(unet, v["context"], v["uncond"], scale, concat, "eps", ALPHAS_CUMPROD)
    out = denoiser(v["x"], v["t"])

    assert len(unet.calls) == 1
    x_in, t_in, c_in = unet.calls[0]
    x_cond = torch.cat([v["x"], v["mask"], v["masked"]], dim=1)
    assert torch.equal(x_in, torch.cat([x_cond, x_cond]))
    assert torch.equal(t_in, torch.cat([v["t"], v["t"]]))
    assert torch.equal(c_in, torch.cat([v["uncond"].expand(B, -1, -1), v["context"]]))

    uncond = RecordingUNet.output(x_cond, v["t"], v["uncond"].expand(B, -1, -1))
    cond = RecordingUNet.output(x_cond, v["t"], v["context"])
    torch.testing.assert_close(out, uncond + scale * (cond - uncond), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(uncond, cond)


def test_scale_1_makes_one_conditional_call_without_uncond() -> None:
    v, unet = tensors(), RecordingUNet()
    concat = torch.cat([v["mask"], v["masked"]], dim=1)
    context = v["context"][:1]  # (1, 77, d) broadcast to the batch
    out = make_denoiser(unet, context, None, 1.0, concat, "eps", ALPHAS_CUMPROD)(v["x"], v["t"])
    assert len(unet.calls) == 1
    x_in, t_in, c_in = unet.calls[0]
    assert x_in.shape == (B, 9, H, W) and torch.equal(t_in, v["t"])
    assert torch.equal(c_in, context.expand(B, -1, -1))
    assert torch.equal(out, RecordingUNet.output(x_in, v["t"], c_in))


def test_concat_order_is_x_mask_masked_latent() -> None:
    v, unet = tensors(), RecordingUNet()
    concat = torch.cat([v["mask"], v["masked"]], dim=1)
    make_denoiser(unet, v["context"], v["uncond"], 3.0, concat, "eps", ALPHAS_CUMPROD)(v["x"], v["t"])
    x_in = unet.calls[0][0]
    for half in (x_in[:B], x_in[B:]):
        assert torch.equal(half[:, :4], v["x"])
        assert torch.equal(half[:, 4:5], v["mask"])
        assert torch.equal(half[:, 5:], v["masked"])


def test_without_concat_the_unet_sees_x_alone() -> None:
    v, unet = tensors(), RecordingUNet()
    make_denoiser(unet, v["context"], None, 1.0, None, "eps", ALPHAS_CUMPROD)(v["x"], v["t"])
    assert torch.equal(unet.calls[0][0], v["x"])


def _v_unet(v_target: Tensor):
    """A UNet whose output is ``v_target`` (b, 4, h, w) for every context (one copy per batch half)."""
    return lambda x_in, t, context: v_target.repeat(x_in.shape[0] // v_target.shape[0], 1, 1, 1)


@pytest.mark.parametrize("t", [[981.0, 21.0], [500.25, 0.5]])
def test_v_prediction_is_converted_to_eps(t: list[float]) -> None:
    """Build x_t and v from known eps and x0 (Salimans & Ho 2022), expect eps back; alpha_bar interpolated
    linearly for fractional t."""
    g = torch.Generator().manual_seed(1)
    eps, x0 = torch.randn(2, B, 4, H, W, generator=g, dtype=torch.float64)
    timesteps = torch.tensor(t)
    low, frac = timesteps.floor().long(), (timesteps - timesteps.floor()).double()
    alpha_bar = (ALPHAS_CUMPROD[low] * (1 - frac) + ALPHAS_CUMPROD[low + 1] * frac)[:, None, None, None]
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    context = torch.zeros(1, 77, D, dtype=torch.float64)
    out = make_denoiser(_v_unet(v), context, None, 1.0, None, "v", ALPHAS_CUMPROD)(x_t, timesteps)
    torch.testing.assert_close(out, eps, rtol=1e-12, atol=1e-12)


def test_v_guidance_is_applied_before_the_conversion() -> None:
    g = torch.Generator().manual_seed(2)
    x_t, v_uncond, v_cond = torch.randn(3, B, 4, H, W, generator=g, dtype=torch.float64)
    scale, timesteps = 5.0, torch.tensor([981.0, 21.0])

    def unet(x_in: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return torch.cat([v_uncond, v_cond])

    context = torch.zeros(B, 77, D, dtype=torch.float64)
    out = make_denoiser(unet, context, context, scale, None, "v", ALPHAS_CUMPROD)(x_t, timesteps)
    v = v_uncond + scale * (v_cond - v_uncond)
    alpha_bar = ALPHAS_CUMPROD[timesteps.long()][:, None, None, None]
    torch.testing.assert_close(
        out, alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * x_t, rtol=1e-12, atol=1e-12
    )


def test_unet_inputs_take_the_context_dtype_and_the_output_that_of_x() -> None:
    v, unet = tensors(torch.float32), RecordingUNet()
    context, uncond = v["context"].half(), v["uncond"].half()
    concat = torch.cat([v["mask"], v["masked"]], dim=1)
    out = make_denoiser(unet, context, uncond, 7.5, concat, "v", ALPHAS_CUMPROD)(v["x"], v["t"])
    x_in, t_in, c_in = unet.calls[0]
    assert x_in.dtype == torch.float16 and c_in.dtype == torch.float16
    assert t_in.dtype == torch.float32
    assert out.dtype == torch.float32


def test_counted_denoiser_counts_unet_evaluations() -> None:
    v, unet = tensors(), RecordingUNet()
    counted = CountedDenoiser(
        make_denoiser(unet, v["context"], v["uncond"], 7.5, None, "eps", ALPHAS_CUMPROD)
    )
    for _ in range(3):
        counted(v["x"], v["t"])
    assert counted.calls == len(unet.calls) == 3


def test_inputs_are_not_mutated() -> None:
    v, unet = tensors(), RecordingUNet()
    copies = {name: value.clone() for name, value in v.items()}
    concat = torch.cat([v["mask"], v["masked"]], dim=1)
    make_denoiser(unet, v["context"], v["uncond"], 7.5, concat, "v", ALPHAS_CUMPROD)(v["x"], v["t"])
    for name, value in v.items():
        assert torch.equal(value, copies[name]), name


def test_rejects_unknown_parameterization() -> None:
    v = tensors()
    with pytest.raises(ValueError, match="parameterization must be 'eps' or 'v', found 'x0'"):
        make_denoiser(RecordingUNet(), v["context"], None, 1.0, None, "x0", ALPHAS_CUMPROD)


def test_guidance_without_uncond_context_is_rejected() -> None:
    v = tensors()
    with pytest.raises(ValueError, match="guidance_scale 7.5 needs an unconditional context, found None"):
        make_denoiser(RecordingUNet(), v["context"], None, 7.5, None, "eps", ALPHAS_CUMPROD)


def test_context_batch_must_be_1_or_that_of_x() -> None:
    v = tensors()
    context = torch.zeros(3, 77, D, dtype=torch.float64)
    denoiser = make_denoiser(RecordingUNet(), context, None, 1.0, None, "eps", ALPHAS_CUMPROD)
    with pytest.raises(
        ValueError, match=r"context must have batch size 1 or 2 \(that of x\), found \(3, 77, 8\)"
    ):
        denoiser(v["x"], v["t"])


def _blend(dtype: torch.dtype = torch.float64) -> Blend:
    g = torch.Generator().manual_seed(3)
    return Blend(
        known=torch.randn(1, 4, H, W, generator=g, dtype=dtype),
        keep=(torch.rand(1, 1, H, W, generator=g) > 0.5).to(dtype),
        noise=torch.randn(B, 4, H, W, generator=g, dtype=dtype),
    )


def _blended_by_hand(x: Tensor, t: Tensor, blend: Blend) -> Tensor:
    """``keep (sqrt(a) x0 + sqrt(1 - a) noise) + (1 - keep) x``, ``a`` linear between integer timesteps."""
    low, frac = t.floor().long(), (t - t.floor()).double()
    alpha_bar = (ALPHAS_CUMPROD[low] * (1 - frac) + ALPHAS_CUMPROD[low + 1] * frac)[:, None, None, None]
    diffused = alpha_bar.sqrt() * blend.known + (1 - alpha_bar).sqrt() * blend.noise
    return blend.keep * diffused + (1 - blend.keep) * x


@pytest.mark.parametrize("t", [[981.0, 21.0], [500.25, 0.5]])
def test_blend_replaces_the_known_region_before_the_unet_call(t: list[float]) -> None:
    v, unet, blend = tensors(), RecordingUNet(), _blend()
    timesteps = torch.tensor(t)
    out = make_denoiser(unet, v["context"], v["uncond"], 7.5, None, "eps", ALPHAS_CUMPROD, blend)(
        v["x"], timesteps
    )
    x_in = unet.calls[0][0]
    expected = _blended_by_hand(v["x"], timesteps, blend)
    for half in (x_in[:B], x_in[B:]):
        torch.testing.assert_close(half, expected, rtol=1e-12, atol=1e-12)
        repaint = (blend.keep == 0).expand_as(half)
        assert torch.equal(half[repaint], v["x"][repaint])  # the repainted region is x itself
    plain = make_denoiser(RecordingUNet(), v["context"], v["uncond"], 7.5, None, "eps", ALPHAS_CUMPROD)
    torch.testing.assert_close(out, plain(expected, timesteps), rtol=1e-12, atol=1e-12)


def test_blend_feeds_the_v_conversion_the_blended_latent() -> None:
    """eps = sqrt(a) v + sqrt(1 - a) x_t with the x_t the UNet saw."""
    g = torch.Generator().manual_seed(4)
    x, v_out = torch.randn(2, B, 4, H, W, generator=g, dtype=torch.float64)
    blend, timesteps = _blend(), torch.tensor([981.0, 21.0])
    context = torch.zeros(1, 77, D, dtype=torch.float64)
    out = make_denoiser(_v_unet(v_out), context, None, 1.0, None, "v", ALPHAS_CUMPROD, blend)(x, timesteps)
    alpha_bar = ALPHAS_CUMPROD[timesteps.long()][:, None, None, None]
    blended = _blended_by_hand(x, timesteps, blend)
    torch.testing.assert_close(
        out, alpha_bar.sqrt() * v_out + (1 - alpha_bar).sqrt() * blended, rtol=1e-12, atol=1e-12
    )


def test_blend_keeps_dtypes_and_mutates_nothing() -> None:
    v, unet, blend = tensors(torch.float32), RecordingUNet(), _blend(torch.float32)
    copies = [tensor.clone() for tensor in (v["x"], blend.known, blend.keep, blend.noise)]
    context = v["context"].half()
    out = make_denoiser(unet, context, None, 1.0, None, "eps", ALPHAS_CUMPROD, blend)(v["x"], v["t"])
    assert unet.calls[0][0].dtype == torch.float16 and out.dtype == torch.float32
    for tensor, copy in zip((v["x"], blend.known, blend.keep, blend.noise), copies, strict=True):
        assert torch.equal(tensor, copy)
