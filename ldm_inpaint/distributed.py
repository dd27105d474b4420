"""Several processes from torchrun's environment, set up at the edge of the trainer and the evaluator.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process joins the default process group (NCCL on CUDA, gloo on
the CPU): the trainer trains on its share of every global batch, the UNet wrapped in
``DistributedDataParallel`` (:func:`wrap`), which averages gradients; the evaluator takes its share of the
files, sums statistics (:func:`total`) and gathers per-file results (:func:`gathered`). Rank 0 writes the
shared files. Without torchrun everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ldm_inpaint.devices import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join(device_name: str | None) -> World:
    """This process's place: rank, number of processes, device (under torchrun on CUDA: ``cuda:LOCAL_RANK``)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), device)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, world: World) -> nn.Module:
    """``module`` wrapped for data parallelism when there are several processes."""
    if world.size == 1:
        return module
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def total(value: Tensor, world: World) -> Tensor:
    """The sum of ``value`` over the processes."""
    if world.size > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def gathered(items: list[T], world: World) -> list[T]:
    """Every process's ``items`` (picklable), concatenated in rank order; the same list on every process."""
    if world.size == 1:
        return list(items)
    parts: list[list[T] | None] = [None] * world.size
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]
