"""The one options object: one default per option for the API, the command line and the ablations; one
validate(); values parsed the same way from every surface; metadata with every option."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest
from PIL import Image

from ldm_inpaint import options
from ldm_inpaint.ablation.cli import build_parser as ablate_parser
from ldm_inpaint.ablation.study import build_study
from ldm_inpaint.cli import build_parser
from ldm_inpaint.options import MAX_SEED, RANDOM_SEED, InpaintOptions, OptionError


def test_command_line_defaults_are_the_api_defaults() -> None:
    args = build_parser().parse_args(["--ckpt", "model.ckpt"])
    assert options.from_arguments(args) == InpaintOptions()
    assert InpaintOptions().seed == 42  # the original demos' seed, everywhere


def test_ablation_defaults_are_the_api_defaults(tmp_path) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    Image.new("L", (8, 8)).save(tmp_path / "a_mask.png")
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"")
    args = ablate_parser().parse_args(["--ckpt", str(checkpoint), "--batch", str(tmp_path), "--out", "x"])
    study = build_study(args)
    defaults = InpaintOptions()
    assert {name: study.fixed[name] for name in options.SWEEPABLE} == {
        name: getattr(defaults, name) for name in options.SWEEPABLE
    }


def test_every_option_is_on_the_command_line_and_in_the_metadata() -> None:
    parser = build_parser()
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for option in fields(InpaintOptions):
        assert "--" + option.name.replace("_", "-") in flags
    assert "--scale" in flags  # the older name of --guidance-scale
    metadata = InpaintOptions(crop_to_mask=None, height=64).to_metadata()
    assert set(metadata) == {option.name for option in fields(InpaintOptions)}
    assert metadata["crop_to_mask"] == "" and metadata["height"] == "64" and metadata["paste_back"] == "False"


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("steps", "20", 20),
        ("guidance_scale", "7", 7.0),
        ("paste_back", "yes", True),
        ("crop_to_mask", "none", None),
        ("prompt", "42", "42"),
        ("sampler", "euler", "euler"),
    ],
)
def test_values_are_parsed_from_text(name: str, text: str, value: object) -> None:
    parsed = options.parse_value(name, text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("steps", "2.5", "steps: expected an integer, found '2.5'"),
        ("guidance_scale", "inf", "guidance_scale: expected a finite number, found inf"),
        ("paste_back", "maybe", "paste_back: expected true or false, found 'maybe'"),
        ("prompt", 3, "prompt: expected text, found 3"),
        ("sampler", "dpm9", "sampler: expected one of ddim, dpmpp_2m"),
        ("steps", True, "steps: expected an integer, found True"),
    ],
)
def test_bad_values_are_refused_by_name(name: str, value: object, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        options.parse_value(name, value)


def test_command_line_values_go_through_the_same_parser(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--ckpt", "m.ckpt", "--steps", "2.5"])
    assert exit_.value.code == 2
    assert "steps: expected an integer, found '2.5'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "inputs", "message"),
    [
        ({"seed": -2}, {}, f"seed: expected 0..{MAX_SEED}, or -1"),
        ({"seed": MAX_SEED + 1}, {}, f"found {MAX_SEED + 1}"),
        ({"eta": 0.5, "sampler": "euler"}, {}, "euler is deterministic: eta must be 0, found 0.5"),
        ({"strength": 0.05, "steps": 10}, {}, "strength 0.05 keeps no step of 10"),
        ({"strength": 0.5}, {"has_image": False, "has_mask": False}, "strength 0.5 < 1 starts from a noised"),
        ({}, {"has_image": False}, "a mask needs an image to inpaint"),
        ({"mask_blur": 2.0}, {}, "mask blur softens the paste-back composite"),
        ({"paste_back": True}, {"has_mask": False}, "act on a mask; without one"),
        ({"height": 0}, {}, "height: expected a positive number of pixels, found 0"),
        ({"vae_tiling": "sometimes"}, {}, "vae_tiling: expected one of auto, on, off, found 'sometimes'"),
        ({"steps": 1001}, {}, r"steps: expected 1..1000 \(the training timesteps\), found 1001"),
    ],
)
def test_validate_names_what_is_wrong(changes: dict, inputs: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        InpaintOptions(**changes).validate(**inputs)


def test_random_seed_is_drawn_once_and_recorded() -> None:
    fixed = InpaintOptions(seed=7)
    assert fixed.with_seed() is fixed
    drawn = {InpaintOptions(seed=RANDOM_SEED).with_seed().seed for _ in range(8)}
    assert all(0 <= seed <= MAX_SEED for seed in drawn) and len(drawn) > 1


def test_ablation_accepts_the_old_key_scale() -> None:
    assert options.options_from({"scale": "3"}).guidance_scale == 3.0
    with pytest.raises(OptionError, match="unknown option 'colour'"):
        options.options_from({"colour": "red"})


def test_arguments_without_defaults_mean_not_given() -> None:
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, with_defaults=False)
    args = parser.parse_args(["--steps", "3", "--no-paste-back"])
    given = options.from_arguments(args, InpaintOptions(paste_back=True, seed=5))
    assert given == InpaintOptions(steps=3, paste_back=False, seed=5)
