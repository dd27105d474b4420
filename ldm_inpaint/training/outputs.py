"""What a run writes under RUN/: checkpoints in the original layout, the resume state, the metrics.

- ``last.ckpt`` (replaced at every save) and ``step-NNNNNNN.ckpt`` (every ``--save-every`` steps, never
  overwritten): ``{"state_dict": ...}`` with ``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.*`` (SD1's text encoder in transformers' names), the 12 DDPM buffers, and with EMA on
  ``model_ema.*`` in LitEma's names with ``model_ema.decay`` / ``model_ema.num_updates`` — the file the original
  repositories load (``--use-ema`` here loads the EMA copy). ``.safetensors`` twins with ``--safetensors``.
  When the model's config cannot be detected from the weights (a v model, a custom or tiny config), each
  checkpoint gets its config beside it (``last.yaml``, ``step-NNNNNNN.yaml``), which the loader reads.
- ``--lora``: ``lora-last.safetensors`` (replaced at every save), ``lora-step-NNNNNNN.safetensors`` and, with
  EMA, ``lora-last-ema.safetensors``: kohya / AUTOMATIC1111 LoRA files of the adapters
  (``ldm-inpaint --lora FILE`` applies them).
- ``state/trainer.pt``: step, trained weights, optimizer, EMA and loss-scaler state; enough to continue
  exactly (every random draw is keyed by step, see :mod:`.batches`).
- ``metrics.jsonl``: one JSON row per optimizer step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ldm_inpaint.checkpoint import to_file_layout
from ldm_inpaint.checkpoint_files import write_checkpoint
from ldm_inpaint.files import replace_text, write_atomic, write_new_text
from ldm_inpaint.lora.network import LoRANetwork
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.schedule import ddpm_buffers
from ldm_inpaint.training.ema import Ema
from ldm_inpaint.training.settings import SettingsError

STATE_FILE = Path("state") / "trainer.pt"
METRICS_FILE = "metrics.jsonl"
# LitEma tracks the parameters under ``model.``: the UNet's names start with ``diffusion_model.``.
EMA_PREFIX = "diffusion_model."


def checkpoint_entries(model: LatentDiffusion, ema: Ema | None) -> dict[str, Tensor]:
    """The model's weights in the original file layout, float32, with the DDPM buffers and the EMA copy."""
    weights = {key: value.detach().float() for key, value in model.state_dict().items()}
    entries = {**to_file_layout(weights, model.config), **ddpm_buffers(model.config.schedule)}
    if ema is not None:
        entries.update(ema.file_entries(EMA_PREFIX))
    return entries


def save_checkpoint(
    run: Path,
    entries: Mapping[str, Tensor],
    step: int,
    every: int,
    safetensors: bool,
    config_yaml: str | None,
) -> list[Path]:
    """Write ``last.ckpt`` (replacing the previous one) and, on a ``every``-th step, ``step-NNNNNNN.ckpt``; each
    with ``config_yaml`` beside it when given (written before the checkpoint, so none is ever without it)."""
    names = ["last"] + ([f"step-{step:07d}"] if every and step % every == 0 else [])
    written = []
    for name in names:
        if config_yaml is not None:
            write_new_text(run / f"{name}.yaml", config_yaml)
        for suffix in (".ckpt", ".safetensors") if safetensors else (".ckpt",):
            write_checkpoint(entries, run / f"{name}{suffix}", replace=name == "last")
            written.append(run / f"{name}{suffix}")
    return written


def save_lora(run: Path, network: LoRANetwork, ema: Ema | None, step: int, every: int) -> None:
    """The adapters as LoRA files: the latest, a kept one every ``every`` steps, and the EMA's latest."""
    metadata = {"ss_steps": str(step)}
    network.save(run / "lora-last.safetensors", metadata, replace=True)
    if every and step % every == 0:
        network.save(run / f"lora-step-{step:07d}.safetensors", metadata)
    if ema is not None:
        ema.swap()
        try:
            network.save(run / "lora-last-ema.safetensors", metadata, replace=True)
        finally:
            ema.swap()


def save_state(run: Path, state: Mapping[str, object]) -> None:
    """``state/trainer.pt``, replaced in one step."""
    path = run / STATE_FILE
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, lambda file: torch.save(dict(state), file), replace=True)


def load_state(run: Path, device: torch.device) -> dict[str, object]:
    path = run / STATE_FILE
    if not path.is_file():
        raise SettingsError(
            f"--resume {run}: no {STATE_FILE} there (the run saved no state yet; see --save-every)"
        )
    return torch.load(path, map_location=device, weights_only=True)


def append_metrics(run: Path, row: Mapping[str, object]) -> None:
    with (run / METRICS_FILE).open("a", encoding="utf-8") as file:
        file.write(json.dumps(dict(row)) + "\n")


def truncate_metrics(run: Path, step: int) -> None:
    """Keep the rows of steps up to ``step`` (a run killed after logging steps it had not saved)."""
    path = run / METRICS_FILE
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        replace_text(path, "".join(row + "\n" for row in rows))
