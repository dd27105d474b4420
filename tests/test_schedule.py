"""The noise schedule against diffusers and the original formulas; the original DDIM timestep grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ldm_inpaint.config import ScheduleParams, load_config
from ldm_inpaint.schedule import alphas_cumprod, ddim_timesteps, ddpm_buffers, linear_betas

from .conftest import FULL_CONFIGS, MANIFESTS, TINY_CONFIGS


def test_alphas_cumprod_matches_diffusers_scaled_linear() -> None:
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = alphas_cumprod(ScheduleParams())
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    # diffusers accumulates the product in float32: ~1e-6 relative, far below any formula error
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ours, rtol=1e-5, atol=0)
    torch.testing.assert_close(scheduler.betas.double(), linear_betas(ScheduleParams()), rtol=1e-6, atol=0)


def _original_buffers(linear_start: float, linear_end: float, timesteps: int) -> dict[str, np.ndarray]:
    """``DDPM.register_schedule`` of the original, written out in numpy (float64, v_posterior = 0)."""
    betas = np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }


def test_ddpm_buffers_equal_the_original_formulas_bitwise() -> None:
    expected = _original_buffers(0.00085, 0.012, 1000)
    buffers = ddpm_buffers(ScheduleParams())
    assert buffers.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(buffers[name], torch.tensor(value, dtype=torch.float32)), name


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_ddpm_buffers_have_the_manifest_keys_shapes_and_dtype(version: str) -> None:
    manifest = json.loads(MANIFESTS[version].read_text())
    schedule_keys = {key for key in manifest if "." not in key}
    for config in (TINY_CONFIGS[version], FULL_CONFIGS[version]):
        buffers = ddpm_buffers(load_config(config).schedule)
        assert set(buffers) == schedule_keys
        for name, value in buffers.items():
            assert [list(value.shape), str(value.dtype).removeprefix("torch.")] == manifest[name], name


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (50, list(range(1, 1000, 20))),
        (25, list(range(1, 1000, 40))),
        (6, [1, 167, 333, 499, 665, 831, 997]),  # 7 steps, as the original
        (45, list(range(1, 1000, 22))),  # 46 steps, as the original
        (3, [1, 334, 667]),  # the original's 1000 is past the schedule
        (1, [1]),
        (1000, list(range(1, 1000))),  # likewise: 999 steps
    ],
)
def test_ddim_timesteps_reproduce_the_original_uniform_grid(steps: int, expected: list[int]) -> None:
    assert ddim_timesteps(steps) == expected


def test_ddim_timesteps_lengths_for_counts_that_do_not_divide_1000() -> None:
    assert len(ddim_timesteps(6)) == 7
    assert len(ddim_timesteps(45)) == 46


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_ddim_timesteps_rejects_counts_outside_the_schedule(steps: int) -> None:
    message = rf"must be between 1 and the model's 1000 training timesteps, found {steps}$"
    with pytest.raises(ValueError, match=message):
        ddim_timesteps(steps)
