"""Exponential moving average of the trained weights, as the original ``LitEma`` (``ldm/modules/ema.py``).

After every optimizer step ``shadow <- shadow - (1 - decay_n) (shadow - param)`` with the warm-up
``decay_n = min(decay, (1 + n) / (10 + n))``, n the number of updates so far (counted from 1, as the original
increments before use). Shadow names are the parameter names with every dot removed (the file layout
``model_ema.diffusion_modelinput_blocks00weight``); :meth:`file_entries` writes them with ``model_ema.decay`` and
``model_ema.num_updates``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class Ema:
    """Shadow copies (float32) of ``parameters`` (name -> trainable parameter)."""

    def __init__(self, parameters: Iterable[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), found {decay}")
        self.decay = decay
        self.num_updates = 0
        self.parameters = dict(parameters)
        self.shadow = {name: p.detach().float().clone() for name, p in self.parameters.items()}

    def current_decay(self) -> float:
        """``min(decay, (1 + n) / (10 + n))`` for the update about to be made."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        for name, param in self.parameters.items():
            shadow = self.shadow[name]
            shadow.sub_((1.0 - decay) * (shadow - param.detach().float()))

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live weights and the shadow (call twice to restore): sample with the EMA weights."""
        for name, param in self.parameters.items():
            live = param.detach().clone()
            param.copy_(self.shadow[name])
            self.shadow[name] = live.float()

    def file_entries(self, prefix: str) -> dict[str, Tensor]:
        """``model_ema.<prefix + name without dots>`` for every shadow, plus the decay and update count."""
        entries = {
            "model_ema." + (prefix + name).replace(".", ""): shadow.clone()
            for name, shadow in self.shadow.items()
        }
        entries["model_ema.decay"] = torch.tensor(self.decay, dtype=torch.float32)
        entries["model_ema.num_updates"] = torch.tensor(self.num_updates, dtype=torch.int32)
        return entries

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            raise ValueError(
                "the resume state's EMA does not hold the weights of this run's trainable parameters"
            )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.shadow = {name: tensor.float().clone() for name, tensor in shadow.items()}
