"""LoRA: module names against diffusers' own, the training network (identity at start, gradients to the
adapters only, exact detach, bit-exact save/load), merging and its exact undo, and bad files refused by name.
Parity of the outputs with diffusers' LoRA loading is in ``test_lora_parity.py``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
from safetensors.torch import save_file
from torch import Tensor, nn

from ldm_inpaint.checkpoint import build_model, load_model
from ldm_inpaint.config import load_config
from ldm_inpaint.errors import LoRAError
from ldm_inpaint.lora import names
from ldm_inpaint.lora.files import parse_lora_argument, read_lora
from ldm_inpaint.lora.merge import apply_loras
from ldm_inpaint.lora.network import ATTENTION_PROJECTIONS, LoRANetwork
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.models.unet import UNetModel
from ldm_inpaint.random_weights import random_checkpoint

from .conftest import FULL_CONFIGS, TINY_CONFIGS
from .loras import random_lora, text_shapes, unet_shapes
from .oracles import original_yaml
from .parity import assert_parity


def tiny_model(version: str = "v1", seed: int = 3) -> LatentDiffusion:
    config = load_config(TINY_CONFIGS[version])
    return build_model(random_checkpoint(config, seed=seed), config).model


def unet_inputs(model: LatentDiffusion) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(2)
    params = model.config.unet
    x = torch.randn(2, params.in_channels, 16, 16, generator=generator)
    context = torch.randn(2, 77, params.context_dim, generator=generator)
    return x, torch.tensor([10.0, 700.0]), context


def trained(network: LoRANetwork, seed: int = 5) -> LoRANetwork:
    """The network with B drawn too (as after training), so that it changes the UNet."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in network.values():
            weight = adapter.lora_up.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) / adapter.rank**0.5)
    return network


def state(module: nn.Module) -> dict[str, Tensor]:
    return {key: value.clone() for key, value in module.state_dict().items()}


def assert_same_bits(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key


# ---- names ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_diffusers_paths_are_the_modules_of_diffusers_unet(version: str) -> None:
    """Every linear layer and convolution of our UNet gets the path of diffusers' module of the same shape,
    and every one of diffusers' gets one (full-size configs, on the meta device)."""
    with torch.device("meta"):
        ours = UNetModel(load_config(FULL_CONFIGS[version]).unet)
    raw = original_yaml(FULL_CONFIGS[version])
    checkpoint = {"model.diffusion_model." + key: value for key, value in ours.state_dict().items()}
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(raw, checkpoint))
    their_modules = {
        name: module for name, module in theirs.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)
    }
    paths = names.unet_paths(ours)
    assert sorted(paths.values()) == sorted(their_modules)
    for path, their_path in paths.items():
        assert ours.get_submodule(path).weight.shape == their_modules[their_path].weight.shape, path


def test_compvis_names_are_read_by_diffusers_as_our_diffusers_names() -> None:
    """A file in the original code's names and the same file in diffusers' names stand for the same
    modules: diffusers' reader of kohya files (original block names mapped by
    ``_maybe_map_sgm_blocks_to_diffusers``, then ``_convert_non_diffusers_lora_to_diffusers``) turns both into
    the same entries. (On the tiny config: with 10 or more input blocks, as in SD1, diffusers' block mapping
    takes ``input_blocks_10`` for ``input_blocks_1``; and it takes the upsampler of the deepest level, which
    follows the residual block directly there, for a transformer: those modules are left out.)"""
    model = tiny_model()
    paths = names.unet_paths(model.model.diffusion_model)
    kept = {ours: theirs for ours, theirs in paths.items() if "upsamplers" not in theirs}
    assert len(kept) == len(paths) - 2
    shapes = {ours: model.model.diffusion_model.get_submodule(ours).weight.shape for ours in kept}
    compvis = random_lora({names.file_name("lora_unet_", p): s for p, s in shapes.items()}, seed=1)
    ours = random_lora({names.file_name("lora_unet_", kept[p]): s for p, s in shapes.items()}, seed=1)
    unet_config = type("UNetConfig", (), {"layers_per_block": model.config.unet.num_res_blocks})
    from_compvis = _convert_non_diffusers_lora_to_diffusers(
        _maybe_map_sgm_blocks_to_diffusers(compvis, unet_config)
    )
    from_ours = _convert_non_diffusers_lora_to_diffusers(ours)
    assert from_compvis[1] == from_ours[1]  # alphas
    assert_same_bits(from_compvis[0], from_ours[0])
    targets = names.unet_targets(model.model.diffusion_model)
    for ours_path, their_path in names.unet_paths(model.model.diffusion_model).items():
        compvis_name = names.file_name(names.UNET_PREFIX, ours_path)
        assert targets[compvis_name] == targets[names.file_name(names.UNET_PREFIX, their_path)]


def test_text_names_cover_every_matrix_of_the_encoder_layers() -> None:
    model = tiny_model("v1")
    text = model.cond_stage_model.model
    targets = names.text_targets(text)
    assert set(targets) == set(text_shapes(model, text.params.layers))
    q = targets["lora_te_text_model_encoder_layers_1_self_attn_q_proj"]
    v = targets["lora_te_text_model_encoder_layers_1_self_attn_v_proj"]
    assert (q.module, q.parameter, q.part, v.part) == ("transformer.resblocks.1.attn", "in_proj_weight", 0, 2)
    assert (
        targets["lora_te_text_model_encoder_layers_0_mlp_fc2"].module == "transformer.resblocks.0.mlp.c_proj"
    )


# ---- the training network -------------------------------------------------------------------------------


def test_new_network_is_the_identity_and_detaches_exactly() -> None:
    model = tiny_model()
    unet = model.model.diffusion_model
    keys_before = list(unet.state_dict())
    network = LoRANetwork.create(unet, rank=4)
    assert len(network) == 4 * len(names.attention_paths(unet, ("attn1", "attn2")))  # q, k, v, out of each
    assert all(adapter.alpha.item() == 4 and adapter.scale == 1.0 for adapter in network.values())
    x, t, context = unet_inputs(model)
    with torch.no_grad():
        base = unet(x, t, context)
        network.attach(unet)
        assert list(unet.state_dict()) == keys_before
        assert torch.equal(unet(x, t, context), base)  # B = 0: exactly the base model
        trained(network)
        changed = unet(x, t, context)
        network.detach()
        after = unet(x, t, context)
    assert (changed - base).abs().max() > 0.1 * base.std()
    assert torch.equal(after, base)
    assert list(unet.state_dict()) == keys_before
    network.attach(unet)
    assert not copy.deepcopy(network).attached  # the hooks stay with the network that attached them


def test_training_gradients_reach_the_adapters_only() -> None:
    model = tiny_model()
    unet = model.model.diffusion_model.requires_grad_(False)
    network = LoRANetwork.create(unet, rank=2, alpha=1)
    network.attach(unet)
    x, t, context = unet_inputs(model)
    unet(x, t, context).square().mean().backward()
    assert all(parameter.grad is None for parameter in unet.parameters())
    # B starts at zero, so only B's gradient is nonzero at the first step (dL/dA = B^T ...)
    for name, adapter in network.items():
        assert adapter.lora_up.weight.grad.abs().max() > 0, name
        assert adapter.lora_down.weight.grad is not None
        assert not adapter.alpha.requires_grad
    assert {id(p) for p in network.parameters()} == {
        id(p) for a in network.values() for p in (a.lora_down.weight, a.lora_up.weight)
    }


def test_save_load_round_trip_is_bit_exact_and_never_overwrites(tmp_path: Path) -> None:
    model = tiny_model()
    unet = model.model.diffusion_model
    network = trained(LoRANetwork.create(unet, rank=3, alpha=1.5, projections=("attn2.to_k", "ff.net.2")))
    path = network.save(tmp_path / "style.safetensors")
    entries = read_lora(path)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert name in entries.modules and entries.metadata["ss_network_dim"] == "3"
    assert entries.modules[name].alpha == 1.5
    loaded = LoRANetwork.load(path, unet)
    assert_same_bits(state(loaded), state(network))
    with pytest.raises(LoRAError, match="already exists; it is never overwritten"):
        network.save(path)


def test_hooks_compute_what_the_merged_weights_compute(tmp_path: Path) -> None:
    model = tiny_model("v2")
    unet = model.model.diffusion_model
    network = trained(LoRANetwork.create(unet, rank=4, alpha=2, projections=ATTENTION_PROJECTIONS))
    network.multiplier = 0.6
    path = network.save(tmp_path / "a.safetensors")
    x, t, context = unet_inputs(model)
    with torch.no_grad():
        network.attach(unet)
        hooked = unet(x, t, context)
        network.detach()
        merged = apply_loras(model, [(read_lora(path), 0.6)])
        assert_parity(unet(x, t, context), hooked)
        merged.remove()


# ---- merging --------------------------------------------------------------------------------------------


def test_both_name_styles_merge_the_same_weights(tmp_path: Path) -> None:
    model = tiny_model()
    diffusers_style = random_lora(unet_shapes(model, "diffusers"), seed=1)
    compvis_style = random_lora(unet_shapes(model, "compvis"), seed=1)
    assert diffusers_style.keys() != compvis_style.keys()
    merged_weights = []
    for number, entries in enumerate((diffusers_style, compvis_style)):
        save_file(entries, tmp_path / f"{number}.safetensors")
        merged = apply_loras(model, [(read_lora(tmp_path / f"{number}.safetensors"), 1.0)])
        merged_weights.append(state(model))
        assert [(a.unet_modules, a.text_modules) for a in merged.applied] == [(len(unet_shapes(model)), 0)]
        merged.remove()
    assert_same_bits(merged_weights[1], merged_weights[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remove_restores_every_weight_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    """UNet (every module, packed convolutions included) and text encoder, two LoRAs stacked."""
    config = load_config(TINY_CONFIGS["v1"])
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": random_checkpoint(config, seed=3)}, checkpoint)
    pack = dtype == torch.float32
    model = load_model(checkpoint, config, dtype=dtype, pack=pack).model
    x, t, context = unet_inputs(model)
    with torch.no_grad():
        model.model.diffusion_model(x.to(dtype), t, context.to(dtype))  # packs the convolutions
    before = state(model)
    shapes = unet_shapes(model) | text_shapes(model, config.text_encoder.layers)
    for seed in (1, 2):
        save_file(random_lora(shapes, seed=seed), tmp_path / f"{seed}.safetensors")
    loras = [(read_lora(tmp_path / "1.safetensors"), 0.8), (read_lora(tmp_path / "2.safetensors"), -0.5)]
    merged = apply_loras(model, loras)
    changed = state(model)
    # q, k and v of a text layer change one tensor, its stacked in_proj
    changed_tensors = len(unet_shapes(model)) + 4 * config.text_encoder.layers
    assert sum(not torch.equal(changed[key], before[key]) for key in before) == changed_tensors
    merged.remove()
    assert_same_bits(state(model), before)


def test_a_file_that_does_not_fit_changes_nothing(tmp_path: Path) -> None:
    model = tiny_model("v1")
    before = state(model)
    entries = random_lora(unet_shapes(model), seed=1)
    entries[NAME.replace("attn1_to_q", "attn2_to_k") + ".lora_down.weight"] = torch.ones(
        4, 64
    )  # a wider context (SD2: 1024)
    save_file(entries, tmp_path / "sd2.safetensors")
    good = tmp_path / "good.safetensors"
    save_file(random_lora(unet_shapes(model), seed=1), good)
    with pytest.raises(LoRAError, match=r"attn2_to_k: lora_down \(4, 64\) .* do not fit the model's weight"):
        apply_loras(model, [(read_lora(good), 1.0), (read_lora(tmp_path / "sd2.safetensors"), 1.0)])
    assert_same_bits(state(model), before)


# ---- bad files ------------------------------------------------------------------------------------------

NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({f"{NAME}.lora_down.weight": torch.ones(2, 32)}, f"LoRA module {NAME} has no lora_up weight"),
        (
            {f"{NAME}.hada_w1_a": torch.ones(2, 2), f"{NAME}.hada_w1_b": torch.ones(2, 2)},
            "LoHa entries .*; only LoRA",
        ),
        ({"model.diffusion_model.out.2.weight": torch.ones(4)}, "1 key.* that are not LoRA entries"),
        (
            {
                "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.ones(
                    2, 32
                ),
                "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.ones(
                    32, 2
                ),
            },
            "1 of 1 LoRA module.* name no module of this model .*another model",
        ),
        ({}, "holds no LoRA modules"),
    ],
)
def test_bad_files_are_refused_by_name(tmp_path: Path, entries: dict[str, Tensor], message: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(entries, path)
    with pytest.raises(LoRAError, match=message):
        apply_loras(tiny_model(), [(read_lora(path), 1.0)])


def test_files_that_are_no_checkpoint_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.safetensors"
    path.write_text("not a LoRA")
    with pytest.raises(LoRAError, match=r"LoRA file: .*notes.safetensors: expected a PyTorch checkpoint"):
        read_lora(path)


def test_the_training_network_takes_unet_modules_only(tmp_path: Path) -> None:
    model = tiny_model()
    save_file(random_lora(text_shapes(model, 1)), tmp_path / "te.safetensors")
    with pytest.raises(LoRAError, match="6 module.* outside the unet"):
        LoRANetwork.load(tmp_path / "te.safetensors", model.model.diffusion_model)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("style.safetensors", (Path("style.safetensors"), 1.0)),
        ("style.safetensors:0.8", (Path("style.safetensors"), 0.8)),
        ("dir/a:b.safetensors:-1.5", (Path("dir/a:b.safetensors"), -1.5)),
        ("dir/a:b.safetensors", (Path("dir/a:b.safetensors"), 1.0)),
    ],
)
def test_lora_arguments(text: str, expected: tuple[Path, float]) -> None:
    assert parse_lora_argument(text) == expected


def test_lora_argument_weight_must_be_finite() -> None:
    with pytest.raises(LoRAError, match="finite weight, found nan"):
        parse_lora_argument("style.safetensors:nan")


def test_rank_must_be_positive() -> None:
    with pytest.raises(LoRAError, match="rank must be a positive integer, found 0"):
        LoRANetwork.create(tiny_model().model.diffusion_model, rank=0)
