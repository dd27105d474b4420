"""``strength`` in every sampler: the end of its own grid, started from a noised clean latent, against
diffusers' schedulers run the way its img2img / inpainting pipelines run them (``set_timesteps``, the cut of
``get_timesteps``, ``set_begin_index``, ``scheduler.add_noise(init, noise, timesteps[:1])``, then the loop),
over the closed-form denoiser of ``test_k_samplers``."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from torch import Tensor

from ldm_inpaint.denoiser import CountedDenoiser
from ldm_inpaint.samplers import SAMPLERS
from ldm_inpaint.samplers.noise import kept_steps

from .conftest import FULL_CONFIGS, TINY_CONFIGS
from .oracles import ORIGINAL_DDIM
from .parity import assert_parity
from .sampling import run_sampler
from .test_blended import posterior_mean, run_strength_parity  # noqa: F401 (a fixture)
from .test_k_samplers import (
    ALPHAS_CUMPROD,
    DIFFUSERS,
    closed_form_denoiser,
    dpmpp_2s_ancestral_reference,
    start_noise,
)

# The sampler -> its diffusers scheduler (DDIM on the original grid; the rest as in test_k_samplers).
SCHEDULERS = {**DIFFUSERS, "ddim": lambda: DDIMScheduler(**ORIGINAL_DDIM, clip_sample=False)}
STOCHASTIC = {"ddim", "euler_ancestral"}


def clean_latent() -> Tensor:
    """A stand-in for an encoded image: not unit noise, not zero-mean."""
    return 0.8 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)) + 0.3


def run_diffusers_from_init(name: str, x_T: Tensor, init: Tensor, steps: int, strength: float) -> Tensor:
    """diffusers' img2img denoising loop (``StableDiffusionImg2ImgPipeline.get_timesteps`` and
    ``prepare_latents``) with ``x_T`` as the noise; the stochastic samplers draw from a generator seeded 1."""
    scheduler = SCHEDULERS[name]()
    scheduler.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    x = scheduler.add_noise(init, x_T, timesteps[:1])
    step_kwargs = {"generator": torch.Generator().manual_seed(1)} if name in STOCHASTIC else {}
    if name == "ddim":
        step_kwargs["eta"] = 1.0
    for t in timesteps:
        eps = closed_form_denoiser(scheduler.scale_model_input(x, t), t.float().expand(x.shape[0]))
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("strength", [0.6, 0.35])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_strength_matches_diffusers(name: str, steps: int, strength: float) -> None:
    x_T, init = start_noise(), clean_latent()
    expected = run_diffusers_from_init(name, x_T, init, steps, strength)
    ticks: list[tuple[int, int]] = []
    actual = run_sampler(
        name,
        closed_form_denoiser,
        x_T,
        ALPHAS_CUMPROD,
        steps,
        eta=1.0 if name in STOCHASTIC else 0.0,
        generator=torch.Generator().manual_seed(1),
        callback=lambda step: ticks.append((step.index, step.total)),
        init=init,
        strength=strength,
    )
    assert_parity(actual, expected)
    kept = int(steps * strength)
    assert ticks == [(i, kept) for i in range(kept)]


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.6), (25, 0.35), (20, 0.5)])
def test_plms_strength_matches_diffusers_pndm(steps: int, strength: float) -> None:
    """diffusers' PNDM (``skip_prk_steps``) lists the first step's timestep twice (its second evaluation), so
    ``get_timesteps``' plain cut lands mid-step; the oracle lists the kept grid in PNDM's own form instead,
    ``[t_0, t_1, t_1, t_2, ...]``, keeping the step ratio of the full grid."""
    x_T, init = start_noise(), clean_latent()
    scheduler = PNDMScheduler(**ORIGINAL_DDIM, skip_prk_steps=True)
    scheduler.set_timesteps(steps)
    grid = scheduler.timesteps.unique().flip(0)
    kept = grid[steps - int(steps * strength) :]
    scheduler.timesteps = torch.cat([kept[:2], kept[1:]])
    expected = scheduler.add_noise(init, x_T, kept[:1])
    for t in scheduler.timesteps:
        eps = closed_form_denoiser(expected, t.float().expand(x_T.shape[0]))
        expected = scheduler.step(eps, t, expected).prev_sample
    counted = CountedDenoiser(closed_form_denoiser)
    actual = run_sampler("plms", counted, x_T, ALPHAS_CUMPROD, steps, init=init, strength=strength)
    assert_parity(actual, expected)
    assert counted.calls == len(kept) + 1


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize(("steps", "strength"), [(10, 0.6), (25, 0.35)])
def test_dpmpp_2s_ancestral_strength_matches_a_recomputation(steps: int, strength: float, eta: float) -> None:
    """diffusers has no DPM++ 2S a scheduler: the oracle is an independent re-computation."""
    x_T, init = start_noise(), clean_latent()
    expected = dpmpp_2s_ancestral_reference(x_T, steps, eta, torch.Generator().manual_seed(1), init, strength)
    actual = run_sampler(
        "dpmpp_2s_ancestral",
        closed_form_denoiser,
        x_T,
        ALPHAS_CUMPROD,
        steps,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
        init=init,
        strength=strength,
    )
    assert_parity(actual, expected)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_strength_1_is_the_plain_run_and_ignores_init(name: str) -> None:
    x_T, eta = start_noise(), 1.0 if SAMPLERS[name].stochastic else 0.0
    plain = run_sampler(
        name,
        closed_form_denoiser,
        x_T,
        ALPHAS_CUMPROD,
        6,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
    )
    with_init = run_sampler(
        name,
        closed_form_denoiser,
        x_T,
        ALPHAS_CUMPROD,
        6,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
        init=clean_latent(),
        strength=1.0,
    )
    assert torch.equal(plain, with_init)


# Per sampler, 6 steps at strength 0.5: (steps taken, first and last timestep the denoiser sees). DDIM and
# PLMS keep 3 of their 7-step grid (997, 831, 665, 499, 333, 167, 1); the trailing grid (999, 832, 666, 499,
# 332, 166) keeps its last 3, the Karras grid (999, 837, 594, 249, 30, 0) too.
HALF_STRENGTH_CONTRACT = {name: (3, 499.0, 166.0) for name in SAMPLERS} | {
    "ddim": (3, 333.0, 1.0),
    "plms": (3, 333.0, 1.0),
    "dpmpp_2m_karras": (3, 249.0, 0.0),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_strength_keeps_the_end_of_the_grid_and_mutates_nothing(name: str) -> None:
    x_T, init = start_noise(torch.float64), clean_latent().double()
    copies = x_T.clone(), init.clone()
    seen: list[float] = []
    ticks: list[tuple[int, int]] = []

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        seen.append(t[0].item())
        return closed_form_denoiser(x, t)

    eta = 1.0 if SAMPLERS[name].stochastic else 0.0
    out = run_sampler(
        name,
        denoiser,
        x_T,
        ALPHAS_CUMPROD,
        6,
        eta=eta,
        generator=torch.Generator(),
        callback=lambda step: ticks.append((step.index, step.total)),
        init=init,
        strength=0.5,
    )
    taken, first, last = HALF_STRENGTH_CONTRACT[name]
    assert ticks == [(i, taken) for i in range(taken)]
    assert seen[0] == first and seen[-1] == last
    assert out.dtype == torch.float64
    assert torch.equal(x_T, copies[0]) and torch.equal(init, copies[1])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize(
    ("steps", "strength", "init_shape", "message"),
    [
        (10, 0.0, (2, 4, 8, 8), r"strength must be in \(0, 1\].*found 0.0"),
        (10, 1.5, (2, 4, 8, 8), r"strength must be in \(0, 1\].*found 1.5"),
        (10, -0.2, None, r"strength must be in \(0, 1\].*found -0.2"),
        (10, 0.05, (2, 4, 8, 8), "strength 0.05 keeps no step of 10; raise strength or steps"),
        (10, 0.5, None, "cut for strength < 1 starts from a noised clean latent: pass init, found None"),
        (
            10,
            0.5,
            (1, 4, 8, 8),
            r"init must have the shape of the noise, \(2, 4, 8, 8\), found \(1, 4, 8, 8\)",
        ),
    ],
)
def test_bad_strength_is_a_clear_error(name, steps, strength, init_shape, message) -> None:
    init = None if init_shape is None else torch.zeros(init_shape)
    with pytest.raises(ValueError, match=message):
        run_sampler(
            name, closed_form_denoiser, start_noise(), ALPHAS_CUMPROD, steps, init=init, strength=strength
        )


@pytest.mark.parametrize(
    ("steps", "strength", "kept"), [(50, 0.75, 37), (10, 0.7, 7), (10, 0.3, 3), (100, 0.29, 28), (7, 1.0, 7)]
)
def test_kept_steps_is_diffusers_get_timesteps(steps: int, strength: float, kept: int) -> None:
    """``int(steps * strength)`` in floating point, as diffusers computes it: 100 x 0.29 = 28.999... -> 28."""
    assert kept_steps(steps, strength) == kept


@pytest.mark.usefixtures("posterior_mean")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_inpainting_strength_parity_with_diffusers(version: str) -> None:
    """The 9-channel pipeline at strength 0.6: DDIM takes the last 6 of 10 steps from the full image's latent
    noised to timestep 501, as diffusers' inpainting pipeline (its posterior samples patched to the mean,
    see ``test_blended``)."""
    run_strength_parity(TINY_CONFIGS[version], "ddim", size=64, steps=10, strength=0.6)


@pytest.mark.slow
@pytest.mark.usefixtures("posterior_mean")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_inpainting_strength_parity_with_diffusers_full_size(version: str) -> None:
    import open_clip

    text_cfg = open_clip.get_model_config("ViT-H-14")["text_cfg"]
    run_strength_parity(FULL_CONFIGS[version], "ddim", size=128, steps=5, strength=0.6, text_cfg=text_cfg)
