"""What every sampler shares about noise: drawing the injected noise, the one rule for ``eta``, and the one
rule for ``strength`` (how far down its grid a run from a noised clean latent starts)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

NoiseSource = torch.Generator | Sequence[torch.Generator] | None
"""Where injected noise comes from: one generator for the batch (diffusers' way), one per sample (so that a
sample's noise does not depend on how many samples share the batch), or torch's global one."""


def start_noise(seed: int, n: int, latent_size: tuple[int, int], channels: int = 4) -> Tensor:
    """The original demos' start code: ``np.random.RandomState(seed).randn(n, 4, h, w)`` as float32, so seeds
    carry over from them; sample ``i`` is row ``i`` of the stream, whatever ``n``."""
    noise = np.random.RandomState(seed).randn(n, channels, *latent_size)
    return torch.from_numpy(noise.astype(np.float32))


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s noise: ``seed`` itself for sample 0 (a single sample draws what one
    generator for the batch would), then 32 bits of a hash of (seed, index) (torch's CPU generator keeps 32
    bits of a seed)."""
    if index == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest(), "little")


def sample_generators(seed: int, n: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded with :func:`sample_seed`."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, i)) for i in range(n)]


def noise_like(x: Tensor, generator: NoiseSource) -> Tensor:
    """``z ~ N(0, I)`` in x's shape and dtype, drawn on the generator's device and moved to x's, as diffusers'
    ``randn_tensor`` draws it: a CPU generator gives the same noise for a model on any device. With one
    generator per sample, sample ``i``'s noise is drawn from generator ``i``."""
    if isinstance(generator, Sequence):
        if len(generator) != x.shape[0]:
            raise ValueError(f"expected one generator per sample ({x.shape[0]}), found {len(generator)}")
        return torch.cat([noise_like(x[i : i + 1], one) for i, one in enumerate(generator)])
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def check_eta(sampler: str, eta: float, stochastic: bool) -> None:
    """Samplers that inject noise take ``eta >= 0`` (its scale; 0 injects none); the others only ``eta = 0``."""
    if stochastic and eta < 0:
        raise ValueError(
            f"{sampler} eta must be >= 0 (the scale of the injected noise, 0 for none), found {eta}"
        )
    if not stochastic and eta != 0:
        raise ValueError(f"{sampler} is deterministic: eta must be 0, found {eta}")


def check_strength(strength: float) -> None:
    """``strength`` is the fraction of the sampling grid a run takes, in (0, 1]; 1 starts from pure noise."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1] (1 = start from pure noise), found {strength}")


def kept_steps(steps: int, strength: float) -> int:
    """How many of the last steps of a ``steps``-step grid a run of ``strength`` takes: ``min(int(steps
    strength), steps)``, as diffusers' ``get_timesteps`` (SDEdit, Meng et al. 2022: start part-way down the
    grid from a noised image). ``strength`` must be in (0, 1] and keep at least one step."""
    check_strength(strength)
    kept = min(int(steps * strength), steps)
    if kept == 0:
        raise ValueError(f"strength {strength} keeps no step of {steps}; raise strength or steps")
    return kept
