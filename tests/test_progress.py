"""What a caller that stays alive needs from the pipeline (a server, a notebook): the step callback's state,
cancellation that lets go of the run, a cheap preview, a random seed recorded, one pipeline shared by
threads, and no process-wide state left changed."""

from __future__ import annotations

import gc
import threading
import warnings
import weakref

import pytest
import torch

from ldm_inpaint.checkpoint import build_model
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import Cancelled
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.preview import latent_to_rgb
from ldm_inpaint.random_weights import random_checkpoint
from ldm_inpaint.samplers import StepInfo

from .conftest import TINY_CONFIGS
from .test_pipeline import PROMPT, sample_image, sample_mask


@pytest.fixture(scope="module")
def pipeline() -> InpaintPipeline:
    config = load_config(TINY_CONFIGS["v1"])
    return InpaintPipeline(build_model(random_checkpoint(config, seed=5), config).model)


def test_callback_sees_each_step_and_its_predictions(pipeline: InpaintPipeline) -> None:
    steps: list[StepInfo] = []
    result = pipeline(
        sample_image(64),
        sample_mask(64),
        prompt=PROMPT,
        steps=4,
        callback=lambda step: steps.append(StepInfo(**{**vars(step), "latent": step.latent.clone()})),
    )
    assert [(step.index, step.total) for step in steps] == [(i, 4) for i in range(4)]
    assert [step.timestep for step in steps] == [751.0, 501.0, 251.0, 1.0]  # the original DDIM grid
    assert steps[0].sigma > steps[-1].sigma > 0
    assert torch.equal(steps[-1].latent.float().cpu(), result.latents)
    assert all(step.x0_pred.shape == result.latents.shape for step in steps)


def test_preview_is_a_small_rgb_image_of_the_latent() -> None:
    latent = torch.zeros(2, 4, 8, 6)
    latent[:, 0] = 1.0
    rgb = latent_to_rgb(latent)
    assert rgb.shape == (2, 8, 6, 3) and rgb.dtype == torch.uint8
    # channel 0 alone maps to the first row of the factors: (0.3512, 0.2297, 0.3227) -> pixels
    assert rgb[0, 0, 0].tolist() == [round((1 + factor) * 127.5) for factor in (0.3512, 0.2297, 0.3227)]


def test_cancelling_from_the_callback_stops_the_run_and_frees_it(pipeline: InpaintPipeline) -> None:
    seen: list[weakref.ref] = []

    def cancel(step: StepInfo) -> None:
        seen.append(weakref.ref(step.latent))
        if step.index == 1:
            raise Cancelled("stop after two steps")

    with pytest.raises(Cancelled, match="stop after two steps") as caught:
        pipeline(sample_image(64), sample_mask(64), prompt=PROMPT, steps=10, callback=cancel)
    assert len(seen) == 2
    # Raised again by the pipeline after the sampler's frames are gone: no chained exception, and nothing
    # the run made is still held by the traceback.
    assert caught.value.__context__ is None and caught.value.__cause__ is None
    gc.collect()
    assert all(ref() is None for ref in seen)
    # The pipeline is still usable.
    assert pipeline(sample_image(64), sample_mask(64), prompt=PROMPT, steps=1).steps_taken == 1


def test_random_seed_is_recorded_on_the_result(pipeline: InpaintPipeline) -> None:
    first = pipeline(sample_image(64), sample_mask(64), prompt=PROMPT, steps=1, seed=-1)
    assert first.options.seed != -1
    again = pipeline(sample_image(64), sample_mask(64), prompt=PROMPT, steps=1, seed=first.options.seed)
    assert torch.equal(first.latents, again.latents)


def test_threads_sharing_a_pipeline_get_the_serial_results(pipeline: InpaintPipeline) -> None:
    pipeline.clear_memo()
    prompts = ["a red bench", "a blue door", "a green field"]
    serial = {p: pipeline(sample_image(64), sample_mask(64), prompt=p, steps=2).latents for p in prompts}
    pipeline.clear_memo()
    results: dict[str, torch.Tensor] = {}

    def run(prompt: str) -> None:
        results[prompt] = pipeline(sample_image(64), sample_mask(64), prompt=prompt, steps=2).latents

    threads = [threading.Thread(target=run, args=(prompt,)) for prompt in prompts * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(torch.equal(results[prompt], serial[prompt]) for prompt in prompts)


def test_a_call_warns_nothing_and_changes_no_process_state(pipeline: InpaintPipeline) -> None:
    """Messages come back on the result; warnings' formatting and filters are untouched."""
    format_before, filters_before = warnings.formatwarning, list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipeline(sample_image(64), torch.zeros(1, 1, 64, 64), prompt=PROMPT, steps=1)
    assert caught == [] and result.notes == [
        "the mask is empty (nothing to repaint): returning the input image"
    ]
    assert warnings.formatwarning is format_before and warnings.filters == filters_before
