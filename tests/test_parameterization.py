"""The parameterization math and the conditioning inputs in their public homes: against diffusers' scheduler
(``add_noise``, ``get_velocity``) and against the inputs the pipeline builds for the UNet."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from ldm_inpaint.conditioning import binarize_mask, encode_latent, inpainting_concat, mask_image, unet_input
from ldm_inpaint.config import ScheduleParams, load_config
from ldm_inpaint.models.autoencoder import AutoencoderKL
from ldm_inpaint.parameterization import eps_to_x0, noised, training_target, v_to_eps, v_to_x0
from ldm_inpaint.random_weights import random_state_dict
from ldm_inpaint.schedule import alphas_cumprod

from .conftest import TINY_CONFIGS

ALPHAS_CUMPROD = alphas_cumprod(ScheduleParams())


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    vae = AutoencoderKL(load_config(TINY_CONFIGS["v1"]).autoencoder)
    shapes = ((key, tensor.shape) for key, tensor in vae.state_dict().items())
    vae.load_state_dict(random_state_dict(shapes, seed=0))
    return vae.eval()


SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    # (b,) -> (b, 1, 1, 1)
    return x0, eps, t, ALPHAS_CUMPROD[t][:, None, None, None]


def test_forward_process_and_v_target_match_diffusers() -> None:
    x0, eps, t, alpha_bar = batch(0)
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type="v_prediction")
    scheduler.alphas_cumprod = ALPHAS_CUMPROD  # float64, as ours
    assert torch.allclose(noised(x0, eps, alpha_bar), scheduler.add_noise(x0, eps, t), rtol=0, atol=1e-12)
    expected_v = scheduler.get_velocity(x0, eps, t)
    assert torch.allclose(training_target("v", x0, eps, alpha_bar), expected_v, rtol=0, atol=1e-12)
    assert torch.equal(training_target("eps", x0, eps, alpha_bar), eps)


def test_conversions_invert_each_other() -> None:
    x0, eps, _, alpha_bar = batch(1)
    x_t = noised(x0, eps, alpha_bar)
    v = training_target("v", x0, eps, alpha_bar)
    assert torch.allclose(eps_to_x0(x_t, eps, alpha_bar), x0, atol=1e-9)
    assert torch.allclose(v_to_eps(v, x_t, alpha_bar), eps, atol=1e-12)
    assert torch.allclose(v_to_x0(v, x_t, alpha_bar), x0, atol=1e-12)


def test_unknown_parameterization_is_refused() -> None:
    x0, eps, _, alpha_bar = batch(2)
    with pytest.raises(ValueError, match="parameterization must be 'eps' or 'v', found 'x0'"):
        training_target("x0", x0, eps, alpha_bar)


def test_inpainting_inputs_are_the_originals() -> None:
    """Mask binarized at 0.5, masked image = image x (mask < 0.5), its latent, the mask at latent size (nearest),
    concatenated after x_t: cat(x_t, mask, masked latent)."""
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
    soft = torch.rand(1, 1, 16, 16, generator=generator)
    mask = binarize_mask(soft)
    assert torch.equal(mask, (soft >= 0.5).float())
    assert torch.equal(mask_image(image, mask), torch.where(soft >= 0.5, 0.0, image))
    seen = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(pixels)
        return pixels[:, :, ::2, ::2].mean(1, keepdim=True).expand(-1, 4, -1, -1)

    concat = inpainting_concat(encode, image, mask, (8, 8))
    assert torch.equal(seen[0], mask_image(image, mask))
    assert torch.equal(concat[:, :1], mask[:, :, ::2, ::2]) and torch.equal(concat[:, 1:], encode(seen[0]))
    x_t = torch.zeros(1, 4, 8, 8)
    assert unet_input(x_t, concat).shape == (1, 9, 8, 8) and unet_input(x_t, None) is x_t


def test_latent_is_the_posterior_mean_times_the_scale_factor(tiny_vae: AutoencoderKL) -> None:
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        expected = tiny_vae.encode(image).mean * 0.18215
        assert torch.equal(encode_latent(tiny_vae, image, 0.18215), expected)
    # No inference mode inside: a trainer may take gradients through it.
    image.requires_grad_(True)
    encode_latent(tiny_vae, image, 0.18215).sum().backward()
    assert image.grad is not None
