"""Blended latent diffusion with text-to-image (4-channel) models against diffusers'
StableDiffusionInpaintPipeline driving a 4-channel UNet (which blends the noised original latent into the
known region after each step), on tiny random checkpoints.

diffusers draws a sample from the VAE posterior for the image latent (``retrieve_latents``); ours is the
posterior mean. The ``posterior_mean`` fixture patches diffusers' ``retrieve_latents`` to return the mean,
which makes both sides encode the same latents. The start noise is the same tensor on both sides: ours gets
it as ``start_latent``, diffusers draws it from a generator with the same seed (its only draw once the
posterior is not sampled). Below strength 1 both start from the original latent noised with it; at strength
1 diffusers' first UNet call sees pure noise in the known region, ours the noised original (the paper's
Algorithm 1), so parity is tested below strength 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint
from PIL import Image

from ldm_inpaint.checkpoint import build_model
from ldm_inpaint.config import load_config
from ldm_inpaint.image_io import mask_to_tensor
from ldm_inpaint.masks import to_latent
from ldm_inpaint.pipeline import InpaintPipeline, _as_image_tensor
from ldm_inpaint.random_weights import random_checkpoint
from ldm_inpaint.samplers import SAMPLERS

from .conftest import CONFIGS
from .oracles import ORIGINAL_DDIM, tiny_text_cfg
from .parity import assert_parity
from .test_k_samplers import SD_TRAILING
from .test_pipeline import NEGATIVE, PROMPT, diffusers_pipeline, reference_contexts, sample_image, sample_mask

TINY_TEXT_TO_IMAGE = {
    "v1": CONFIGS / "tiny" / "v1-inference-tiny.yaml",
    "v2-v": CONFIGS / "tiny" / "v2-inference-v-tiny.yaml",
}
SIZE = 64


@pytest.fixture
def posterior_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    def mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mean

    monkeypatch.setattr(pipeline_stable_diffusion_inpaint, "retrieve_latents", mean)


def diffusers_latents(
    config_path: Path,
    checkpoint: dict,
    scheduler,
    image: Image.Image,
    mask: Image.Image,
    *,
    seed: int,
    steps: int,
    strength: float,
    scale: float = 7.5,
    text_cfg: dict | None = None,
) -> torch.Tensor:
    """diffusers' inpainting pipeline on the checkpoint's own UNet (4 or 9 channels) and VAE, with the prompt
    embeddings of the independent text encoders (open_clip's tower built from ``text_cfg``, the tiny one by
    default); its final latents."""
    config = load_config(config_path)
    pipe = diffusers_pipeline(config_path, checkpoint, scheduler)
    with torch.no_grad():
        contexts = reference_contexts(
            config, checkpoint, [PROMPT, NEGATIVE], text_cfg or tiny_text_cfg(config.text_encoder)
        )
        return pipe(
            prompt_embeds=contexts[:1],
            negative_prompt_embeds=contexts[1:],
            image=image,
            mask_image=mask,
            height=image.height,
            width=image.width,
            num_inference_steps=steps,
            guidance_scale=scale,
            strength=strength,
            eta=0.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).images


def our_result(config_path: Path, checkpoint: dict, image, mask, *, seed: int, **options):
    """Our pipeline on the same checkpoint, with diffusers' start noise (``torch.randn`` of the seed)."""
    config = load_config(config_path)
    pipeline = InpaintPipeline(build_model(checkpoint, config).model)
    x_T = torch.randn(
        1, 4, image.height // 8, image.width // 8, generator=torch.Generator().manual_seed(seed)
    )
    return pipeline(image, mask, prompt=PROMPT, negative_prompt=NEGATIVE, start_latent=x_T, **options)


def scheduler_for(name: str, config_path: Path):
    prediction = "v_prediction" if load_config(config_path).parameterization == "v" else "epsilon"
    if name == "ddim":
        return DDIMScheduler(**{**ORIGINAL_DDIM, "prediction_type": prediction}, clip_sample=False)
    return EulerDiscreteScheduler(**{**SD_TRAILING, "prediction_type": prediction})


def run_strength_parity(
    config_path: Path, sampler: str, size: int, steps: int, strength: float, text_cfg: dict | None = None
) -> None:
    """Our pipeline against diffusers' on one random checkpoint of ``config_path``, with ``strength``."""
    checkpoint = random_checkpoint(load_config(config_path), seed=3)
    image, mask = sample_image(size), sample_mask(size)
    scheduler = scheduler_for(sampler, config_path)
    options = dict(seed=4, steps=steps, strength=strength)
    expected = diffusers_latents(
        config_path, checkpoint, scheduler, image, mask, text_cfg=text_cfg, **options
    )
    result = our_result(config_path, checkpoint, image, mask, sampler=sampler, **options)
    assert result.steps_taken == result.unet_evaluations == int(steps * strength)
    assert_parity(result.latents, expected)


@pytest.mark.usefixtures("posterior_mean")
@pytest.mark.parametrize(
    ("version", "sampler"),
    [("v1", "ddim"), ("v2-v", "ddim"), ("v1", "euler")],
    ids=["v1-ddim", "v2-v-ddim", "v1-euler"],
)
def test_blended_parity_with_diffusers_4_channel(version: str, sampler: str) -> None:
    """DDIM on the original grid (eps and v models), and Euler on the trailing grid, where both sides blend
    at the exact noise level of each step."""
    run_strength_parity(TINY_TEXT_TO_IMAGE[version], sampler, size=SIZE, steps=5, strength=0.6)


@pytest.mark.slow
@pytest.mark.usefixtures("posterior_mean")
@pytest.mark.parametrize("config_name", ["v1-inference", "v2-inference-v"])
def test_blended_parity_with_diffusers_4_channel_full_size(config_name: str) -> None:
    import open_clip

    text_cfg = open_clip.get_model_config("ViT-H-14")["text_cfg"]
    run_strength_parity(
        CONFIGS / f"{config_name}.yaml", "ddim", size=128, steps=5, strength=0.6, text_cfg=text_cfg
    )


@pytest.fixture(scope="module")
def blended_pipeline() -> InpaintPipeline:
    config = load_config(TINY_TEXT_TO_IMAGE["v1"])
    return InpaintPipeline(build_model(random_checkpoint(config, seed=5), config).model)


@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_karras", "euler_ancestral"])
def test_known_region_is_the_encoded_original_exactly(
    blended_pipeline: InpaintPipeline, sampler: str, strength: float
) -> None:
    image, mask = sample_image(SIZE), sample_mask(SIZE)
    eta = 1.0 if SAMPLERS[sampler].stochastic else 0.0
    result = blended_pipeline(
        image, mask, prompt=PROMPT, sampler=sampler, steps=3, eta=eta, strength=strength, n_samples=2
    )
    original = blended_pipeline.encode_image(_as_image_tensor(image))
    keep = (to_latent(mask_to_tensor(mask), (SIZE // 8, SIZE // 8)) < 0.5).expand_as(result.latents)
    assert torch.equal(result.latents[keep], original.expand_as(result.latents)[keep])
    repainted = result.latents[~keep] - original.expand_as(result.latents)[~keep]
    assert repainted.abs().max() > 0.1  # the masked region is repainted, not copied


def test_blending_changes_the_repainted_region_only_through_the_model(
    blended_pipeline: InpaintPipeline,
) -> None:
    """Without a mask nothing is blended (image-to-image); with one, the known region conditions the model,
    so the repainted region differs from the unblended run's."""
    image, mask = sample_image(SIZE), sample_mask(SIZE)
    options = dict(steps=4, strength=0.5, seed=2)
    free = blended_pipeline(image, None, prompt=PROMPT, **options)
    blended = blended_pipeline(image, mask, prompt=PROMPT, **options)
    repaint = (to_latent(mask_to_tensor(mask), (SIZE // 8, SIZE // 8)) > 0.5).expand_as(free.latents)
    assert not torch.allclose(free.latents[repaint], blended.latents[repaint])
