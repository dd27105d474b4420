"""PaddleNLP / ppdiffusers ``model_state.pdparams`` files, written here the way ``paddle.save`` writes them (no
Paddle needed), come back as diffusers' / transformers' state dicts bit for bit; pickles that would run code are
refused by name without running it; every other bad file is one CheckpointError line."""

from __future__ import annotations

import builtins
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

import ldm_inpaint.formats.paddle as paddle_format
from ldm_inpaint.errors import CheckpointError
from ldm_inpaint.formats.paddle import paddle_to_torch, read_pdparams

# transformers' CLIPTextModel names -> PaddleNLP's, the substring rules of ppdiffusers' conversion script
# (PaddlePaddle/PaddleNLP ppdiffusers/scripts/convert_diffusers_model/
# convert_diffusers_stable_diffusion_to_ppdiffusers.py), applied in this order: an oracle independent of the
# module's table.
TO_PADDLENLP = (
    (".encoder.", ".transformer."),
    (".layer_norm", ".norm"),
    (".mlp.", "."),
    (".fc1.", ".linear1."),
    (".fc2.", ".linear2."),
    (".final_layer_norm.", ".ln_final."),
    (".embeddings.", "."),
    (".position_embedding.", ".positional_embedding."),
)
UNET_SD15 = {"in_channels": 9, "cross_attention_dim": 768, "attention_head_dim": 8}
VAE_BLOCKS = {"down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}
VAE_SD15 = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
}


def tiny_model(component: str) -> nn.Module:
    """A diffusers / transformers model of the component's class with small random weights."""
    if component == "unet":
        model = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            **{**UNET_SD15, "cross_attention_dim": 32},
        )
    elif component == "vae":
        model = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, **VAE_BLOCKS)
    else:
        model = CLIPTextModel(
            clip_config(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
        )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return model


def clip_config(**sizes: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, **sizes
    )


def sd15_model(component: str) -> nn.Module:
    """The SD 1.5 inpainting component at full size, on the meta device (names and shapes, no memory)."""
    with torch.device("meta"):
        if component == "unet":
            return UNet2DConditionModel(**UNET_SD15)
        if component == "vae":
            return AutoencoderKL(**VAE_SD15)
        return CLIPTextModel(CLIPTextConfig())


def torch_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict; a CLIPTextModel's under the "text_model." prefix (transformers 5 drops it)."""
    prefix = "text_model." if isinstance(model, CLIPTextModel) else ""
    return {with_prefix(prefix, name): tensor for name, tensor in model.state_dict().items()}


def with_prefix(prefix: str, name: str) -> str:
    return name if name.startswith(prefix) else prefix + name


def linear_weights(model: nn.Module) -> set[str]:
    prefix = "text_model." if isinstance(model, CLIPTextModel) else ""
    return {
        with_prefix(prefix, f"{name}.weight")
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def load_strictly(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Loads ``state`` (CLIP names with "text_model.") strictly, as the model's own names have it."""
    own = model.state_dict().keys()
    names = {name: name if name in own else name.removeprefix("text_model.") for name in state}
    model.load_state_dict({names[name]: tensor for name, tensor in state.items()}, strict=True)


def paddle_layout(model: nn.Module, paddlenlp_names: bool) -> dict[str, np.ndarray]:
    """The model's weights as ppdiffusers stores them: nn.Linear weights transposed, CLIP names PaddleNLP's
    (``paddlenlp_names``) or left as transformers' (ppdiffusers' own CLIPTextModel)."""
    linear = linear_weights(model)
    arrays = {}
    for name, tensor in torch_state(model).items():
        value = tensor.t() if name in linear else tensor
        for theirs, paddle in TO_PADDLENLP if paddlenlp_names else ():
            name = name.replace(theirs, paddle)
        arrays[name] = value.numpy()
    return arrays


def paddle_save(path: Path, arrays: dict[str, object], protocol: int = 4) -> Path:
    """What ``paddle.save(layer.state_dict())`` writes (PaddlePaddle/Paddle python/paddle/framework/io.py,
    ``_legacy_save``): a pickled plain dict of numpy arrays plus its structured-name table."""
    saved = {
        **arrays,
        "StructuredToParameterName@@": {name: f"param_{i}.w_0" for i, name in enumerate(arrays)},
    }
    path.write_bytes(pickle.dumps(saved, protocol=protocol))
    return path


def one_line_error(call, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------- names and layouts


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_linear_weights_are_exactly_the_2d_weights_but_embeddings(component: str) -> None:
    """The module's rule for what to transpose, checked on the full-size SD 1.5 models' modules."""
    model = sd15_model(component)
    two_d = {
        name
        for name, tensor in torch_state(model).items()
        if tensor.ndim == 2 and name.endswith(".weight") and ".embeddings." not in name
    }
    assert two_d == linear_weights(model) != set()
    embeddings = {name for name in torch_state(model) if ".embeddings." in name}
    assert embeddings == (
        {"text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"}
        if component == "text_encoder"
        else set()
    )


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize(
    ("component", "paddlenlp_names"),
    [("unet", False), ("vae", False), ("text_encoder", True), ("text_encoder", False)],
)
def test_paddle_files_come_back_as_the_torch_state_dict(
    tmp_path: Path, component: str, paddlenlp_names: bool, protocol: int
) -> None:
    model = tiny_model(component)
    path = paddle_save(tmp_path / "model_state.pdparams", paddle_layout(model, paddlenlp_names), protocol)
    state = paddle_to_torch(component, read_pdparams(path))
    expected = torch_state(model)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    load_strictly(tiny_model(component), state)


def test_the_oracle_writes_paddlenlp_names() -> None:
    names = set(paddle_layout(tiny_model("text_encoder"), paddlenlp_names=True))
    assert {"text_model.transformer.layers.1.linear2.bias", "text_model.ln_final.weight"} <= names
    assert {"text_model.token_embedding.weight", "text_model.positional_embedding.weight"} <= names
    # the two embeddings, ln_final's weight and bias, then the table's 8 per-layer modules' x 2 layers x 2
    assert len(names) == 2 + 2 + (len(paddle_format.TEXT_ENCODER_RENAMES) - 3) * 2 * 2


def test_position_ids_are_skipped_by_name() -> None:
    state = {
        name: torch.ones(3)
        for name in ("text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias")
    }
    for skipped in paddle_format.TEXT_ENCODER_SKIPPED:
        assert paddle_to_torch("text_encoder", {**state, skipped: torch.arange(4)}).keys() == state.keys()


def test_unknown_or_mixed_text_encoder_names_are_refused() -> None:
    known = {"text_model.ln_final.weight": torch.ones(3)}
    one_line_error(
        lambda: paddle_to_torch("text_encoder", {**known, "text_model.pooler.weight": torch.ones(3, 3)}),
        r"1 names that are not a CLIP text model's .*\['text_model.pooler.weight'\]",
    )
    one_line_error(
        lambda: paddle_to_torch(
            "text_encoder", {**known, "text_model.final_layer_norm.weight": torch.ones(3)}
        ),
        "two entries for text_model.final_layer_norm.weight",
    )
    with pytest.raises(ValueError, match="component 'clip': expected one of unet, vae, text_encoder"):
        paddle_to_torch("clip", known)


# ------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("protocol", [2, 4])
def test_dtypes_and_memory_layouts_are_kept(tmp_path: Path, protocol: int) -> None:
    bf16 = torch.randn(3, 5).bfloat16()
    arrays = {
        "half": np.arange(6, dtype=np.float16).reshape(2, 3),
        "bf16": bf16.view(torch.int16).numpy().view(np.uint16),  # how Paddle stores bfloat16
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "big_endian": np.arange(4, dtype=">f4"),
        "ids": np.arange(4, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float32),  # protocol 2 stores its b"" as bytes()
    }
    state = read_pdparams(paddle_save(tmp_path / "a.pdparams", arrays, protocol))
    assert state["half"].dtype == torch.float16
    assert torch.equal(state["half"], torch.from_numpy(arrays["half"]))
    assert state["bf16"].dtype == torch.bfloat16 and torch.equal(state["bf16"], bf16)
    assert state["fortran"].is_contiguous() and torch.equal(state["fortran"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(state["big_endian"], torch.arange(4.0)) and state["ids"].dtype == torch.int64
    assert state["empty"].shape == (0, 3)


def test_files_of_numpy_1_and_numpy_2_are_read(tmp_path: Path) -> None:
    """numpy 1 pickles arrays through numpy.core.multiarray._reconstruct, numpy 2 through numpy._core's."""
    content = pickle.dumps({"w": np.arange(3, dtype=np.float32)}, protocol=2)
    path = tmp_path / "a.pdparams"
    for module in (b"numpy.core.multiarray", b"numpy._core.multiarray"):
        path.write_bytes(re.sub(rb"numpy\._?core\.multiarray", module, content))
        assert module in path.read_bytes() and torch.equal(read_pdparams(path)["w"], torch.arange(3.0))


# ------------------------------------------------------------------------------------------ refusals


class Runs:
    """Pickles as the call ``function(*args)``."""

    def __init__(self, function, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("call", ["system", "eval", "open"])
def test_pickles_that_call_code_are_refused_by_name_and_never_run(
    tmp_path: Path, call: str, protocol: int
) -> None:
    marker = tmp_path / "ran"
    runs = {
        "system": Runs(os.system, f"touch {marker}"),
        "eval": Runs(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "open": Runs(builtins.open, str(marker), "w"),
    }[call]
    path = paddle_save(tmp_path / "evil.pdparams", {"w": np.ones(2, np.float32), "x": runs}, protocol)
    one_line_error(
        lambda: read_pdparams(path), rf"refused to load: the pickle calls \w+\.{call}, which is not part"
    )
    assert not marker.exists()


def test_files_that_are_not_paddle_weights_say_what_they_are(tmp_path: Path) -> None:
    weights = {"w": np.ones((4, 4), np.float32)}
    whole = pickle.dumps(weights, protocol=4)
    cases = [
        ("not found", None),
        ("not a readable Paddle weights file", whole[: len(whole) // 2]),
        ("found first bytes b'he'", b"hello, world"),
        ("found first bytes b''", b""),
        ("found a list", pickle.dumps([weights["w"]], protocol=4)),
        ("entry 'w' is a list; expected a numpy array", pickle.dumps({"w": [1.0]}, protocol=4)),
        ("has dtype complex64", pickle.dumps({"w": np.ones(2, np.complex64)}, protocol=4)),
        ("has dtype <U1", pickle.dumps({"w": np.array(["a"])}, protocol=4)),
        ("split into slices", pickle.dumps({**weights, "UnpackBigParamInfor@@": {}}, protocol=2)),
        # ten names for one stored buffer: 40 kB of arrays from a 4 kB file
        ("entries share their data", pickle.dumps(dict.fromkeys("0123456789", np.ones(1000, np.float32)))),
    ]
    for i, (match, content) in enumerate(cases):
        path = tmp_path / f"{i}.pdparams"
        if content is not None:
            path.write_bytes(content)
        one_line_error(lambda path=path: read_pdparams(path), match)
    torch.save({"w": torch.ones(2)}, tmp_path / "model.ckpt")
    one_line_error(lambda: read_pdparams(tmp_path / "model.ckpt"), "found a torch checkpoint, not Paddle's")


def test_large_files_are_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = paddle_save(tmp_path / "a.pdparams", {"w": np.ones(100, np.float32)})
    monkeypatch.setattr(paddle_format, "MAX_PDPARAMS_BYTES", 100)
    one_line_error(lambda: read_pdparams(path), r"expected at most 100 .*refused before reading it")
