"""End-to-end inpainting vs diffusers' StableDiffusionInpaintPipeline on the same random checkpoint.

Both sides get the same PIL image, mask and start latent; diffusers' DDIM is configured like the original
(``set_alpha_to_one=False``, ``steps_offset=1``, leading spacing, eta 0) and its prompt embeddings come from the
independent text encoders (transformers / open_clip), its masked-image latent from its own VAE's posterior mean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
from PIL import Image

from ldm_inpaint.checkpoint import OUR_TEXT_PREFIX, SD1_TEXT_PREFIX, build_model
from ldm_inpaint.config import ModelConfig, load_config
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.image_io import mask_to_tensor
from ldm_inpaint.memo import MEMO_SIZE
from ldm_inpaint.pipeline import InpaintPipeline, _as_image_tensor
from ldm_inpaint.random_weights import random_checkpoint
from ldm_inpaint.samplers import SAMPLERS
from ldm_inpaint.samplers.noise import start_noise
from ldm_inpaint.tokenizer import chunk_count, tokenize

from .conftest import CONFIGS, FULL_CONFIGS, TINY_CONFIGS
from .oracles import (
    ORIGINAL_DDIM,
    diffusers_unet,
    diffusers_vae,
    openclip_context,
    openclip_tower,
    original_yaml,
    tiny_text_cfg,
    transformers_clip,
)
from .parity import assert_parity

PROMPT = "a yellow cat sitting on a park bench"
NEGATIVE = "blurry, low quality"


def sample_image(size: int, seed: int = 0) -> Image.Image:
    """A smooth colour image with some texture, as a user would give it."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1)
    pixels = 127.5 * (1 + 0.8 * base) + 10 * rng.randn(size, size, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def sample_mask(size: int) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 3 : 5 * size // 6] = 255
    return Image.fromarray(mask)


def reference_contexts(
    config: ModelConfig, checkpoint: dict, prompts: list[str], text_cfg: dict
) -> torch.Tensor:
    """Text contexts from the independent encoders, on the checkpoint's own text weights."""
    params = config.text_encoder
    tokens = tokenize(prompts, pad_token=params.pad_token).ids
    if params.layout == "openai":
        weights = {
            k.removeprefix(SD1_TEXT_PREFIX): v for k, v in checkpoint.items() if k.startswith(SD1_TEXT_PREFIX)
        }
        return transformers_clip(params, weights)(input_ids=tokens).last_hidden_state
    weights = {
        k.removeprefix(OUR_TEXT_PREFIX): v for k, v in checkpoint.items() if k.startswith(OUR_TEXT_PREFIX)
    }
    return openclip_context(openclip_tower(params, text_cfg, weights), tokens, params.layer)


def diffusers_pipeline(
    config_path: Path, checkpoint: dict, scheduler: object | None = None
) -> StableDiffusionInpaintPipeline:
    """diffusers' inpainting pipeline on the checkpoint's own UNet (4 or 9 channels) and VAE, without text
    encoder (prompt embeddings are passed in); ``scheduler`` defaults to DDIM configured as the original."""
    raw = original_yaml(config_path)
    scheduler = scheduler or DDIMScheduler(**ORIGINAL_DDIM, clip_sample=False)
    pipe = StableDiffusionInpaintPipeline(
        vae=diffusers_vae(raw, checkpoint),
        text_encoder=None,
        tokenizer=None,
        unet=diffusers_unet(raw, checkpoint),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_parity(config_path: Path, size: int, steps: int, scale: float, text_cfg: dict | None = None) -> None:
    config = load_config(config_path)
    checkpoint = random_checkpoint(config, seed=3)
    image, mask = sample_image(size), sample_mask(size)
    latent_size = (size // 8, size // 8)
    x_T = start_noise(42, 1, latent_size)

    ours = InpaintPipeline(build_model(checkpoint, config).model)
    result = ours(
        image,
        mask,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        steps=steps,
        guidance_scale=scale,
        start_latent=x_T,
    )

    theirs = diffusers_pipeline(config_path, checkpoint)
    with torch.no_grad():
        contexts = reference_contexts(
            config, checkpoint, [PROMPT, NEGATIVE], text_cfg or tiny_text_cfg(config.text_encoder)
        )
        pixels = theirs.image_processor.preprocess(image)
        binary = theirs.mask_processor.preprocess(mask)
        masked_latent = theirs.vae.encode(pixels * (binary < 0.5)).latent_dist.mean * config.scale_factor
        expected = theirs(
            prompt_embeds=contexts[:1],
            negative_prompt_embeds=contexts[1:],
            image=image,
            mask_image=mask,
            masked_image_latents=masked_latent,
            latents=x_T.clone(),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=scale,
            eta=0.0,
            output_type="latent",
        ).images
    assert result.steps_taken == steps
    assert result.images.shape == (1, 3, size, size)
    assert_parity(result.latents, expected)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_parity_with_diffusers_inpaint_tiny(version: str) -> None:
    run_parity(TINY_CONFIGS[version], size=64, steps=10, scale=7.5)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_parity_with_diffusers_inpaint_full_size(version: str) -> None:
    import open_clip

    text_cfg = open_clip.get_model_config("ViT-H-14")["text_cfg"]
    run_parity(FULL_CONFIGS[version], size=128, steps=5, scale=7.5, text_cfg=text_cfg)


@pytest.fixture(scope="module")
def tiny_pipeline() -> InpaintPipeline:
    config = load_config(TINY_CONFIGS["v1"])
    return InpaintPipeline(build_model(random_checkpoint(config, seed=5), config).model)


def test_same_seed_is_bit_identical_and_seeds_differ(tiny_pipeline: InpaintPipeline) -> None:
    image, mask = sample_image(64), sample_mask(64)
    options = dict(steps=4, guidance_scale=5.0, eta=1.0, seed=7, n_samples=2)
    first = tiny_pipeline(image, mask, prompt=PROMPT, **options)
    second = tiny_pipeline(image, mask, prompt=PROMPT, **options)
    assert torch.equal(first.latents, second.latents) and torch.equal(first.images, second.images)
    other = tiny_pipeline(image, mask, prompt=PROMPT, **{**options, "seed": 8})
    assert not torch.allclose(first.latents, other.latents)
    # eta > 0 draws fresh noise at each step from the seeded generator: it must change the result.
    deterministic = tiny_pipeline(image, mask, prompt=PROMPT, **{**options, "eta": 0.0})
    assert not torch.allclose(first.latents, deterministic.latents)


def test_vae_runs_inside_the_lean_allocator_block(
    tiny_pipeline: InpaintPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside, seen = [False], []

    @contextmanager
    def recording_block() -> Iterator[None]:
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr("ldm_inpaint.autoencoding.fresh_large_blocks", recording_block)
    vae = tiny_pipeline.model.first_stage_model
    hooks = [
        part.register_forward_pre_hook(lambda module, args, name=name: seen.append((name, inside[0])))
        for name, part in (("encoder", vae.encoder), ("decoder", vae.decoder))
    ]
    try:
        tiny_pipeline.clear_memo()
        tiny_pipeline(sample_image(64), sample_mask(64), prompt=PROMPT, steps=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert {name for name, _ in seen} == {"encoder", "decoder"} and all(flag for _, flag in seen)


def test_start_noise_is_the_original_demo_code() -> None:
    expected = np.random.RandomState(42).randn(2, 4, 8, 8).astype(np.float32)
    assert np.array_equal(start_noise(42, 2, (8, 8)).numpy(), expected)


def test_odd_sizes_are_padded_and_cropped_back(tiny_pipeline: InpaintPipeline) -> None:
    image, mask = sample_image(64).crop((0, 0, 61, 50)), sample_mask(64).crop((0, 0, 61, 50))
    result = tiny_pipeline(image, mask, prompt=PROMPT, steps=2)
    assert result.images.shape == (1, 3, 50, 61)
    assert result.latents.shape == (1, 4, 8, 8)  # padded to multiples of 32 (tiny UNet: 2 halvings)
    resized = tiny_pipeline(image, mask, prompt=PROMPT, steps=2, height=32, width=48)
    assert resized.images.shape == (1, 3, 32, 48)


def test_non_divisor_step_count_reports_the_original_grid(tiny_pipeline: InpaintPipeline) -> None:
    ticks = []
    result = tiny_pipeline(
        sample_image(64),
        sample_mask(64),
        prompt=PROMPT,
        steps=6,
        callback=lambda step: ticks.append(step.total),
    )
    assert result.steps_taken == 7 and len(ticks) == 7


def test_plms_and_guidance_scale_one_run(tiny_pipeline: InpaintPipeline) -> None:
    result = tiny_pipeline(
        sample_image(64), sample_mask(64), prompt=PROMPT, sampler="plms", steps=3, guidance_scale=1.0
    )
    assert torch.isfinite(result.latents).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 0}, r"steps: expected 1..1000 \(the training timesteps\), found 0"),
        ({"guidance_scale": -1.0}, "guidance scale: expected >= 0, found -1.0"),
        ({"sampler": "plms", "eta": 0.5}, "plms is deterministic: eta must be 0, found 0.5"),
        ({"sampler": "euler-x"}, "sampler: expected one of ddim, .*, found 'euler-x'"),
        ({"n_samples": 2, "prompt": ["a", "b", "c"]}, r"prompt: expected text, found \['a', 'b', 'c'\]"),
        ({"seed": 2**32}, "seed: expected 0..4294967295, or -1 for a random one, found 4294967296"),
        ({"stepz": 3}, "unexpected keyword argument 'stepz'; options are the fields of InpaintOptions"),
        ({"start_latent": torch.zeros(1, 4, 4, 4)}, r"start latent must have shape \(1, 4, 8, 8\)"),
    ],
)
def test_bad_options_are_clear_errors(tiny_pipeline: InpaintPipeline, options: dict, message: str) -> None:
    prompt = options.pop("prompt", PROMPT)
    with pytest.raises(LdmInpaintError, match=message):
        tiny_pipeline(sample_image(64), sample_mask(64), prompt=prompt, **options)


def test_image_and_mask_of_different_sizes(tiny_pipeline: InpaintPipeline) -> None:
    with pytest.raises(LdmInpaintError, match="resize the mask"):
        tiny_pipeline(sample_image(64), sample_mask(32), prompt=PROMPT, steps=1)


def test_empty_mask_returns_the_image(tiny_pipeline: InpaintPipeline) -> None:
    image = sample_image(64)
    result = tiny_pipeline(image, Image.new("L", (64, 64), 0), prompt=PROMPT, n_samples=2)
    assert result.notes == ["the mask is empty (nothing to repaint): returning the input image"]
    assert result.steps_taken == 0
    assert result.to_pil()[1].tobytes() == image.tobytes()


LONG_PROMPT = "a very detailed oil painting of a lighthouse on a cliff above a stormy sea at dusk, " * 8


def test_truncation_is_noted_and_long_prompts_keep_every_token(tiny_pipeline: InpaintPipeline) -> None:
    text = tiny_pipeline.encode_prompts
    tokens = tiny_pipeline.tokenize([LONG_PROMPT])
    assert tokens.truncated == [144 + 2 - 77]
    truncated = tiny_pipeline.encode_tokens(tokens.ids)
    assert torch.equal(truncated, text([LONG_PROMPT]))
    assert chunk_count(LONG_PROMPT) == 2  # 144 BPE tokens: two 75-token windows
    long = text([LONG_PROMPT, "a cat"], chunks=3)
    assert long.shape == (2, 3 * 77, truncated.shape[-1])
    # Window 0 of the long prompt is the truncated encoding's first 76 tokens plus its own end token.
    assert torch.equal(long[:1, :76], truncated[:, :76])
    # A short prompt's first window is exactly its ordinary encoding; the rest are empty windows.
    assert torch.equal(long[1:, :77], text(["a cat"]))
    assert torch.equal(long[1:, 77:154], text([""]))


def test_long_prompt_run_pads_the_negative_prompt_to_the_same_windows(tiny_pipeline: InpaintPipeline) -> None:
    result = tiny_pipeline(sample_image(64), sample_mask(64), prompt=LONG_PROMPT, steps=2, long_prompts=True)
    assert torch.isfinite(result.latents).all() and result.notes == []
    for _ in range(2):  # the second context comes from the memo, and so does its note
        cut = tiny_pipeline(sample_image(64), sample_mask(64), prompt=LONG_PROMPT, steps=1)
        assert len(cut.notes) == 1 and "69 token(s) dropped (use long prompts to keep them)" in cut.notes[0]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_end_to_end(tiny_pipeline: InpaintPipeline, sampler: str) -> None:
    eta = 1.0 if SAMPLERS[sampler].stochastic else 0.0
    result = tiny_pipeline(
        sample_image(64), sample_mask(64), prompt=PROMPT, sampler=sampler, steps=3, eta=eta, seed=1
    )
    assert result.steps_taken >= 3 and torch.isfinite(result.latents).all()


def test_paste_back_keeps_the_unmasked_pixels_exactly(tiny_pipeline: InpaintPipeline) -> None:
    image, mask = sample_image(64), sample_mask(64)
    original = _as_image_tensor(image)
    plain = tiny_pipeline(image, mask, prompt=PROMPT, steps=2)
    pasted = tiny_pipeline(image, mask, prompt=PROMPT, steps=2, paste_back=True)
    keep = mask_to_tensor(mask) < 0.5
    assert torch.equal(pasted.images[keep.expand_as(pasted.images)], original[keep.expand_as(original)])
    inside = ~keep.expand_as(pasted.images)
    assert torch.equal(pasted.images[inside], plain.images[inside])
    assert torch.equal(pasted.latents, plain.latents)
    soft = tiny_pipeline(image, mask, prompt=PROMPT, steps=2, paste_back=True, mask_blur=2.0)
    assert not torch.equal(soft.images, pasted.images)


def test_mask_grow_and_mode_change_the_conditioning_only_when_asked(tiny_pipeline: InpaintPipeline) -> None:
    image, mask = sample_image(64), sample_mask(64)
    plain = tiny_pipeline(image, mask, prompt=PROMPT, steps=2)
    assert torch.equal(tiny_pipeline(image, mask, prompt=PROMPT, steps=2, mask_grow=0).latents, plain.latents)
    assert not torch.equal(
        tiny_pipeline(image, mask, prompt=PROMPT, steps=2, mask_grow=4).latents, plain.latents
    )
    thin = Image.new("L", (64, 64), 0)
    thin.paste(255, (0, 3, 64, 4))  # a 1-pixel stroke: lost by nearest, kept by max
    nearest = tiny_pipeline(image, thin, prompt=PROMPT, steps=2, mask_mode="nearest")
    widest = tiny_pipeline(image, thin, prompt=PROMPT, steps=2, mask_mode="max")
    assert not torch.equal(nearest.latents, widest.latents)


def test_crop_to_mask_edits_only_the_box(tiny_pipeline: InpaintPipeline) -> None:
    image = sample_image(192).crop((0, 0, 192, 160))
    mask = Image.new("L", (192, 160), 0)
    mask.paste(255, (120, 30, 140, 50))
    result = tiny_pipeline(image, mask, prompt=PROMPT, steps=2, crop_to_mask=8)
    original = _as_image_tensor(image)
    assert result.images.shape == original.shape
    box = torch.zeros_like(original, dtype=torch.bool)
    box[..., 22:58, 112:148] = True
    assert torch.equal(result.images[~box], original[~box])
    assert not torch.equal(result.images[box], original[box])
    native = tiny_pipeline.native_size(36, 36)
    assert result.latents.shape[-2:] == (native[0] // 8, native[1] // 8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mask_blur": 2.0}, "use it with paste-back or crop-to-mask"),
        ({"mask_grow": -1}, "mask grow, mask blur and crop padding: expected >= 0, found -1"),
        ({"mask_mode": "mean", "steps": 1}, "mask_mode: expected one of max, nearest, found 'mean'"),
    ],
)
def test_bad_control_options(tiny_pipeline: InpaintPipeline, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(sample_image(64), sample_mask(64), prompt=PROMPT, **options)


# Image-to-image, text-to-image, strength and memoization, for both model kinds.
TEXT_TO_IMAGE_TINY = CONFIGS / "tiny" / "v1-inference-tiny.yaml"


@pytest.fixture(scope="module", params=["inpainting", "text-to-image"])
def any_pipeline(request, tiny_pipeline: InpaintPipeline) -> InpaintPipeline:
    """The tiny 9-channel inpainting pipeline, and a tiny 4-channel text-to-image one."""
    if request.param == "inpainting":
        return tiny_pipeline
    config = load_config(TEXT_TO_IMAGE_TINY)
    return InpaintPipeline(build_model(random_checkpoint(config, seed=5), config).model)


def test_text_to_image_runs_for_both_model_kinds(any_pipeline: InpaintPipeline) -> None:
    result = any_pipeline(prompt=PROMPT, height=64, width=48, steps=2, n_samples=2)
    assert result.images.shape == (2, 3, 64, 48) and result.latents.shape == (2, 4, 8, 8)
    assert result.steps_taken == result.unet_evaluations == 2
    assert torch.isfinite(result.images).all()
    assert not torch.allclose(result.latents[0], result.latents[1])


def test_text_to_image_defaults_to_the_native_size(any_pipeline: InpaintPipeline) -> None:
    """Checked through the start-latent shape, before any work: 512 px -> a 64 x 64 latent."""
    assert any_pipeline.native_side == 512
    with pytest.raises(LdmInpaintError, match=r"start latent must have shape \(1, 4, 64, 64\)"):
        any_pipeline(prompt=PROMPT, steps=1, start_latent=torch.zeros(1, 4, 8, 8))


def test_image_to_image_at_strength_1_is_text_to_image(any_pipeline: InpaintPipeline) -> None:
    """At strength 1 the image sets only the size: an inpainting model sees it fully masked (mid-gray)."""
    image = sample_image(64)
    repainted = any_pipeline(image, None, prompt=PROMPT, steps=2, seed=3)
    generated = any_pipeline(None, None, prompt=PROMPT, steps=2, seed=3, height=64, width=64)
    assert torch.equal(repainted.latents, generated.latents)


def test_image_to_image_keeps_more_of_the_image_at_lower_strength(any_pipeline: InpaintPipeline) -> None:
    """10 DDIM steps at strength 0.1 take 1 step from timestep 1: the result is the image's latent up to
    the small noise of that level; more strength, more change."""
    image = sample_image(64)
    original = any_pipeline.encode_image(_as_image_tensor(image)).float()
    change = []
    for strength, taken in [(0.1, 1), (0.3, 3), (1.0, 10)]:
        result = any_pipeline(image, None, prompt=PROMPT, steps=10, strength=strength, guidance_scale=1.0)
        assert result.steps_taken == result.unet_evaluations == taken
        change.append((result.latents - original).abs().mean().item())
    assert change[0] < change[1] < change[2] and change[0] < 0.05 * change[2]


def test_text_to_image_conditions_an_inpainting_model_on_a_full_mask_of_mid_gray(
    tiny_pipeline: InpaintPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The masked-image input is the latent of the all-masked (zero, mid-gray) image, as in training where a
    quarter of the masks cover everything; the mask input is all ones."""
    unet = tiny_pipeline.model.model.diffusion_model
    inputs = []

    def recording_forward(x_in, t, context):
        inputs.append(x_in)
        return type(unet).forward(unet, x_in, t, context)

    monkeypatch.setattr(unet, "forward", recording_forward)
    tiny_pipeline(None, None, prompt=PROMPT, height=64, width=64, steps=1, guidance_scale=1.0)
    gray = tiny_pipeline.encode_image(torch.zeros(1, 3, 64, 64))
    assert torch.equal(inputs[0][:, 4:5], torch.ones(1, 1, 8, 8))
    assert torch.equal(inputs[0][:, 5:], gray)
    assert gray.abs().max() > 0  # not a zero latent


@pytest.mark.parametrize(
    ("sampler", "steps", "strength", "taken", "evaluations"),
    [
        ("ddim", 6, 0.5, 3, 3),
        ("plms", 6, 0.5, 3, 4),
        ("heun", 4, 0.5, 2, 3),
        ("dpmpp_2s_ancestral", 3, 1.0, 3, 5),
    ],
)
def test_steps_taken_and_unet_evaluations(
    tiny_pipeline: InpaintPipeline, sampler: str, steps: int, strength: float, taken: int, evaluations: int
) -> None:
    """DDIM on 6 steps has 7 on its grid: strength 0.5 keeps int(3.5) = 3. PLMS adds one call, Heun and DPM++
    2S a two per step but the last. Guidance batches both branches into one UNet evaluation."""
    ticks = []
    result = tiny_pipeline(
        sample_image(64),
        sample_mask(64),
        prompt=PROMPT,
        sampler=sampler,
        steps=steps,
        strength=strength,
        callback=lambda step: ticks.append((step.index, step.total)),
    )
    assert result.steps_taken == taken and ticks == [(i, taken) for i in range(taken)]
    assert result.unet_evaluations == evaluations


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """Wrap ``owner.name`` so that every call appends to the returned list."""
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_contexts_and_latents_are_memoized_across_calls(
    any_pipeline: InpaintPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    any_pipeline.clear_memo()
    text_calls = _count_calls(monkeypatch, any_pipeline.model.cond_stage_model, "forward")
    vae_calls = _count_calls(monkeypatch, any_pipeline.model.first_stage_model, "encode")
    image, mask = sample_image(64), sample_mask(64)
    options = dict(steps=2, strength=0.5, negative_prompt=NEGATIVE)
    any_pipeline(image, mask, prompt=PROMPT, **options)
    # Prompt and negative prompt; the full image (start and blended known region) and, for an inpainting
    # model, the masked image.
    encodings = 2 if any_pipeline.config.is_inpainting else 1
    assert (len(text_calls), len(vae_calls)) == (2, encodings)
    any_pipeline(image, mask, prompt=PROMPT, **options, seed=9, sampler="euler")
    assert (len(text_calls), len(vae_calls)) == (2, encodings)
    any_pipeline(image, mask, prompt="another prompt", **options)  # one new context, the negative one is kept
    assert (len(text_calls), len(vae_calls)) == (3, encodings)
    any_pipeline(image, mask, prompt=PROMPT, **options, vae_tiling="on")  # tiled encodings are other latents
    assert (len(text_calls), len(vae_calls)) == (3, 2 * encodings)


def test_memo_is_bounded(tiny_pipeline: InpaintPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_pipeline.clear_memo()
    text_calls = _count_calls(monkeypatch, tiny_pipeline.model.cond_stage_model, "forward")
    prompts = [f"prompt {i}" for i in range(MEMO_SIZE + 1)]
    for prompt in prompts:
        tiny_pipeline._context([prompt], None, [])
    tiny_pipeline._context([prompts[-1]], None, [])  # still held
    assert len(text_calls) == MEMO_SIZE + 1
    tiny_pipeline._context([prompts[0]], None, [])  # the oldest was dropped
    assert len(text_calls) == MEMO_SIZE + 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (dict(strength=0.0), r"strength must be in \(0, 1\].*found 0.0"),
        (dict(strength=1.5), r"strength must be in \(0, 1\].*found 1.5"),
        (dict(strength=0.05, steps=10), "strength 0.05 keeps no step of 10; raise strength or steps"),
        (dict(image=None, mask=None, strength=0.5), "strength 0.5 < 1 starts from a noised image: pass one"),
        (dict(image=None), "a mask needs an image to inpaint"),
        (dict(mask=None, paste_back=True), "act on a mask; without one"),
        (dict(mask=None, mask_grow=3), "act on a mask; without one"),
        (dict(image=None, mask=None, crop_to_mask=4), "act on a mask; without one"),
    ],
)
def test_bad_strength_and_missing_inputs_are_clear_errors(
    tiny_pipeline: InpaintPipeline, call: dict, message: str
) -> None:
    inputs = {"image": sample_image(64), "mask": sample_mask(64)}
    inputs.update({key: call.pop(key) for key in ("image", "mask") if key in call})
    with pytest.raises(LdmInpaintError, match=message):
        tiny_pipeline(inputs["image"], inputs["mask"], prompt=PROMPT, **call)
