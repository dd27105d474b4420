"""The sigma-space samplers (Euler, Euler ancestral, Heun, DPM-Solver++) against diffusers' schedulers and an
independent re-computation, over a closed-form denoiser that is smooth in a fractional timestep."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from torch import Tensor

from ldm_inpaint.config import ScheduleParams
from ldm_inpaint.denoiser import CountedDenoiser
from ldm_inpaint.samplers import SAMPLERS, ddim
from ldm_inpaint.samplers.grid import karras_grid, trailing_grid
from ldm_inpaint.samplers.sigmas import karras_sigmas, model_sigmas, sigma_to_timestep
from ldm_inpaint.schedule import alphas_cumprod

from .parity import assert_parity
from .sampling import run_sampler

ALPHAS_CUMPROD = alphas_cumprod(ScheduleParams())
K_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2s_ancestral"]
ANCESTRAL = ["euler_ancestral", "dpmpp_2s_ancestral"]
# The SD schedule in diffusers' terms, with the "trailing" spacing that the samplers use.
SD_TRAILING = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="trailing",
)
DPM_SOLVER_PP_2M = dict(SD_TRAILING, algorithm_type="dpmsolver++", solver_order=2)
DIFFUSERS = {
    "euler": lambda: EulerDiscreteScheduler(**SD_TRAILING),
    "euler_ancestral": lambda: EulerAncestralDiscreteScheduler(**SD_TRAILING),
    "heun": lambda: HeunDiscreteScheduler(**SD_TRAILING),
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**DPM_SOLVER_PP_2M),
    "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler(**DPM_SOLVER_PP_2M, use_karras_sigmas=True),
}


def closed_form_denoiser(x: Tensor, t: Tensor) -> Tensor:
    """The eps of data ~ N(0, I), ``sqrt(1 - alpha_bar_t) x_t``, plus a smooth nonlinear t-dependent term,
    with ``alpha_bar`` linear between integer timesteps: smooth in a fractional ``t``, and a wrong timestep,
    sigma or input scaling changes every step."""
    t = t.double().reshape(-1)
    low = t.floor().long().clamp(0, 998)
    alpha_bar = torch.lerp(ALPHAS_CUMPROD[low], ALPHAS_CUMPROD[low + 1], t - low)[:, None, None, None]
    phase = (t / 30)[:, None, None, None]
    return ((1 - alpha_bar).sqrt() * x + 0.2 * torch.tanh(x) * torch.cos(phase)).to(x.dtype)


def start_noise(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)


def run_diffusers(name: str, x_T: Tensor, steps: int, generator: torch.Generator | None) -> Tensor:
    """diffusers' denoising loop. For the trailing spacing its Euler-type schedulers start from
    ``init_noise_sigma = sigma_max``; ours start from ``sqrt(sigma_max^2 + 1)``, DPM-Solver's (VP) start."""
    scheduler = DIFFUSERS[name]()
    scheduler.set_timesteps(steps)
    x = x_T if name.startswith("dpmpp") else x_T * (scheduler.sigmas[0] ** 2 + 1) ** 0.5
    for t in scheduler.timesteps:
        eps = closed_form_denoiser(scheduler.scale_model_input(x, t), t.float().expand(x.shape[0]))
        noise_kwargs = {"generator": generator} if name == "euler_ancestral" else {}
        x = scheduler.step(eps, t, x, **noise_kwargs).prev_sample
    return x


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", sorted(DIFFUSERS))
def test_sampler_matches_diffusers(name: str, steps: int) -> None:
    x_T = start_noise()
    eta = 1.0 if name in ANCESTRAL else 0.0
    expected = run_diffusers(name, x_T, steps, torch.Generator().manual_seed(1))
    actual = run_sampler(
        name,
        closed_form_denoiser,
        x_T,
        ALPHAS_CUMPROD,
        steps,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
    )
    assert_parity(actual, expected)


def test_euler_ancestral_noise_is_drawn_like_diffusers() -> None:
    """With another seed the result moves by O(1): the parity above holds only because both draw the same
    noise in the same order."""
    x_T = start_noise()
    expected = run_diffusers("euler_ancestral", x_T, 10, torch.Generator().manual_seed(1))
    other_seed = run_sampler(
        "euler_ancestral",
        closed_form_denoiser,
        x_T,
        ALPHAS_CUMPROD,
        10,
        eta=1.0,
        generator=torch.Generator().manual_seed(2),
    )
    assert (other_seed - expected).abs().max() > 0.1 * expected.std()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [10, 25])
def test_euler_ancestral_is_ddim_with_the_same_eta_on_the_same_grid(steps: int, eta: float) -> None:
    """In sigma space DDIM's step with ``eta`` (Song et al. 2021, eq. 12 and 16) is the Euler step to
    ``sigma_down`` plus noise ``sigma_up z``: diffusers' DDIM on the trailing grid, ending at alpha_bar = 1,
    is an oracle for every eta. Its state is the LDM latent, which starts at x_T."""
    x_T, generator = start_noise(), torch.Generator().manual_seed(1)
    scheduler = DDIMScheduler(**SD_TRAILING, set_alpha_to_one=True, clip_sample=False)
    scheduler.set_timesteps(steps)
    expected = x_T
    for t in scheduler.timesteps:
        eps = closed_form_denoiser(expected, t.float().expand(x_T.shape[0]))
        expected = scheduler.step(eps, t, expected, eta=eta, generator=generator).prev_sample
    actual = run_sampler(
        "euler_ancestral",
        closed_form_denoiser,
        x_T,
        ALPHAS_CUMPROD,
        steps,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
    )
    assert_parity(actual, expected)


def dpmpp_2s_ancestral_reference(
    x_T: Tensor,
    steps: int,
    eta: float,
    generator: torch.Generator,
    init: Tensor | None = None,
    strength: float = 1.0,
) -> Tensor:
    """k-diffusion's DPM++ 2S a written out in the LDM (VP) latent ``u = x / sqrt(sigma^2 + 1)`` with the
    ``alpha_t, sigma_t`` of Lu et al. 2022 (Algorithm 1, ``r_1 = 1/2``), in float64; numpy's interpolation
    for the midpoint timestep. The noise is drawn like x_T, in float32. With ``init``: only the last
    ``int(steps strength)`` steps of the trailing grid, from ``u = alpha init + sigma x_T``."""
    table = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD).sqrt().numpy()
    grid = [int(t) for t in np.arange(1000, 0, -1000 / steps).round() - 1][steps - int(steps * strength) :]
    sigmas = [*table[grid], 0.0]

    def alpha_sigma(s: float) -> tuple[float, float]:  # VE sigma -> the VP (alpha_t, sigma_t)
        return 1 / math.sqrt(1 + s**2), s / math.sqrt(1 + s**2)

    def data_pred(u: Tensor, s: float) -> Tensor:
        t = np.interp(np.log(s), np.log(table), np.arange(1000))
        alpha, sigma = alpha_sigma(s)
        eps = closed_form_denoiser(u, torch.full((u.shape[0],), float(t), dtype=torch.float32))
        return (u - sigma * eps) / alpha

    if init is None:
        u = x_T.double()
    else:
        alpha_0, sigma_0 = alpha_sigma(sigmas[0])
        u = alpha_0 * init.double() + sigma_0 * x_T.double()
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        s_up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        s_down = math.sqrt(s_next**2 - s_up**2)
        x0 = data_pred(u, s)
        if s_down == 0:
            u = x0
        else:
            (a_s, sig_s), (a_d, sig_d) = alpha_sigma(s), alpha_sigma(s_down)
            lam_s, lam_d = math.log(a_s / sig_s), math.log(a_d / sig_d)
            h = lam_d - lam_s
            s_mid = math.exp(-(lam_s + h / 2))
            a_m, sig_m = alpha_sigma(s_mid)
            u_mid = sig_m / sig_s * u - a_m * (math.exp(-h / 2) - 1) * x0
            u = sig_d / sig_s * u - a_d * (math.exp(-h) - 1) * data_pred(u_mid, s_mid)
        x = u / a_d if s_down > 0 else u
        if s_up > 0:
            x = x + s_up * torch.randn(x.shape, generator=generator).double()
        u = x * alpha_sigma(s_next)[0]
    return u


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [10, 25])
def test_dpmpp_2s_ancestral_matches_a_recomputation(steps: int, eta: float) -> None:
    x_T = start_noise()
    expected = dpmpp_2s_ancestral_reference(x_T, steps, eta, torch.Generator().manual_seed(1))
    actual = run_sampler(
        "dpmpp_2s_ancestral",
        closed_form_denoiser,
        x_T,
        ALPHAS_CUMPROD,
        steps,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
    )
    assert_parity(actual, expected)


@pytest.mark.parametrize("steps", [1, 2, 7, 10, 25, 50, 100, 1000])
def test_trailing_grid_matches_diffusers(steps: int) -> None:
    schedule = trailing_grid(ALPHAS_CUMPROD, steps)
    for scheduler in (EulerDiscreteScheduler(**SD_TRAILING), DPMSolverMultistepScheduler(**DPM_SOLVER_PP_2M)):
        scheduler.set_timesteps(steps)
        assert list(schedule.timesteps) == scheduler.timesteps.tolist()
        assert_parity(torch.tensor(schedule.sigmas), scheduler.sigmas)


def test_trailing_grid_is_well_formed_for_every_step_count() -> None:
    """Where diffusers' float ``np.arange`` yields ``steps + 1`` timesteps ending at -1 (61, 103, ...), ours
    has ``steps``, from 999 down to ``round(1000 / steps) - 1``."""
    for steps in range(1, 1001):
        timesteps = trailing_grid(ALPHAS_CUMPROD, steps).timesteps
        assert len(timesteps) == steps and timesteps[0] == 999 and timesteps[-1] == round(1000 / steps) - 1
        assert all(a > b for a, b in zip(timesteps, timesteps[1:], strict=False))


@pytest.mark.parametrize("steps", [2, 10, 25])
def test_karras_sigmas_match_diffusers(steps: int) -> None:
    scheduler = DPMSolverMultistepScheduler(**DPM_SOLVER_PP_2M, use_karras_sigmas=True)
    expected = scheduler._convert_to_karras(in_sigmas=torch.tensor([14.6, 0.03]), num_inference_steps=steps)
    assert_parity(torch.tensor(karras_sigmas(0.03, 14.6, steps)), torch.tensor(expected))
    schedule = karras_grid(ALPHAS_CUMPROD, steps)
    scheduler.set_timesteps(steps)
    assert list(schedule.timesteps) == scheduler.timesteps.tolist()
    assert_parity(torch.tensor(schedule.sigmas), scheduler.sigmas)


def test_sigma_to_timestep_matches_diffusers_and_is_exact_at_the_training_timesteps() -> None:
    table = model_sigmas(ALPHAS_CUMPROD)
    assert torch.equal(sigma_to_timestep(table, ALPHAS_CUMPROD), torch.arange(1000, dtype=torch.float64))
    sigmas = torch.cat([torch.logspace(-2, 1.3, 97, dtype=torch.float64), table[[0, 500, 999]]])
    scheduler = EulerDiscreteScheduler(**SD_TRAILING)
    expected = scheduler._sigma_to_t(sigmas.numpy(), table.log().numpy())
    assert (sigma_to_timestep(sigmas, ALPHAS_CUMPROD) - torch.from_numpy(expected)).abs().max() < 1e-9


@pytest.mark.parametrize("steps", [1, 10, 25])
@pytest.mark.parametrize("name", K_SAMPLERS)
def test_denoiser_calls(name: str, steps: int) -> None:
    """One call per step; two for the second-order single-step samplers, except in the last step (to sigma 0),
    which is a first-order step."""
    counted = CountedDenoiser(closed_form_denoiser)
    eta = 1.0 if name in ANCESTRAL else 0.0
    run_sampler(name, counted, start_noise(), ALPHAS_CUMPROD, steps, eta=eta, generator=torch.Generator())
    two_per_step = name in ("heun", "dpmpp_2s_ancestral")
    assert counted.calls == (2 * steps - 1 if two_per_step else steps)


def test_euler_ancestral_with_eta_0_is_euler() -> None:
    x_T = start_noise()
    expected = run_sampler("euler", closed_form_denoiser, x_T, ALPHAS_CUMPROD, 10)
    assert torch.equal(
        run_sampler("euler_ancestral", closed_form_denoiser, x_T, ALPHAS_CUMPROD, 10, eta=0.0), expected
    )


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_registry_samplers_share_one_signature(name: str) -> None:
    assert inspect.signature(SAMPLERS[name].sample) == inspect.signature(ddim)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_noise_free_lists_exactly_the_samplers_that_reject_eta(name: str) -> None:
    args = (closed_form_denoiser, start_noise(), ALPHAS_CUMPROD, 2)
    if not SAMPLERS[name].stochastic:
        with pytest.raises(ValueError, match="eta must be 0, found 0.5"):
            run_sampler(name, *args, eta=0.5)
    else:
        assert torch.isfinite(run_sampler(name, *args, eta=0.5, generator=torch.Generator())).all()


@pytest.mark.parametrize("name", ANCESTRAL)
def test_ancestral_samplers_reject_negative_eta(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} eta must be >= 0.*found -1.0"):
        run_sampler(name, closed_form_denoiser, start_noise(), ALPHAS_CUMPROD, 10, eta=-1.0)


@pytest.mark.parametrize("steps", [0, 1001])
@pytest.mark.parametrize("name", K_SAMPLERS)
def test_samplers_reject_step_counts_outside_the_schedule(name: str, steps: int) -> None:
    with pytest.raises(ValueError, match=f"between 1 and the model's 1000 training timesteps, found {steps}"):
        run_sampler(name, closed_form_denoiser, start_noise(), ALPHAS_CUMPROD, steps)
