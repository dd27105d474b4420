"""A small least-recently-used memo for the constant work that pipeline calls share (text contexts, image
latents), keyed by content."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch
from torch import Tensor

# Entries of each memo (text contexts, image latents): enough for an ablation over a few prompts and images.
MEMO_SIZE = 8
Value = TypeVar("Value")


class Memo(Generic[Value]):
    """At most ``size`` values, the least recently used one dropped first."""

    def __init__(self, size: int = MEMO_SIZE) -> None:
        self.size = size
        self.entries: OrderedDict[Hashable, Value] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], Value]) -> Value:
        """The value stored under ``key``, or ``compute()``, stored (the oldest entry goes when full)."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = self.entries[key] = compute()
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self.entries.clear()


def digest(x: Tensor) -> tuple[tuple[int, ...], torch.dtype, str]:
    """A key for a tensor's contents: its shape, dtype and a hash of its bytes."""
    data = x.detach().cpu().contiguous().flatten().view(torch.uint8).numpy()
    return tuple(x.shape), x.dtype, hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
