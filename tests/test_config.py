from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm_inpaint.checkpoint import BUNDLED_CONFIGS
from ldm_inpaint.config import (
    CONFIG_DIR,
    TEXT_ENCODER_PRESETS,
    bundled_config_names,
    load_config,
    parse_config,
)
from ldm_inpaint.errors import ConfigError

from .conftest import CONFIGS, TINY_CONFIGS


@pytest.mark.parametrize(
    ("name", "in_channels", "context_dim", "parameterization", "inpainting"),
    [
        ("v1-inpainting-inference", 9, 768, "eps", True),
        ("v2-inpainting-inference", 9, 1024, "eps", True),
        ("v1-inference", 4, 768, "eps", False),
        ("v2-inference", 4, 1024, "eps", False),
        ("v2-inference-v", 4, 1024, "v", False),
    ],
)
def test_original_configs_load_unchanged(name, in_channels, context_dim, parameterization, inpainting):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.unet.in_channels == in_channels
    assert config.unet.context_dim == context_dim == config.text_encoder.width
    assert config.parameterization == parameterization
    assert config.is_inpainting is inpainting
    assert config.scale_factor == 0.18215
    assert (config.schedule.linear_start, config.schedule.linear_end, config.schedule.timesteps) == (
        0.00085,
        0.012,
        1000,
    )


def test_family_specific_fields():
    v1 = load_config(CONFIGS / "v1-inpainting-inference.yaml")
    v2 = load_config(CONFIGS / "v2-inpainting-inference.yaml")
    assert (v1.unet.num_heads, v1.unet.num_head_channels, v1.unet.use_linear_in_transformer) == (8, -1, False)
    assert (v2.unet.num_heads, v2.unet.num_head_channels, v2.unet.use_linear_in_transformer) == (-1, 64, True)
    assert v1.text_encoder == TEXT_ENCODER_PRESETS["openai/clip-vit-large-patch14"]
    assert v2.text_encoder.layer == "penultimate" and v2.text_encoder.pad_token == 0
    assert v2.text_encoder.layers == 24 and v2.text_encoder.activation == "gelu"


def test_bundled_configs_resolve_by_name_through_package_resources(tmp_path: Path, monkeypatch):
    """Bare names read the package data (what a wheel ships), whatever the working directory, and cover every
    config that checkpoint detection can name."""
    monkeypatch.chdir(tmp_path)
    assert CONFIG_DIR == resources.files("ldm_inpaint") / "configs"
    names = bundled_config_names()
    assert set(BUNDLED_CONFIGS.values()) <= set(names)
    assert names == sorted(path.stem for path in CONFIGS.glob("*.yaml"))
    for name in names:
        assert load_config(name) == load_config(CONFIGS / f"{name}.yaml")
        assert load_config(name).name == name
    for path in TINY_CONFIGS.values():
        assert load_config(f"tiny/{path.stem}") == load_config(path)


def test_tiny_configs_keep_the_structure():
    for family, path in TINY_CONFIGS.items():
        tiny = load_config(path)
        full = load_config(CONFIGS / f"{family}-inpainting-inference.yaml")
        assert tiny.unet.use_linear_in_transformer == full.unet.use_linear_in_transformer
        assert tiny.text_encoder.layout == full.text_encoder.layout
        assert tiny.text_encoder.layer == full.text_encoder.layer
        assert tiny.unet.in_channels == 9 and tiny.text_encoder.width == tiny.unet.context_dim


def _raw(name: str = "v1-inpainting-inference") -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))


def test_unknown_target_is_refused_not_imported():
    raw = _raw()
    raw["model"]["params"]["unet_config"]["target"] = "os.system"
    with pytest.raises(ConfigError, match="unknown target 'os.system'"):
        parse_config(raw, "evil")


def test_unknown_model_target():
    raw = _raw()
    raw["model"]["target"] = "ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion"
    with pytest.raises(ConfigError, match="unknown model target"):
        parse_config(raw, "x")


def test_component_in_the_wrong_slot():
    raw = _raw()
    raw["model"]["params"]["unet_config"]["target"] = "ldm.models.autoencoder.AutoencoderKL"
    with pytest.raises(ConfigError, match="builds a autoencoder, expected a unet"):
        parse_config(raw, "x")


def test_architecture_parameter_we_do_not_build_is_an_error():
    raw = _raw()
    raw["model"]["params"]["unet_config"]["params"]["num_classes"] = 1000
    with pytest.raises(ConfigError, match=r"unsupported unet parameter\(s\) \['num_classes'\]"):
        parse_config(raw, "x")


def test_bad_parameterization_and_schedule():
    raw = _raw()
    raw["model"]["params"]["parameterization"] = "x0"
    with pytest.raises(ConfigError, match="parameterization must be 'eps' or 'v', found 'x0'"):
        parse_config(raw, "x")
    raw = _raw()
    raw["model"]["params"]["beta_schedule"] = "cosine"
    with pytest.raises(ConfigError, match="found 'cosine'"):
        parse_config(raw, "x")


def test_heads_must_be_set_once():
    raw = _raw()
    raw["model"]["params"]["unet_config"]["params"]["num_head_channels"] = 64
    with pytest.raises(ConfigError, match="exactly one of num_heads and num_head_channels"):
        parse_config(raw, "x")


def test_context_width_mismatch():
    raw = _raw("v2-inpainting-inference")
    raw["model"]["params"]["cond_stage_config"]["target"] = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    with pytest.raises(ConfigError, match="context_dim 1024 does not match the text encoder width 768"):
        parse_config(raw, "x")


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(
        ConfigError,
        match=r"config file not found: v3-inpainting-inference; .*\(v1-inference, v1-inpainting-inference, ",
    ):
        load_config("v3-inpainting-inference")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not a readable YAML config"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("data: {}\n")
    with pytest.raises(ConfigError, match="expected a top-level 'model:' section"):
        load_config(empty)
