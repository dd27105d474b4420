"""CPU inference with convolution weights stored once, pre-packed in oneDNN's blocked layout.

On CPU, ``F.conv2d`` hands a plain (out, in, kh, kw) weight to oneDNN, which reorders it into the blocked
layout its kernels read **on every call**. For the SD UNet that reorder is a large part of a step: it is
proportional to the weight, not to the image, so it dominates the small-resolution, many-channel levels (a
1280-channel 3x3 conv at 8x8 latents runs 2-3x faster from a packed weight, in float32 and bfloat16 alike).
:func:`pack_convolutions` makes each convolution reorder its weight once, on its first call (for that input
shape), and keep only the packed copy from then on, so it costs no memory.

The packed module computes the same convolution (oneDNN's own kernel, as ``F.conv2d`` uses; float32 results
agree with the plain path to float32 rounding, see ``tests/test_packing.py``) and gives back the plain weight
in ``state_dict()`` under the same key. It is inference-only and CPU-only; :func:`unpack_convolutions` undoes
it (to train, move the model to a GPU, or change its dtype).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.runtime import fresh_large_blocks

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class PackedConv2d(nn.Module):
    """An ``nn.Conv2d`` (2-d, ``padding_mode="zeros"``) for CPU inference whose weight is packed into oneDNN's
    blocked layout for the input shape it meets, and then held only in that layout. ``state_dict()`` yields
    the plain ``weight`` and ``bias`` under the original keys.

    The plain weight is kept until the first call, which packs it for that input's shape (oneDNN picks the
    layout that suits the shape: in float32 a shape-agnostic one is slower than no packing at all) and drops
    it, handing it to ``release`` first. A later call with another shape repacks once, from the packed copy.
    """

    def __init__(self, conv: nn.Conv2d, release: Callable[[Tensor], object] | None = None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"only zero-padded convolutions with explicit padding pack, found {conv}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, list(conv.stride)
        self.padding, self.dilation, self.groups = list(conv.padding), list(conv.dilation), conv.groups
        self.dtype = conv.weight.dtype
        self.weight_shape = tuple(conv.weight.shape)
        self.unpacked: Tensor | None = conv.weight.detach()
        self.packed_weight: Tensor | None = None
        self.packed_for: tuple[int, ...] | None = None
        self.release = release
        self.bias = conv.bias

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dtype != self.dtype:
            raise LdmInpaintError(
                f"packed convolutions run on CPU in {self.dtype}, found a {x.dtype} input on {x.device}; "
                "call ldm_inpaint.models.packing.unpack_convolutions(model) before moving or casting the model"
            )
        if tuple(x.shape) != self.packed_for:
            self._pack(tuple(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            self.packed_weight,
            self.bias,
            self.padding,
            self.stride,
            self.dilation,
            self.groups,
            "none",
            [],
            "",
        )

    def _pack(self, input_shape: tuple[int, ...]) -> None:
        """(out, in, kh, kw) plain -> oneDNN's opaque blocked layout for ``input_shape`` (same values)."""
        plain = self.plain_weight()
        # Under the allocator setting of the command-line tools, the weight-sized temporaries leave no holes.
        with fresh_large_blocks(one_off=True):
            self.packed_weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                plain.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(input_shape)
            )
        self.packed_for = input_shape
        if self.unpacked is not None:
            if self.release is not None:
                self.release(self.unpacked)
            self.unpacked = None

    def plain_weight(self) -> Tensor:
        """The (out, in, kh, kw) weight in the ordinary layout, bit-identical to the packed one."""
        return self.unpacked if self.unpacked is not None else self.packed_weight.to_dense()

    def to_conv(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (its weight is :meth:`plain_weight`; the bias is shared)."""
        with torch.device("meta"):
            conv = nn.Conv2d(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                bias=self.bias is not None,
            )
        conv.weight = nn.Parameter(self.plain_weight(), requires_grad=False)
        conv.bias = self.bias
        return conv

    def __deepcopy__(self, memo: dict) -> PackedConv2d:
        # oneDNN's opaque tensors have no storage to copy: repack a plain copy (the bias is copied too)
        conv = self.to_conv()
        conv.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        conv.bias = copy.deepcopy(self.bias, memo)
        return PackedConv2d(conv)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.plain_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        weight = state_dict.get(key)
        if weight is None:
            missing_keys.append(key)
        elif tuple(weight.shape) != self.weight_shape:
            error_msgs.append(f"{key}: expected shape {self.weight_shape}, found {tuple(weight.shape)}")
        else:
            self.unpacked = weight.detach().to(self.dtype)
            self.packed_weight, self.packed_for = None, None
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dtype={self.dtype}"
        )


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether :func:`pack_convolutions` applies: a CPU model in float32, or in bfloat16 where this CPU has
    oneDNN's bfloat16 kernels (AVX-512 BW/VL/DQ and up: without them the weight reorder fails), with oneDNN
    available."""
    return (
        torch.device(device).type == "cpu"
        and dtype in PACKABLE_DTYPES
        and torch.backends.mkldnn.is_available()
        and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def pack_convolutions(model: nn.Module, release: Callable[[Tensor], object] | None = None) -> int:
    """Replace every ``nn.Conv2d`` of ``model`` (on CPU, float32 or bfloat16) by a :class:`PackedConv2d` in
    place. Each one packs its weight on its first call and then drops the plain weight, handing it to
    ``release`` (e.g. to give back the file pages of a memory-mapped checkpoint,
    :func:`ldm_inpaint.runtime.release_file_pages`). Returns how many were replaced."""
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d) and not can_pack(conv.weight.device, conv.weight.dtype):
            raise LdmInpaintError(
                "convolutions pack on CPU in float32, or in bfloat16 where the CPU has oneDNN's bfloat16 "
                f"kernels, found {conv.weight.dtype} on {conv.weight.device}"
                + (
                    ""
                    if torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    else " (this CPU has no bfloat16 kernels)"
                )
            )
    return _replace(model, nn.Conv2d, lambda conv: PackedConv2d(conv, release))


def unpack_convolutions(model: nn.Module) -> int:
    """Undo :func:`pack_convolutions`: every :class:`PackedConv2d` becomes an ``nn.Conv2d`` again."""
    return _replace(model, PackedConv2d, PackedConv2d.to_conv)


def _replace(model: nn.Module, kind: type[nn.Module], make: Callable[[nn.Module], nn.Module]) -> int:
    """Swap every submodule of type ``kind`` for ``make(submodule)``, under the same name. Only names are
    collected first, so each replaced module is freed as soon as its successor is in place."""
    sites = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, kind)
    ]
    for parent, name in sites:
        setattr(parent, name, make(getattr(parent, name)))
    return len(sites)
