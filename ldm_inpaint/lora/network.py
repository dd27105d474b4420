"""LoRA adapters for training (and for running a LoRA unmerged): low-rank updates beside frozen layers.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Sec. 4.1) keeps a pretrained
weight W0 (out x in) frozen and learns ``delta W = B A`` with A (r x in) and B (out x r), r << min(in, out):

    h = W0 x + (alpha / r) * multiplier * B A x

B starts at zero, so training starts from the pretrained model; A starts as ``nn.Linear``'s default
(Kaiming-uniform with a = sqrt(5)), as in Microsoft's loralib and kohya's sd-scripts. A is ``lora_down``, B
is ``lora_up``, alpha a per-module constant (default: r, a scale of 1). For a convolution, A is a
convolution with the layer's kernel, stride and padding to r channels and B a 1x1 convolution (kohya's
LoCon), so ``B A`` is again a map of the layer's shape.

The adapters live in :class:`LoRANetwork`, an ``nn.ModuleDict`` keyed by the modules' names in a kohya file
(:mod:`ldm_inpaint.lora.names`), so its ``state_dict()`` IS the file's content and its parameters are those of
one ordinary module (an optimizer's, DDP's). It reaches the model only through forward hooks on the adapted
layers: the model's modules, parameters and ``state_dict`` keys never change, and :meth:`LoRANetwork.detach`
leaves the model exactly as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ldm_inpaint.errors import LoRAError
from ldm_inpaint.lora import files, names
from ldm_inpaint.models.packing import PackedConv2d
from ldm_inpaint.models.unet import UNetModel

# The projections of both attentions of every transformer layer: what the trainer adapts by default.
ATTENTION_PROJECTIONS = tuple(
    f"{attention}.{projection}"
    for attention in ("attn1", "attn2")
    for projection in ("to_q", "to_k", "to_v", "to_out.0")
)


def weight_delta(down: Tensor, up: Tensor, scale: float) -> Tensor:
    """``scale * B A`` as a weight of the adapted layer's shape, in float32: (out, in) for linear layers,
    (out, in, kh, kw) for convolutions (a 1x1 B after a kh x kw A composes to a kh x kw kernel)."""
    down, up = down.float(), up.float()
    if down.ndim == 2:
        return scale * (up @ down)
    # (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
    return scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)


class LoRAAdapter(nn.Module):
    """``lora_down`` (A), ``lora_up`` (B) and the ``alpha`` buffer of one adapted layer (see the module
    docstring); ``forward(x)`` is ``(alpha / rank) * B A x`` without the layer's own output."""

    def __init__(
        self, layer: nn.Module, rank: int, alpha: float | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        if rank < 1:
            raise LoRAError(f"LoRA rank must be a positive integer, found {rank}")
        weight_shape = _weight_shape(layer)
        kwargs = {"bias": False, "device": _device(layer), "dtype": dtype}
        if len(weight_shape) == 2:
            out_features, in_features = weight_shape
            self.lora_down: nn.Module = nn.Linear(in_features, rank, **kwargs)
            self.lora_up: nn.Module = nn.Linear(rank, out_features, **kwargs)
        else:
            out_channels, in_channels = weight_shape[:2]
            self.lora_down = nn.Conv2d(
                in_channels, rank, layer.kernel_size, layer.stride, layer.padding, **kwargs
            )
            self.lora_up = nn.Conv2d(rank, out_channels, 1, **kwargs)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(rank if alpha is None or alpha == 0 else alpha)  # kohya: 0 or none means rank
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=kwargs["device"]))

    @property
    def rank(self) -> int:
        return self.lora_down.weight.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha.item() / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the layer weight that ``B A`` updates: (out, in) or (out, in, kh, kw)."""
        return (self.lora_up.weight.shape[0], *self.lora_down.weight.shape[1:])

    def forward(self, x: Tensor) -> Tensor:
        # alpha / rank as a tensor: no device synchronisation in the forward pass
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * (self.alpha / self.rank)

    def delta(self) -> Tensor:
        """``(alpha / rank) * B A``, the change of the layer's weight (float32)."""
        return weight_delta(self.lora_down.weight.detach(), self.lora_up.weight.detach(), self.scale)


def _weight_shape(layer: nn.Module) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        return tuple(layer.weight.shape)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise LoRAError(f"LoRA adapts plain convolutions only, found {layer}")
        return tuple(layer.weight.shape)
    if isinstance(layer, PackedConv2d):
        return layer.weight_shape
    raise LoRAError(f"LoRA adapts linear layers and convolutions, found {type(layer).__name__}")


def _device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device if isinstance(layer, nn.Linear | nn.Conv2d) else layer.bias.device


class LoRANetwork(nn.ModuleDict):
    """Adapters of a UNet, keyed by their kohya file names (diffusers paths, see :mod:`~ldm_inpaint.lora.
    names`). Create one with :meth:`create` (training) or :meth:`load` (a file), :meth:`attach` it to the
    UNet, :meth:`save` it; ``multiplier`` scales every adapter's output (1.0: as trained)."""

    def __init__(self, adapters: Mapping[str, LoRAAdapter], multiplier: float = 1.0) -> None:
        super().__init__(adapters)
        self.multiplier = multiplier
        self._handles: list[RemovableHandle] = []

    @classmethod
    def create(
        cls,
        unet: UNetModel,
        rank: int,
        alpha: float | None = None,
        projections: Iterable[str] = ATTENTION_PROJECTIONS,
        dtype: torch.dtype = torch.float32,
    ) -> LoRANetwork:
        """New adapters of ``rank`` on the ``projections`` of every transformer layer of ``unet`` (default:
        q, k, v and out of both attentions); ``alpha`` None means ``rank``. Draws A from torch's global
        generator (seed it for reproducible runs); B is zero, so the network starts as the identity."""
        paths = names.unet_paths(unet)
        adapters = {
            names.file_name(names.UNET_PREFIX, paths[path]): LoRAAdapter(
                unet.get_submodule(path), rank, alpha, dtype
            )
            for path in names.attention_paths(unet, tuple(projections))
        }
        return cls(adapters)

    @classmethod
    def load(cls, path: str | Path, unet: UNetModel, dtype: torch.dtype = torch.float32) -> LoRANetwork:
        """The UNet adapters of a LoRA file (either name style), checked against ``unet`` and ready to
        :meth:`attach` (e.g. to resume training). Files with text-encoder modules are refused: apply those
        with :func:`ldm_inpaint.lora.merge.apply_loras`."""
        lora = files.read_lora(path)
        targets = names.unet_targets(unet)
        paths = names.unet_paths(unet)
        adapters: dict[str, LoRAAdapter] = {}
        for name, found in files.resolve(lora, targets, component="unet").items():
            layer = unet.get_submodule(found.target.module)
            down, up = found.weights.fitted(name, _weight_shape(layer))
            adapter = LoRAAdapter(layer, found.weights.rank, found.weights.alpha, dtype)
            with torch.no_grad():
                adapter.lora_down.weight.copy_(down)
                adapter.lora_up.weight.copy_(up)
            key = names.file_name(names.UNET_PREFIX, paths[found.target.module])
            if key in adapters:
                raise LoRAError(f"{lora.path}: {name} names the same module as another entry ({key})")
            adapters[key] = adapter
        return cls(adapters)

    def attach(self, unet: UNetModel) -> None:
        """Add every adapter's output to its layer's through a forward hook (layer inputs are cast to the
        adapters' dtype and the sum to the layer's). The hooks belong to ``unet``'s modules: a copy of the
        UNet made while attached calls this network too, so copy it (e.g. for an EMA) before attaching."""
        if self._handles:
            raise LoRAError("this LoRA network is attached already; detach() it first")
        targets = names.unet_targets(unet)
        missing = [name for name in self if name not in targets]
        if missing:
            raise LoRAError(f"{len(missing)} adapter(s) name no module of this UNet, e.g. {missing[0]}")
        for name, adapter in self.items():
            layer = unet.get_submodule(targets[name].module)
            if _weight_shape(layer) != adapter.weight_shape:
                raise LoRAError(f"adapter {name} does not fit its layer {layer}")
            self._handles.append(layer.register_forward_hook(self._hook(adapter)))

    def _hook(self, adapter: LoRAAdapter) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]:
        def add_adapter(layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            if self.multiplier == 0:
                return output
            return output + (adapter(args[0]) * self.multiplier).to(output.dtype)

        return add_adapter

    def detach(self) -> None:
        """Remove the hooks: the UNet computes exactly what it did before :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __getstate__(self) -> dict[str, object]:
        # A copy (deepcopy, pickle) is detached: the hooks stay with the network that attached them.
        return {**self.__dict__, "_handles": []}

    def save(
        self, path: str | Path, metadata: Mapping[str, str] | None = None, *, replace: bool = False
    ) -> Path:
        """Write the adapters as a kohya LoRA file (:func:`~ldm_inpaint.lora.files.write_lora`: safetensors,
        atomic, never over an existing file unless ``replace``)."""
        rank = {adapter.rank for adapter in self.values()}
        alpha = {adapter.alpha.item() for adapter in self.values()}
        described = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank.pop()) if len(rank) == 1 else "Dynamic",
            "ss_network_alpha": f"{alpha.pop():g}" if len(alpha) == 1 else "Dynamic",
        }
        return files.write_lora(path, self.state_dict(), {**described, **(metadata or {})}, replace=replace)
