"""The trainer's parts against the original recipe's formulas: EMA, warm-up, batches, loss, data."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_inpaint.checkpoint import load_model
from ldm_inpaint.mask_generators import draw_mask
from ldm_inpaint.training.batches import BatchRecipe, make_batch
from ldm_inpaint.training.data import DataError, ImageFolder
from ldm_inpaint.training.ema import Ema
from ldm_inpaint.training.loop import WARMUP_START, warmup_factor
from ldm_inpaint.training.objective import autoencoder_losses, frozen_inputs, min_snr_weight, sample_losses
from ldm_inpaint.training.settings import SettingsError, TrainSettings
from tests.conftest import TINY_CONFIGS
from tests.training_data import make_checkpoint, make_folder

RECIPE = BatchRecipe(
    seed=3,
    batch_size=4,
    masks="lama-thick",
    p_full_mask=0.25,
    p_drop_text=0.1,
    timesteps=1000,
    latent_shape=(4, 8, 8),
)


def test_ema_follows_litema() -> None:
    """shadow <- shadow - (1 - d_n)(shadow - p), d_n = min(decay, (1 + n) / (10 + n)), n counted from 1."""
    param = torch.nn.Parameter(torch.zeros(3))
    ema = Ema([("w", param)], decay=0.5)
    expected = torch.zeros(3)
    for n in range(1, 6):
        param.data += 1.0
        decay = min(0.5, (1 + n) / (10 + n))
        expected = expected - (1 - decay) * (expected - param.data)
        ema.update()
        torch.testing.assert_close(ema.shadow["w"], expected, rtol=0, atol=0)
    entries = ema.file_entries("diffusion_model.")
    assert set(entries) == {"model_ema.diffusion_modelw", "model_ema.decay", "model_ema.num_updates"}
    assert (
        entries["model_ema.num_updates"].item() == 5 and entries["model_ema.num_updates"].dtype == torch.int32
    )
    ema.swap()
    torch.testing.assert_close(param.data, expected, rtol=0, atol=0)
    ema.swap()
    assert torch.equal(param.data, torch.full((3,), 5.0))


def test_warmup_is_the_original_lambda_linear_scheduler() -> None:
    factor = warmup_factor(100)
    assert factor(0) == WARMUP_START == 1e-6
    assert factor(50) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert factor(100) == factor(10**9) == 1.0


def test_min_snr_weight_turns_each_target_into_a_clipped_x0_loss() -> None:
    """Weighted eps (or v) error = min(SNR, gamma) x squared x0 error, sample by sample."""
    alpha_bar = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)
    x_t, x0, eps = torch.randn(3, 3, 4, dtype=torch.float64).unbind(1)
    a = alpha_bar[:, None]
    eps_prediction = eps + 0.1 * torch.randn(3, 4, dtype=torch.float64)
    x0_from_eps = (x_t - (1 - a).sqrt() * eps_prediction) / a.sqrt()
    x0_true = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    gamma = 5.0
    snr = alpha_bar / (1 - alpha_bar)
    x0_loss = snr.clamp(max=gamma) * (x0_from_eps - x0_true).pow(2).mean(1)
    eps_loss = min_snr_weight(alpha_bar, gamma, "eps") * (eps_prediction - eps).pow(2).mean(1)
    torch.testing.assert_close(eps_loss, x0_loss)
    v_true = a.sqrt() * eps - (1 - a).sqrt() * x0
    v_prediction = v_true + 0.1 * torch.randn(3, 4, dtype=torch.float64)
    x0_from_v = a.sqrt() * x_t - (1 - a).sqrt() * v_prediction
    x0_of_v = a.sqrt() * x_t - (1 - a).sqrt() * v_true
    v_loss = min_snr_weight(alpha_bar, gamma, "v") * (v_prediction - v_true).pow(2).mean(1)
    torch.testing.assert_close(v_loss, snr.clamp(max=gamma) * (x0_from_v - x0_of_v).pow(2).mean(1))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> ImageFolder:
    return ImageFolder(
        make_folder(tmp_path_factory.mktemp("data") / "images"), resolution=64, with_masks=False
    )


def test_a_sample_does_not_depend_on_the_split_of_the_batch(folder: ImageFolder) -> None:
    whole = make_batch(folder, RECIPE, 7, range(4))
    halves = [make_batch(folder, RECIPE, 7, indices) for indices in (range(2, 4), range(0, 2))]
    for name in ("image", "mask", "timesteps", "noise"):
        assert torch.equal(
            getattr(whole, name), torch.cat([getattr(halves[1], name), getattr(halves[0], name)])
        )
    assert whole.captions == halves[1].captions + halves[0].captions
    other_step = make_batch(folder, RECIPE, 8, range(4))
    assert not torch.equal(whole.noise, other_step.noise)


def test_batches_as_add_mask(folder: ImageFolder) -> None:
    full = make_batch(folder, replace(RECIPE, p_full_mask=1.0, p_drop_text=1.0), 0, range(4))
    assert torch.equal(full.mask, torch.ones(4, 1, 64, 64)) and full.captions == [""] * 4
    drawn = make_batch(folder, replace(RECIPE, p_full_mask=0.0, p_drop_text=0.0), 0, range(4))
    assert set(drawn.mask.unique().tolist()) <= {0.0, 1.0} and 0 < drawn.mask.mean() < 1
    assert all(caption.startswith("a photo number") for caption in drawn.captions)
    assert drawn.image.shape == (4, 3, 64, 64) and drawn.image.min() >= -1 and drawn.image.max() <= 1
    assert drawn.timesteps.min() >= 0 and drawn.timesteps.max() < 1000


def test_mask_files_are_cropped_with_their_image(tmp_path) -> None:
    """An image that is white exactly where its mask is (64 px high: cropped, not resized): every random
    crop keeps the two aligned."""
    from PIL import Image

    folder = tmp_path / "pairs"
    folder.mkdir()
    mask = (draw_mask("lama-thick", 64, 130, np.random.default_rng(0)) * 255).astype("uint8")
    Image.fromarray(mask).convert("RGB").save(folder / "a.png")
    Image.fromarray(mask).save(folder / "a_mask.png")
    data = ImageFolder(folder, resolution=64, with_masks=True)
    batch = make_batch(data, replace(RECIPE, masks="files", p_full_mask=0.0, batch_size=3), 0, range(3))
    white = (batch.image.mean(1, keepdim=True) > 0).float()
    assert torch.equal(white, batch.mask)


def test_the_loss_is_the_original_objective(tmp_path, folder: ImageFolder) -> None:
    """UNet input cat(x_t, mask at latent size, sf * E(image * (mask < 0.5))), MSE to eps, written out here
    from the reference formulas."""
    model = load_model(make_checkpoint(tmp_path / "m.ckpt"), TINY_CONFIGS["v1"]).model
    batch = make_batch(folder, RECIPE, 0, range(2))
    tokens = torch.zeros(2, 77, dtype=torch.long)
    losses = sample_losses(
        model, model.model.diffusion_model, batch, torch.linspace(0.99, 0.01, 1000), lambda _: tokens
    )
    vae, sf = model.first_stage_model, model.config.scale_factor
    x0 = vae.encode(batch.image).mean * sf
    masked = vae.encode(batch.image * (batch.mask < 0.5)).mean * sf
    a = torch.linspace(0.99, 0.01, 1000)[batch.timesteps][:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * batch.noise
    unet_in = torch.cat([x_t, F.interpolate(batch.mask, size=(8, 8), mode="nearest"), masked], dim=1)
    eps = model.model.diffusion_model(unet_in, batch.timesteps, model.cond_stage_model(tokens))
    torch.testing.assert_close(losses, (eps - batch.noise).pow(2).mean((1, 2, 3)))
    _, concat, _ = frozen_inputs(model, batch, lambda _: tokens)
    torch.testing.assert_close(concat, unet_in[:, 4:])


def test_gradient_checkpointing_changes_nothing(tmp_path, folder: ImageFolder) -> None:
    model = load_model(make_checkpoint(tmp_path / "m.ckpt"), TINY_CONFIGS["v1"]).model
    unet = model.model.diffusion_model.requires_grad_(True)
    batch = make_batch(folder, RECIPE, 0, range(2))
    tokens = torch.zeros(2, 77, dtype=torch.long)
    gradients = []
    for checkpointing in (False, True):
        unet.checkpointing = checkpointing
        unet.zero_grad()
        sample_losses(model, unet, batch, torch.linspace(0.99, 0.01, 1000), lambda _: tokens).sum().backward()
        gradients.append([p.grad.clone() for p in unet.parameters()])
    for plain, recomputed in zip(*gradients, strict=True):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


def test_captions_from_a_table_and_bad_images_skipped(tmp_path, capsys) -> None:
    folder = make_folder(tmp_path / "data", count=3)
    for i in range(3):
        (folder / f"img{i}.txt").unlink()
    rows = [{"file_name": "img1.png", "text": "a red door"}, {"file_name": "img2.png", "text": "a cat"}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "img0.png").write_bytes(b"not an image")
    data = ImageFolder(folder, resolution=64, with_masks=False)
    assert [e.caption for e in data.examples] == ["", "a red door", "a cat"]
    _, _, caption = data.load(0, np.random.default_rng(0))
    assert caption == "a red door" and "skipped a bad image" in capsys.readouterr().err
    (folder / "captions.csv").write_text("file_name,text\nimg1.png,x\n")
    with pytest.raises(DataError, match="keep one of them"):
        ImageFolder(folder, resolution=64, with_masks=False)
    (folder / "captions.jsonl").unlink()
    assert ImageFolder(folder, 64, False).examples[1].caption == "x"
    with pytest.raises(DataError, match="have no _mask file"):
        ImageFolder(folder, resolution=64, with_masks=True)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 6, "grad_accum": 4}, "multiple of processes x --grad-accum"),
        ({"resolution": 0}, "--resolution must be positive"),
        ({"p_full_mask": 1.5}, r"in \[0, 1\]"),
        ({"ema_decay": 1.0}, "0 \\(off\\) or in \\(0, 1\\)"),
        ({"lr": 0.0}, "--lr must be positive"),
    ],
)
def test_settings_that_cannot_run(changes: dict[str, object], message: str) -> None:
    settings = TrainSettings(
        **{"ckpt": "c", "data": "d", "out": "o", "steps": 1, "batch_size": 4, "lr": 1e-4, **changes}
    )
    with pytest.raises(SettingsError, match=message):
        settings.check()


def test_the_autoencoder_loss_is_l1_plus_weighted_kl(tmp_path, folder: ImageFolder) -> None:
    """Per sample: (sum |x - D(mean + std * eps)| + w * 0.5 * sum(mean^2 + var - 1 - log var)) / pixels."""
    vae = load_model(make_checkpoint(tmp_path / "m.ckpt"), TINY_CONFIGS["v1"]).model.first_stage_model
    batch = make_batch(folder, RECIPE, 0, range(2))
    posterior = vae.encode(batch.image)
    mean, logvar = posterior.mean, posterior.logvar
    z = mean + torch.exp(0.5 * logvar) * batch.noise
    l1 = (vae.decode(z) - batch.image).abs().sum((1, 2, 3))
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum((1, 2, 3))
    expected = (l1 + 0.3 * kl) / (3 * 64 * 64)
    torch.testing.assert_close(autoencoder_losses(vae, batch, kl_weight=0.3), expected)
