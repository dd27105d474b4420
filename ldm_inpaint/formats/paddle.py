"""PaddleNLP / ppdiffusers weights (``unet/``, ``vae/``, ``text_encoder/model_state.pdparams``) as torch tensors,
read without Paddle and without running code from the file.

The file (PaddlePaddle/Paddle, ``python/paddle/framework/io.py``: ``_legacy_save``, ``_build_saved_state_dict``):
``paddle.save(layer.state_dict())`` pickles (protocol 4 by default, 2 to 4 allowed) a plain dict of name -> numpy
array plus one bookkeeping entry, ``StructuredToParameterName@@``, dropped here. With protocol 2 or 3, arrays over
1 GiB are split into slices (``UnpackBigParamInfor@@``, ``io_utils.py``); no SD 1.x weight is that large, and such
a file is refused. Paddle's bfloat16 tensors are stored as uint16 arrays (it has no uint16 tensors: BF16 -> 'uint16'
in its numpy dtype table), so uint16 is read back as bfloat16, bit for bit, as ``paddle.load`` does.

Paddle's ``nn.Linear`` weight is [in, out], torch's [out, in]; conv [out, in, kh, kw], norm, bias and
``nn.Embedding`` [num, dim] tensors agree. The UNet and the VAE carry diffusers' names: ppdiffusers' conversion
script (PaddlePaddle/PaddleNLP, ``ppdiffusers/scripts/convert_diffusers_model/
convert_diffusers_stable_diffusion_to_ppdiffusers.py``) transposes exactly the Linear weights and renames nothing.
The text encoder comes in two layouts:

- PaddleNLP's ``CLIPTextModel`` (PaddlePaddle/PaddleNLP, ``paddlenlp/transformers/clip/modeling.py``, built on
  Paddle's ``nn.TransformerEncoder``; names against transformers' in ``CLIPPretrainedModel._get_name_mappings``
  and the conversion script): ``token_embedding``, ``positional_embedding``, ``transformer.layers.{i}`` with
  ``self_attn.{q,k,v,out}_proj``, ``linear1``, ``linear2``, ``norm1``, ``norm2``, and ``ln_final``;
- ppdiffusers' own ``CLIPTextModel`` (PaddlePaddle/PaddleMIX,
  ``ppdiffusers/ppdiffusers/transformers/clip/modeling.py``): transformers' names, Linear weights [in, out].

Both keep ``position_ids`` as a non-persistable buffer; should a file carry it anyway (transformers saved it before
4.31), it is skipped by name: every model rebuilds it.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from ldm_inpaint.checkpoint_files import file_format, first_line
from ldm_inpaint.errors import CheckpointError

# A .pdparams file is read whole into memory; an SD 1.5 UNet in float32 is about 3.4 GB.
MAX_PDPARAMS_BYTES = 8 * 2**30
COMPONENTS = ("unet", "vae", "text_encoder")

_NAME_TABLE = "StructuredToParameterName@@"
_SLICED = "UnpackBigParamInfor@@"
# Dtypes torch.from_numpy takes as they are; uint16 is Paddle's bfloat16 (see the module docstring).
_DTYPES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "uint16")

# PaddleNLP's CLIPTextModel module -> transformers' (weights and biases alike). A name already in the right column
# (ppdiffusers' own CLIPTextModel) is taken as it is.
TEXT_ENCODER_RENAMES = (
    ("text_model.token_embedding", "text_model.embeddings.token_embedding"),
    ("text_model.positional_embedding", "text_model.embeddings.position_embedding"),
    ("text_model.transformer.layers.{i}.self_attn.q_proj", "text_model.encoder.layers.{i}.self_attn.q_proj"),
    ("text_model.transformer.layers.{i}.self_attn.k_proj", "text_model.encoder.layers.{i}.self_attn.k_proj"),
    ("text_model.transformer.layers.{i}.self_attn.v_proj", "text_model.encoder.layers.{i}.self_attn.v_proj"),
    (
        "text_model.transformer.layers.{i}.self_attn.out_proj",
        "text_model.encoder.layers.{i}.self_attn.out_proj",
    ),
    ("text_model.transformer.layers.{i}.linear1", "text_model.encoder.layers.{i}.mlp.fc1"),
    ("text_model.transformer.layers.{i}.linear2", "text_model.encoder.layers.{i}.mlp.fc2"),
    ("text_model.transformer.layers.{i}.norm1", "text_model.encoder.layers.{i}.layer_norm1"),
    ("text_model.transformer.layers.{i}.norm2", "text_model.encoder.layers.{i}.layer_norm2"),
    ("text_model.ln_final", "text_model.final_layer_norm"),
)
TEXT_ENCODER_SKIPPED = ("text_model.position_ids", "text_model.embeddings.position_ids")
_TEXT_ENCODER_MODULES = {paddle: ours for paddle, ours in TEXT_ENCODER_RENAMES} | {
    ours: ours for _, ours in TEXT_ENCODER_RENAMES
}
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def read_pdparams(path: Path) -> dict[str, Tensor]:
    """All arrays of a .pdparams file as torch tensors under the file's own (Paddle) names, unchanged layout."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Paddle weights file not found: {path}")
    size = path.stat().st_size
    if size > MAX_PDPARAMS_BYTES:
        raise CheckpointError(
            f"{path}: {size:,} bytes; expected at most {MAX_PDPARAMS_BYTES:,} (an SD 1.5 UNet in float32 is about "
            "3.4 GB): refused before reading it"
        )
    with path.open("rb") as file:
        _check_pickle_header(path, file.read(2))
        file.seek(0)
        loaded = _unpickle(path, file)
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"{path}: expected a dict of numpy arrays (what paddle.save writes for a state dict), found a "
            f"{type(loaded).__name__}"
        )
    loaded.pop(_NAME_TABLE, None)
    _check_arrays(path, loaded, size)
    # one tensor at a time, so that each unpickled array can be freed as soon as it is copied
    return {name: _to_torch(loaded.pop(name)) for name in list(loaded)}


def _check_pickle_header(path: Path, head: bytes) -> None:
    """The file starts as paddle.save's pickles do: the PROTO opcode with protocol 2, 3 or 4."""
    if len(head) == 2 and head[0] == 0x80 and head[1] in (2, 3, 4):
        return
    kind = file_format(path)
    found = f"a {kind} checkpoint, not Paddle's" if kind != "unknown" else f"first bytes {head!r}"
    raise CheckpointError(
        f"{path}: expected a pickle of protocol 2 to 4 (what paddle.save writes), found {found}"
    )


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it to store bytes, and for nothing else."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode(..., {encoding!r}) is not how a pickle stores bytes")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    """``bytes()`` as protocol-2 pickles use it to store ``b""``; any argument is refused (TypeError)."""
    return b""


# What unpickling numpy arrays calls, by the name the pickle gives: ndarray reconstruction under numpy 1's and
# numpy 2's module names (whichever numpy wrote the file), the dtype, and protocol 2's way of storing bytes.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}
_LOAD_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError)


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers and refuses every other global by name."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        # latin1, as paddle.load: byte strings of old (Python 2) pickles are array data
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise CheckpointError(
                f"{self.path}: refused to load: the pickle calls {module}.{name}, which is not part of a Paddle "
                "weights file (only numpy arrays are allowed; nothing it names was run)"
            )
        return allowed


def _unpickle(path: Path, file: BinaryIO) -> object:
    try:
        return _ArrayUnpickler(file, path).load()
    except CheckpointError:
        raise
    except _LOAD_ERRORS as error:
        raise CheckpointError(
            f"{path}: not a readable Paddle weights file ({first_line(error)}); it is damaged or truncated: "
            "download it again"
        ) from error


def _check_arrays(path: Path, loaded: dict, size: int) -> None:
    """Every entry is a named numpy array of a dtype torch takes, and together they fit in the file (arrays that
    share one stored buffer could otherwise make a small file cost gigabytes)."""
    for name, value in loaded.items():
        if not isinstance(name, str):
            raise CheckpointError(
                f"{path}: a key {name!r} of type {type(name).__name__}; expected names (str)"
            )
        if name == _SLICED:
            raise CheckpointError(
                f"{path}: arrays over 1 GiB split into slices ({_SLICED}), which paddle.save does with pickle "
                "protocol 2 or 3; no SD 1.x weight is that large: save the model again with protocol 4"
            )
        if not isinstance(value, np.ndarray):
            raise CheckpointError(
                f"{path}: entry {name!r} is a {type(value).__name__}; expected a numpy array"
            )
        if value.dtype.name not in _DTYPES:
            raise CheckpointError(
                f"{path}: entry {name!r} has dtype {value.dtype}; expected one of {', '.join(_DTYPES)}"
            )
    total = sum(value.nbytes for value in loaded.values())
    if total > size:
        raise CheckpointError(
            f"{path}: its arrays hold {total:,} bytes in a file of {size:,}: entries share their data, which "
            "paddle.save never writes; refused"
        )


def _to_torch(array: np.ndarray) -> Tensor:
    """A writable C-contiguous copy in native byte order (an unpickled array is read-only, maybe Fortran-ordered
    or big-endian); uint16 (Paddle's bfloat16) reinterpreted as bfloat16."""
    native = array.astype(array.dtype.newbyteorder("="), order="C")
    if native.dtype == np.uint16:
        return torch.from_numpy(native.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(native)


def paddle_to_torch(component: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """component "unet" | "vae" | "text_encoder": Paddle names -> diffusers' names (unet, vae: ppdiffusers uses
    diffusers' names already) / transformers' CLIPTextModel names with the "text_model." prefix (text_encoder);
    every nn.Linear weight transposed (Paddle stores Linear weights as [in, out], torch as [out, in])."""
    if component not in COMPONENTS:
        raise ValueError(f"component {component!r}: expected one of {', '.join(COMPONENTS)}")
    if component == "text_encoder":
        state = _text_encoder_names(state)
    return {name: _torch_layout(component, name, tensor) for name, tensor in state.items()}


def _torch_layout(component: str, name: str, tensor: Tensor) -> Tensor:
    """Linear weights [in, out] -> [out, in]. They are exactly the 2-D weights, but for the text encoder's
    token and position embeddings ([num, dim] in both); the UNet and the VAE have no embedding tables."""
    embedding = component == "text_encoder" and ".embeddings." in name
    if tensor.ndim == 2 and name.endswith(".weight") and not embedding:
        return tensor.t().contiguous()
    return tensor


def _text_encoder_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """PaddleNLP's or ppdiffusers' CLIPTextModel names -> transformers', by :data:`TEXT_ENCODER_RENAMES`."""
    renamed: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if name in TEXT_ENCODER_SKIPPED:
            continue
        target = _transformers_name(name)
        if target is None:
            unknown.append(name)
        elif target in renamed:
            raise CheckpointError(
                f"text encoder: two entries for {target} (PaddleNLP's and transformers' names mixed, e.g. "
                f"{name}); expected one layout"
            )
        else:
            renamed[target] = tensor
    if unknown:
        raise CheckpointError(
            f"text encoder: {len(unknown)} names that are not a CLIP text model's (neither PaddleNLP's nor "
            f"transformers'): {unknown[:5]}; expected names such as text_model.transformer.layers.0.linear1.weight "
            "(is this text_encoder/model_state.pdparams?)"
        )
    return renamed


def _transformers_name(name: str) -> str | None:
    """``text_model.transformer.layers.3.linear1.bias`` -> ``text_model.encoder.layers.3.mlp.fc1.bias``; None for
    a name the table does not know."""
    module, _, leaf = name.rpartition(".")
    index = _LAYER_INDEX.search(module)
    target = _TEXT_ENCODER_MODULES.get(_LAYER_INDEX.sub(".layers.{i}.", module, count=1))
    if target is None or leaf not in ("weight", "bias"):
        return None
    return f"{target.format(i=index.group(1) if index else '')}.{leaf}"
