"""Tiled VAE encoding and decoding: the tile grid, the blending weights, exactness for local maps, and the
agreement of tiled and untiled VAE passes on random weights (tiny; full size under -m slow).

Tiled is not untiled: the VAE's GroupNorm statistics and its mid-block attention are global, a tile sees only
itself. How much that matters depends on the content:

- stationary content (i.i.d. latents / pixels), where a tile's statistics are the image's: tiled and untiled
  agree closely (tiny VAE, 48x48 latent cells in 32-cell tiles: decode mean |diff| 0.055 x the output std,
  encode 0.023 x; asserted: 0.1 x and 0.05 x);
- a smooth image, whose statistics change from tile to tile: on random weights tiled decoding differs a lot
  (tiny VAE, 384 pixels in 256-pixel tiles: mean |diff| 0.45 x the output std), as much as diffusers'
  ``tiled_decode`` on the same weights (0.44 x); asserted: no worse than diffusers' x 1.1.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm_inpaint import autoencoding, options
from ldm_inpaint.checkpoint import build_model
from ldm_inpaint.cli import build_parser
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.models.autoencoder import AutoencoderKL
from ldm_inpaint.models.tiling import blend_weights, decode_tiled, encode_tiled, map_tiles, tile_starts
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.random_weights import random_checkpoint, random_state_dict

from .conftest import FULL_CONFIGS, TINY_CONFIGS
from .oracles import diffusers_vae, original_yaml

PREFIX = "first_stage_model."


def random_vae(config_path: Path, seed: int = 0) -> AutoencoderKL:
    with torch.device("meta"):
        vae = AutoencoderKL(load_config(config_path).autoencoder)
    weights = random_state_dict(((key, t.shape) for key, t in vae.state_dict().items()), seed)
    vae.load_state_dict(weights, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def smooth_image(size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-0.8, 0.8]: slow sinusoids, no texture."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return 0.8 * torch.stack([torch.sin(6 * x + 1), torch.cos(5 * y), torch.sin(4 * (x + y))])[None]


def relative_mean_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    ratio = ((actual - expected).abs().mean() / expected.std()).item()
    print(f"tiled vs untiled: mean |diff| = {ratio:.3g} x output std")
    return ratio


@pytest.mark.parametrize("length", [1, 8, 63, 64, 65, 97, 130, 257])
@pytest.mark.parametrize(("tile", "overlap", "align"), [(64, 16, 1), (16, 5, 1), (32, 8, 8)])
def test_tile_grid_covers_odd_sizes(length: int, tile: int, overlap: int, align: int) -> None:
    length = length * align
    starts = tile_starts(length, tile, overlap, align)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(start % align == 0 for start in starts)
    strides = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(0 < stride <= tile - overlap for stride in strides)  # neighbours overlap by >= overlap
    assert max(strides, default=0) - min(strides, default=0) <= align  # evenly spread


@pytest.mark.parametrize(
    ("length", "tile", "overlap", "align", "match"),
    [
        (100, 16, 16, 1, "overlap"),
        (100, 0, 0, 1, "size"),
        (100, 32, 8, 8, "multiples of 8"),
        (96, 30, 8, 8, "30"),
    ],
)
def test_bad_tile_grids_are_rejected(length: int, tile: int, overlap: int, align: int, match: str) -> None:
    with pytest.raises(LdmInpaintError, match=match):
        tile_starts(length, tile, overlap, align)


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(112, 64, 16), (97, 64, 16), (300, 40, 13), (50, 64, 16)]
)
def test_blending_weights_sum_to_one(length: int, tile: int, overlap: int) -> None:
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    windows = blend_weights(length, starts, size, overlap)
    total = torch.zeros(length)
    for start, window in zip(starts, windows, strict=True):
        assert (window > 0).all()
        total[start : start + size] += window
    torch.testing.assert_close(total, torch.ones(length), rtol=0, atol=1e-6)
    covered_once = torch.zeros(length)
    for start in starts:
        covered_once[start : start + size] += 1
    for start, window in zip(starts, windows, strict=True):
        alone = covered_once[start : start + size] == 1
        assert (window[alone] == 1).all()  # a position only this tile covers is this tile's


def test_blending_is_a_linear_crossfade_when_the_overlap_is_exact() -> None:
    starts = tile_starts(112, 64, 16)
    assert starts == [0, 48]
    first, second = blend_weights(112, starts, 64, 16)
    ramp = (torch.arange(16) + 0.5) / 16
    torch.testing.assert_close(second[:16], ramp)
    torch.testing.assert_close(first[48:], ramp.flip(0))


def test_local_maps_are_exact_through_tiles() -> None:
    """A map without context (nearest upsampling, average pooling) must come out of the tiling unchanged: this
    checks tile placement, the scale in both directions and the blending normalisation."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 37, 50, generator=generator)
    upsample = lambda t: F.interpolate(t, scale_factor=8, mode="nearest")  # noqa: E731
    torch.testing.assert_close(map_tiles(upsample, z, 16, 5, Fraction(8)), upsample(z), rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 96, 200, generator=generator)
    pool = lambda t: F.avg_pool2d(t, 8)  # noqa: E731
    torch.testing.assert_close(map_tiles(pool, x, 64, 24, Fraction(1, 8)), pool(x), rtol=0, atol=1e-6)


def check_stationary_agreement(vae: AutoencoderKL) -> None:
    """I.i.d. latents and pixels, 48x48 latent cells, 32-cell tiles: tiled close to untiled."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 48, 48, generator=generator)
    x = torch.rand(1, 3, 384, 384, generator=generator) * 2 - 1
    with torch.no_grad():
        assert relative_mean_diff(decode_tiled(vae, z, tile=32, overlap=16), vae.decode(z)) <= 0.1
        assert relative_mean_diff(encode_tiled(vae, x, tile=256, overlap=128), vae.encode(x).mean) <= 0.05


def test_tiled_vae_agrees_with_untiled_on_stationary_content() -> None:
    check_stationary_agreement(random_vae(TINY_CONFIGS["v1"]))


@pytest.mark.slow
def test_tiled_vae_agrees_with_untiled_on_stationary_content_full_size() -> None:
    check_stationary_agreement(random_vae(FULL_CONFIGS["v1"]))


def test_tiled_decode_of_a_smooth_image_is_as_close_as_diffusers() -> None:
    config_path = TINY_CONFIGS["v1"]
    vae = random_vae(config_path)
    checkpoint = {PREFIX + key: tensor for key, tensor in vae.state_dict().items()}
    theirs = diffusers_vae(original_yaml(config_path), checkpoint)
    theirs.enable_tiling()
    theirs.tile_sample_min_size, theirs.tile_latent_min_size = 256, 32  # overlap factor 0.25: 8 cells
    with torch.no_grad():
        z = vae.encode(smooth_image(384)).mean
        untiled = vae.decode(z)
        ours = relative_mean_diff(decode_tiled(vae, z, tile=32, overlap=8), untiled)
        reference = relative_mean_diff(theirs.tiled_decode(z).sample, untiled)
    assert ours <= 1.1 * reference


@pytest.fixture(scope="module")
def tiny_pipeline() -> InpaintPipeline:
    config = load_config(TINY_CONFIGS["v1"])
    return InpaintPipeline(build_model(random_checkpoint(config, seed=5), config).model)


def test_pipeline_tiles_when_asked_or_above_the_threshold(
    tiny_pipeline: InpaintPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae, scale = tiny_pipeline.model.first_stage_model, tiny_pipeline.config.scale_factor
    latents = torch.randn(1, 4, 72, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        untiled, tiled = vae.decode(latents / scale), decode_tiled(vae, latents / scale)
        assert not torch.equal(untiled, tiled)
        assert torch.equal(tiny_pipeline.decode(latents), untiled)  # 72 <= AUTO_TILING_LATENT_SIDE
        assert torch.equal(tiny_pipeline.decode(latents, tile=True), tiled)
        monkeypatch.setattr(autoencoding, "AUTO_TILING_LATENT_SIDE", 64)
        assert torch.equal(tiny_pipeline.decode(latents), tiled)
        assert torch.equal(tiny_pipeline.decode(latents, tile=False), untiled)


def test_cli_vae_tiling_option() -> None:
    base = ["--ckpt", "m.ckpt", "--image", "a.png", "--mask", "b.png"]

    def tiling(*extra: str) -> bool | None:
        return options.from_arguments(build_parser().parse_args([*base, *extra])).tiling

    assert (
        tiling() is None and tiling("--vae-tiling", "on") is True and tiling("--vae-tiling", "off") is False
    )
