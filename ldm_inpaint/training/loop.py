"""The training loop, top to bottom: data -> loss -> backward -> step -> EMA -> log / save / sample.

One optimizer step takes the global batch (``--batch-size`` samples) in ``--grad-accum`` micro-batches on each
of the processes; sample ``i`` of step ``s`` is drawn by whichever process gets it, the same way (see
:mod:`.batches`). Each process's micro-batch loss is its samples' loss sum times ``world / batch``, so after
DDP's gradient average the gradient is that of the global batch's mean loss whatever the process count.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ldm_inpaint import distributed
from ldm_inpaint.devices import PRECISIONS
from ldm_inpaint.lora.network import LoRANetwork
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.training import outputs, samples
from ldm_inpaint.training.batches import Batch, BatchRecipe, make_batch
from ldm_inpaint.training.data import ImageFolder
from ldm_inpaint.training.ema import Ema
from ldm_inpaint.training.settings import TrainSettings

WARMUP_START = 1e-6  # the original LambdaLinearScheduler's f_start


def warmup_factor(warmup: int) -> Callable[[int], float]:
    """The learning-rate factor after ``n`` scheduler steps: linear from ``WARMUP_START`` to 1 over ``warmup``
    steps, then 1 (the original ``LambdaLinearScheduler`` with ``f_max = f_min = 1``)."""

    def factor(n: int) -> float:
        return WARMUP_START + (1.0 - WARMUP_START) * n / warmup if n < warmup else 1.0

    return factor


@dataclass
class Trainer:
    """Everything a step touches."""

    settings: TrainSettings
    world: distributed.World
    model: LatentDiffusion
    trained: nn.Module  # what the optimizer updates: the UNet, its LoRA adapters (--lora), or the VAE
    wrapped: nn.Module  # ``trained`` as the loss calls it (DistributedDataParallel under torchrun)
    losses: Callable[[Batch], Tensor]  # per-sample losses of a batch, through ``wrapped``
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: Ema | None
    data: ImageFolder
    recipe: BatchRecipe
    config_yaml: str | None  # written beside each checkpoint when the config is not detected from the weights
    step: int = 0

    def micro_batches(self, step: int) -> list[range]:
        """The sample indices of this process's micro-batches of ``step``."""
        size = self.settings.micro_batch(self.world.size)
        per_round = size * self.world.size
        return [
            range(k * per_round + self.world.rank * size, k * per_round + (self.world.rank + 1) * size)
            for k in range(self.settings.grad_accum)
        ]

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics."""
        settings, world = self.settings, self.world
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=world.device)
        mixed = settings.precision != "fp32"
        autocast_dtype = PRECISIONS[settings.precision] if mixed else torch.bfloat16  # (unused when fp32)
        chunks = self.micro_batches(self.step)
        for k, indices in enumerate(chunks):
            batch = make_batch(self.data, self.recipe, self.step, indices)
            syncing = k == len(chunks) - 1 or world.size == 1
            with (
                contextlib.nullcontext() if syncing else self.wrapped.no_sync(),
                torch.autocast(world.device.type, autocast_dtype, enabled=mixed),
            ):
                losses = self.losses(batch)
                loss = losses.sum() * world.size / settings.batch_size
            self.scaler.scale(loss).backward()
            loss_sum += losses.detach().sum()
        self.scaler.unscale_(self.optimizer)
        parameters = [p for p in self.trained.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        mean_loss = distributed.total(loss_sum, world).item() / settings.batch_size
        seconds = time.perf_counter() - started
        return {
            "step": self.step,
            "loss": mean_loss,
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "samples_per_s": settings.batch_size / seconds,
            "peak_memory_gib": peak_memory_gib(world.device),
        }

    def state(self) -> dict[str, object]:
        return {
            "step": self.step,
            "trained": self.trained.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "data_position": self.step * self.settings.batch_size,
        }

    def load(self, state: dict[str, object]) -> None:
        self.trained.load_state_dict(state["trained"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def train(trainer: Trainer, run: Path) -> None:
    """Steps until ``settings.steps``, saving and sampling on the way and at the end (rank 0 writes)."""
    settings, world = trainer.settings, trainer.world
    pipe = InpaintPipeline(trainer.model)
    validation = samples.validation_set(trainer.data, settings.seed, settings.masks)
    bar = tqdm(
        total=settings.steps,
        initial=trainer.step,
        desc="train",
        unit="step",
        disable=not world.is_main,
        dynamic_ncols=True,
    )
    while trainer.step < settings.steps:
        metrics = trainer.train_step()
        step = trainer.step
        if world.is_main:
            outputs.append_metrics(run, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            bar.update(1)
        last = step == settings.steps
        if last or (settings.save_every and step % settings.save_every == 0):
            save(trainer, run)
        if settings.sample_every and (last or step % settings.sample_every == 0):
            if world.is_main:
                trainer.trained.eval()
                samples.write(trainer, pipe, validation, run)
                trainer.trained.train()
            distributed.barrier(world)
    bar.close()


def save(trainer: Trainer, run: Path) -> None:
    """Checkpoint and resume state (rank 0), then every process goes on."""
    if trainer.world.is_main:
        settings = trainer.settings
        if isinstance(trainer.trained, LoRANetwork):
            outputs.save_lora(run, trainer.trained, trainer.ema, trainer.step, settings.save_every)
        else:
            entries = outputs.checkpoint_entries(trainer.model, trainer.ema)
            outputs.save_checkpoint(
                run, entries, trainer.step, settings.save_every, settings.safetensors, trainer.config_yaml
            )
        outputs.save_state(run, trainer.state())
    distributed.barrier(trainer.world)
