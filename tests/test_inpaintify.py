"""``ldm-inpaint convert --to-inpainting``: a text-to-image checkpoint expanded to the 9-channel inpainting
layout as the original ``LatentFinetuneDiffusion.init_from_ckpt`` does it (``keep_finetune_dims=4``), its
config detected or written beside it, and the expanded UNet blind to the five new channels."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from ldm_inpaint.checkpoint import ema_key, load_model, to_file_layout
from ldm_inpaint.checkpoint_files import read_checkpoint, write_with_config
from ldm_inpaint.cli import main
from ldm_inpaint.config import ModelConfig, load_config
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.files import sha256_file
from ldm_inpaint.inpaintify import CONV_IN, expand_conv_in, expand_entries
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.random_weights import random_checkpoint
from ldm_inpaint.schedule import ddpm_buffers

from .parity import PARITY_RTOL, assert_parity

CONV_IN_EMA = ema_key(CONV_IN)
CONV_IN_BIAS = "model.diffusion_model.input_blocks.0.0.bias"
# Tiny text-to-image sources and the bundled tiny inpainting config each must become (an independent oracle).
TINY = {
    "v1": ("tiny/v1-inference-tiny", "tiny/v1-inpainting-tiny", "eps"),
    "v2-v": ("tiny/v2-inference-v-tiny", "tiny/v2-inpainting-tiny", "v"),
}


@dataclass
class Source:
    family: str
    config: ModelConfig
    tensors: dict[str, Tensor]
    path: Path


@pytest.fixture(scope="module", params=list(TINY))
def source(request, tmp_path_factory) -> Source:
    """A tiny text-to-image training file: fp32 UNet with a LitEma copy, an fp16 VAE, integer extras."""
    config = load_config(TINY[request.param][0])
    weights = random_checkpoint(config, seed=6)
    weights = {k: v.half() if k.startswith("first_stage_model.") else v for k, v in weights.items()}
    ema = {ema_key(k): v - 0.5 for k, v in weights.items() if k.startswith("model.")}
    extras = {"model_ema.num_updates": torch.tensor(12, dtype=torch.int)}
    tensors = {**weights, **ema, **extras}
    path = tmp_path_factory.mktemp(request.param) / "text-to-image.ckpt"
    torch.save({"state_dict": tensors, "global_step": 5}, path)
    return Source(request.param, config, tensors, path)


def run(capsys, *args: object) -> tuple[int, str, list[str]]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def inpaintify_file(capsys, source: Source, destination: Path) -> list[str]:
    code, out, err = run(
        capsys, "convert", source.path, destination, "--to-inpainting", "--config", TINY[source.family][0]
    )
    assert code == 0, err
    assert out == f"{sha256_file(destination)}  {destination}\n"
    return err


def expected_expansion(weight: Tensor) -> Tensor:
    """The rule, written out: the old four input channels, then five of zeros."""
    zeros = torch.zeros(weight.shape[0], 5, *weight.shape[2:], dtype=weight.dtype)
    return torch.cat([weight, zeros], dim=1)


# ------------------------------------------------------------------------------------ (1) key/shape/dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_expand_conv_in_is_the_old_weight_then_zeros(dtype: torch.dtype) -> None:
    weight = torch.randn(320, 4, 3, 3).to(dtype)
    expanded = expand_conv_in(weight)
    assert expanded.shape == (320, 9, 3, 3) and expanded.dtype == dtype
    assert torch.equal(expanded[:, :4], weight) and torch.count_nonzero(expanded[:, 4:]) == 0


def test_expand_entries_changes_exactly_the_weight_and_its_ema_shadow(source: Source) -> None:
    expanded, keys = expand_entries(source.tensors)
    assert keys == [CONV_IN, CONV_IN_EMA]
    assert list(expanded) == list(source.tensors)
    for key, value in source.tensors.items():
        if key in keys:
            assert (
                torch.equal(expanded[key], expected_expansion(value)) and expanded[key].dtype == value.dtype
            )
        else:
            assert expanded[key] is value, key
    assert expanded[CONV_IN_BIAS].shape == (source.config.unet.model_channels,)


def test_converted_file_holds_every_entry_bit_identical_except_the_expanded_ones(
    source: Source, tmp_path: Path, capsys
) -> None:
    destination = tmp_path / "inpainting.safetensors"
    err = inpaintify_file(capsys, source, destination)
    assert f"ldm-inpaint: expanded to 9 input channels, the new ones zero: {CONV_IN}, {CONV_IN_EMA}" in err
    converted = read_checkpoint(destination)
    assert set(converted) == set(source.tensors)
    for key, value in source.tensors.items():
        expected = expected_expansion(value) if key in (CONV_IN, CONV_IN_EMA) else value
        assert converted[key].dtype == value.dtype and torch.equal(converted[key], expected), key


def test_ema_and_prune_apply_to_the_expanded_copy(source: Source, tmp_path: Path, capsys) -> None:
    destination = tmp_path / "ema.ckpt"
    code, _, err = run(
        capsys, "convert", source.path, destination, "--to-inpainting", "--ema", "--prune",
        "--config", TINY[source.family][0],
    )  # fmt: skip
    assert code == 0, err
    converted = read_checkpoint(destination)
    assert torch.equal(converted[CONV_IN], expected_expansion(source.tensors[CONV_IN_EMA]))
    assert not any(key.startswith("model_ema.") for key in converted)


# ------------------------------------------------------------------------------------ (2) the UNet's output


def test_expanded_unet_ignores_the_new_channels(source: Source, tmp_path: Path, capsys) -> None:
    """Both files loaded as they are (the result through its config beside it): for any content of the five
    new channels the 9-channel UNet gives one output, the 4-channel UNet's (within the parity bar). With
    non-zero weights on the new channels the same test fails: it can tell."""
    destination = tmp_path / "inpainting.safetensors"
    inpaintify_file(capsys, source, destination)
    unet_4 = load_model(source.path, source.config).model.model.diffusion_model
    unet_9 = load_model(destination).model.model.diffusion_model
    generator = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([17.0, 901.0])
    context = torch.randn(2, 7, source.config.unet.context_dim, generator=generator)
    with torch.no_grad():
        expected = unet_4(x_t, t, context)
        draws = [
            unet_9(torch.cat([x_t, scale * torch.randn(2, 5, 8, 8, generator=generator)], 1), t, context)
            for scale in (1.0, 1000.0)
        ]
        draws.append(unet_9(torch.cat([x_t, torch.zeros(2, 5, 8, 8)], 1), t, context))
        for output in draws:
            assert torch.equal(output, draws[0])  # 0 * c is exactly 0: the same sums, term by term
            assert_parity(output, expected)
        unet_9.input_blocks[0][0].weight[:, 4:] = 0.01
        control = unet_9(torch.cat([x_t, torch.randn(2, 5, 8, 8, generator=generator)], 1), t, context)
    assert (control - expected).abs().max() > PARITY_RTOL * expected.std()


# ------------------------------------------------------------------------------------ (3) detection


def broadcast_checkpoint(config: ModelConfig) -> dict[str, Tensor]:
    """A full-size checkpoint of ``config`` in the file layout at no memory cost: each weight is one value
    broadcast to its shape (stride 0, saved as one element), plus the real schedule buffers. Detection and
    the strict checks look at keys, shapes and dtypes only."""
    with torch.device("meta"):
        shapes = to_file_layout(LatentDiffusion(config).state_dict(), config)
    one = torch.ones(())
    return {
        **{key: one.expand(value.shape) for key, value in shapes.items()},
        **ddpm_buffers(config.schedule),
    }


@pytest.mark.parametrize(
    ("source_config", "detected"),
    [("v1-inference", "v1-inpainting-inference"), ("v2-inference", "v2-inpainting-inference")],
)
def test_full_size_sd1_and_sd2_results_are_detected_as_the_inpainting_configs(
    source_config: str, detected: str, tmp_path: Path, capsys
) -> None:
    source = tmp_path / "text-to-image.ckpt"
    torch.save({"state_dict": broadcast_checkpoint(load_config(source_config))}, source)
    destination = tmp_path / "inpainting.ckpt"
    code, _, err = run(capsys, "convert", source, destination, "--to-inpainting")
    assert code == 0, err
    how = f"the inpainting variant of {source_config}, detected from the checkpoint"
    assert err[0] == f"ldm-inpaint: config {detected} ({how})"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["inpainting.ckpt", "text-to-image.ckpt"]
    loaded = load_model(destination)
    assert loaded.config == load_config(detected) and loaded.config_source == "detected from the checkpoint"


def test_full_size_v_model_keeps_v_through_the_config_written_beside_it(tmp_path: Path, capsys) -> None:
    source = tmp_path / "v2-1_768.ckpt"
    torch.save({"state_dict": broadcast_checkpoint(load_config("v2-inference-v"))}, source)
    destination = tmp_path / "v2-1_768-inpainting.ckpt"
    code, _, err = run(
        capsys, "convert", source, destination, "--to-inpainting", "--config", "v2-inference-v"
    )
    assert code == 0, err
    config_file = tmp_path / "v2-1_768-inpainting.yaml"
    assert f"ldm-inpaint: wrote its config {config_file}" in err
    expected = replace(load_config("v2-inpainting-inference"), name=destination.stem, parameterization="v")
    assert load_config(config_file) == expected
    loaded = load_model(destination)
    assert loaded.config == expected and loaded.config_source == f"{config_file.name} beside the checkpoint"
    code, out, _ = run(capsys, "inspect", destination)
    assert code == 0
    assert (
        f"config      {destination.stem} ({config_file.name} beside the checkpoint): SD2 inpainting, "
        "v-prediction"
    ) in out.splitlines()


def test_tiny_results_load_through_the_config_beside_them(source: Source, tmp_path: Path, capsys) -> None:
    """A tiny config is not detectable, so its inpainting variant is written beside the result too; the
    result loads without --config, in the loader, ``inspect`` and the pipeline alike."""
    destination = tmp_path / "tiny-inpainting.safetensors"
    inpaintify_file(capsys, source, destination)
    _, oracle, parameterization = TINY[source.family]
    expected = replace(load_config(oracle), name=destination.stem, parameterization=parameterization)
    assert load_config(tmp_path / "tiny-inpainting.yaml") == expected
    assert load_model(destination).config == expected
    assert InpaintPipeline.from_checkpoint(destination).config == expected
    code, out, _ = run(capsys, "inspect", destination, "--json")
    assert code == 0 and '"config_source": "tiny-inpainting.yaml beside the checkpoint"' in out


# ------------------------------------------------------------------------------------ (4) refusals


def assert_refused(capsys, tmp_path: Path, message: str, *args: object) -> None:
    before = sorted(tmp_path.iterdir())
    code, out, err = run(capsys, "convert", *args, "--to-inpainting")
    assert code != 0 and out == ""
    assert len(err) == 1 and err[0].startswith("ldm-inpaint: error: ") and message in err[0], err
    assert sorted(tmp_path.iterdir()) == before


def test_refuses_a_source_that_is_not_a_text_to_image_sd_checkpoint(tmp_path: Path, capsys) -> None:
    inpainting = tmp_path / "inpainting.ckpt"
    torch.save(random_checkpoint(load_config("tiny/v1-inpainting-tiny")), inpainting)
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, other)
    odd = tmp_path / "odd.safetensors"
    save_file({CONV_IN: torch.zeros(32, 3, 3, 3)}, odd)
    out = tmp_path / "out.safetensors"
    assert_refused(
        capsys, tmp_path,
        f"{inpainting}: already an inpainting checkpoint ({CONV_IN} has 9 input channels); --to-inpainting "
        "expands a 4-channel text-to-image checkpoint: convert this one without it",
        inpainting, out, "--config", "tiny/v1-inpainting-tiny",
    )  # fmt: skip
    assert_refused(
        capsys, tmp_path,
        f"{other}: expected a text-to-image SD UNet, whose {CONV_IN} is [C, 4, 3, 3]; found none: is this a "
        "Stable Diffusion checkpoint?",
        other, out,
    )  # fmt: skip
    assert_refused(capsys, tmp_path, "is [C, 4, 3, 3]; found [32, 3, 3, 3]", odd, out)


def test_refuses_an_inpainting_or_missing_source_config(source: Source, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.safetensors"
    assert_refused(
        capsys, tmp_path,
        f"config {Path(TINY[source.family][1]).name} is a 9-channel hybrid config; --to-inpainting needs the "
        "source's text-to-image config (4 channels, crossattn)",
        source.path, out, "--config", TINY[source.family][1],
    )  # fmt: skip
    assert_refused(capsys, tmp_path, "cannot detect the model: UNet has 4 input channels", source.path, out)


def test_never_overwrites_the_checkpoint_or_its_config(source: Source, tmp_path: Path, capsys) -> None:
    config = TINY[source.family][0]
    for taken in ("model.safetensors", "model.yaml"):
        (tmp_path / taken).write_text("keep me")
        assert_refused(capsys, tmp_path, f"{tmp_path / taken} already exists", source.path,
                       tmp_path / "model.safetensors", "--config", config)  # fmt: skip
        assert (tmp_path / taken).read_text() == "keep me"
        (tmp_path / taken).unlink()
    assert list(tmp_path.iterdir()) == []


def test_config_is_written_first_and_removed_if_the_checkpoint_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "model.ckpt"
    (tmp_path / "model.yaml").write_text("someone else's")
    with pytest.raises(LdmInpaintError, match="model.yaml already exists; it is never overwritten"):
        write_with_config({"x": torch.zeros(2)}, path, "model: {}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.yaml"]
    (tmp_path / "model.yaml").unlink()

    def disk_full(obj: object, file: Path) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(LdmInpaintError, match="No space left on device"):
        write_with_config({"x": torch.zeros(2)}, path, "model: {}\n")
    assert list(tmp_path.iterdir()) == []
