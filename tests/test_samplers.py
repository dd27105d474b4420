"""DDIM and PLMS against diffusers and against straightforward re-computations of the original loops, over a
closed-form denoiser."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from torch import Tensor

from ldm_inpaint.config import ScheduleParams
from ldm_inpaint.denoiser import CountedDenoiser, Denoiser
from ldm_inpaint.samplers import SAMPLERS, StepInfo
from ldm_inpaint.schedule import alphas_cumprod

from .oracles import ORIGINAL_DDIM
from .parity import assert_parity
from .sampling import run_sampler

ALPHAS_CUMPROD = alphas_cumprod(ScheduleParams())


def closed_form_denoiser(x: Tensor, t: Tensor) -> Tensor:
    """The eps of data ~ N(0, I), ``sqrt(1 - alpha_bar_t) x_t``, plus a smooth nonlinear t-dependent term: a
    wrong timestep or alpha_bar index changes every step."""
    alpha_bar = ALPHAS_CUMPROD.to(x.dtype)[t.long()][:, None, None, None]
    phase = (t / 150)[:, None, None, None].to(x.dtype)
    return (1 - alpha_bar).sqrt() * x + 0.2 * torch.tanh(x) * torch.cos(phase)


def start_noise(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)


def original_loop(
    x: Tensor, steps: int, eta: float, generator: torch.Generator | None, plms_: bool
) -> Tensor:
    """The original ``DDIMSampler.ddim_sampling`` / ``PLMSSampler.plms_sampling`` written out in float64: the
    grid of ``make_ddim_timesteps`` (past-the-end timestep dropped), ``make_ddim_sampling_parameters``, the
    index bookkeeping and the ``old_eps`` list of the original. The noise is drawn like x_T, in float32."""
    grid = torch.arange(0, 1000, 1000 // steps) + 1
    grid = grid[grid < 1000]
    alphas = ALPHAS_CUMPROD[grid]
    alphas_prev = torch.cat([ALPHAS_CUMPROD[:1], ALPHAS_CUMPROD[grid[:-1]]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    time_range = grid.flip(0).tolist()
    total_steps = len(time_range)
    img = x.double()
    old_eps: list[Tensor] = []

    def model(x: Tensor, step: int) -> Tensor:
        return closed_form_denoiser(x, torch.full((x.shape[0],), float(step), dtype=torch.float64))

    def x_prev_and_pred_x0(x: Tensor, e_t: Tensor, index: int) -> Tensor:
        a_t, a_prev, sigma_t = alphas[index], alphas_prev[index], sigmas[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        dir_xt = (1 - a_prev - sigma_t**2).sqrt() * e_t
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        if eta > 0:
            x_prev = x_prev + sigma_t * torch.randn(x.shape, generator=generator).double()
        return x_prev

    for i, step in enumerate(time_range):
        index = total_steps - i - 1
        e_t = model(img, step)
        if not plms_:
            img = x_prev_and_pred_x0(img, e_t, index)
            continue
        if len(old_eps) == 0:
            step_next = time_range[min(i + 1, len(time_range) - 1)]
            e_t_next = model(x_prev_and_pred_x0(img, e_t, index), step_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        img = x_prev_and_pred_x0(img, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return img


def run_diffusers(scheduler: DDIMScheduler | PNDMScheduler, x: Tensor, steps: int, **step_kwargs) -> Tensor:
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = closed_form_denoiser(x, t.float().expand(x.shape[0]))
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [50, 20, 10])
def test_ddim_matches_diffusers(steps: int, eta: float) -> None:
    x_T = start_noise()
    scheduler = DDIMScheduler(**ORIGINAL_DDIM, clip_sample=False)
    expected = run_diffusers(scheduler, x_T, steps, eta=eta, generator=torch.Generator().manual_seed(1))
    assert scheduler.timesteps.flip(0).tolist() == list(range(1, 1000, 1000 // steps))
    actual = run_sampler(
        "ddim",
        closed_form_denoiser,
        x_T,
        ALPHAS_CUMPROD,
        steps,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
    )
    assert_parity(actual, expected)


def test_ddim_eta_1_noise_is_drawn_like_diffusers() -> None:
    """With another seed the eta = 1 results differ by O(1): the parity above holds only because both draw the
    same noise, in the same order."""
    x_T = start_noise()
    scheduler = DDIMScheduler(**ORIGINAL_DDIM, clip_sample=False)
    expected = run_diffusers(scheduler, x_T, 10, eta=1.0, generator=torch.Generator().manual_seed(1))
    other_seed = run_sampler(
        "ddim",
        closed_form_denoiser,
        x_T,
        ALPHAS_CUMPROD,
        10,
        eta=1.0,
        generator=torch.Generator().manual_seed(2),
    )
    assert (other_seed - expected).abs().max() > 0.1 * expected.std()


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [6, 45, 3, 1])
def test_ddim_matches_the_original_loop_where_diffusers_differs(steps: int, eta: float) -> None:
    x_T = start_noise()
    expected = original_loop(x_T, steps, eta, torch.Generator().manual_seed(1), plms_=False)
    actual = run_sampler(
        "ddim",
        closed_form_denoiser,
        x_T,
        ALPHAS_CUMPROD,
        steps,
        eta=eta,
        generator=torch.Generator().manual_seed(1),
    )
    assert_parity(actual, expected)


@pytest.mark.parametrize("steps", [50, 20, 6, 45, 3, 2, 1])
def test_plms_matches_the_original_loop(steps: int) -> None:
    x_T = start_noise()
    counted = CountedDenoiser(closed_form_denoiser)
    actual = run_sampler("plms", counted, x_T, ALPHAS_CUMPROD, steps)
    assert_parity(actual, original_loop(x_T, steps, 0.0, None, plms_=True))
    assert counted.calls == len(range(1, 1000, 1000 // steps)) + 1


@pytest.mark.parametrize("steps", [50, 20])
def test_plms_matches_diffusers_pndm_without_runge_kutta(steps: int) -> None:
    x_T = start_noise()
    expected = run_diffusers(PNDMScheduler(**ORIGINAL_DDIM, skip_prk_steps=True), x_T, steps)
    assert_parity(run_sampler("plms", closed_form_denoiser, x_T, ALPHAS_CUMPROD, steps), expected)


def test_plms_rejects_eta() -> None:
    with pytest.raises(ValueError, match="eta must be 0, found 0.5"):
        run_sampler("plms", closed_form_denoiser, start_noise(), ALPHAS_CUMPROD, 10, eta=0.5)


def test_ddim_rejects_negative_eta() -> None:
    with pytest.raises(ValueError, match="eta must be >= 0.*found -1.0"):
        run_sampler("ddim", closed_form_denoiser, start_noise(), ALPHAS_CUMPROD, 10, eta=-1.0)


# Per sampler, for 6 requested steps: (steps taken, first and last timestep the denoiser sees). DDIM/PLMS take
# the original grid (7 steps, 997 ... 1); the sigma samplers the trailing grid (999 ... 166, Karras to 0).
STEP_CONTRACT = {name: (6, 999.0, 166.0) for name in SAMPLERS} | {
    "ddim": (7, 997.0, 1.0),
    "plms": (7, 997.0, 1.0),
    "dpmpp_2m_karras": (6, 999.0, 0.0),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_registry_samplers_share_one_signature_and_mutate_nothing(name: str) -> None:
    x_T, schedule = start_noise(torch.float64), ALPHAS_CUMPROD.clone()
    x_copy = x_T.clone()
    steps: list[StepInfo] = []
    seen_timesteps: list[float] = []

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x.shape[0],) and t.dtype == torch.float32
        seen_timesteps.append(t[0].item())
        return closed_form_denoiser(x, t)

    out = run_sampler(
        name,
        denoiser,
        x_T,
        schedule,
        6,
        eta=1.0 if SAMPLERS[name].stochastic else 0.0,
        generator=torch.Generator().manual_seed(0),
        callback=steps.append,
    )
    taken, first, last = STEP_CONTRACT[name]
    assert out.dtype == torch.float64 and out.shape == x_T.shape
    assert [(step.index, step.total) for step in steps] == [(i, taken) for i in range(taken)]
    # What each step reports: the grid's timestep, the latent after the step (the last one is the result)
    # and a clean-latent prediction of the latent's shape.
    assert steps[0].timestep == first and steps[-1].timestep == last and torch.equal(steps[-1].latent, out)
    assert all(step.x0_pred.shape == x_T.shape and step.sigma > 0 for step in steps)
    assert seen_timesteps[0] == first and seen_timesteps[-1] == last
    assert torch.equal(x_T, x_copy) and torch.equal(schedule, ALPHAS_CUMPROD)


def test_denoiser_type_is_the_sampler_argument() -> None:
    counted: Denoiser = CountedDenoiser(closed_form_denoiser)
    run_sampler("ddim", counted, start_noise(), ALPHAS_CUMPROD, 10)
    assert counted.calls == 10
