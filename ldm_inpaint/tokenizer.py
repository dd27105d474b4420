"""Prompts -> CLIP token ids, the input of both text encoders.

Both encoders use CLIP's byte-level BPE (Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", 2021) with the same 49,408-entry vocabulary; this module uses open_clip's
implementation and the vocabulary file shipped inside the open_clip package, so nothing is downloaded. A
prompt becomes ``<start_of_text> BPE tokens <end_of_text>``, cut to ``context_length`` with the end token kept
last, then padded.
The two originals differ only in the padding token:

- SD1 (``FrozenCLIPEmbedder``, transformers' ``CLIPTokenizer`` with ``padding="max_length"``) pads with the
  end-of-text token 49407;
- SD2 (``FrozenOpenCLIPEmbedder``, ``open_clip.tokenize``) pads with 0.

The causal attention of the encoders makes the padding invisible to every position up to the end token, but
positions after it (which the UNet attends to) depend on it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tokens:
    """Token ids of a batch of prompts and, per prompt, how many BPE tokens were cut to fit the context."""

    ids: Tensor  # (b, context_length) or, in windows, (b, chunks, context_length) int64
    truncated: list[int]


def _open_clip_tokenizer_module() -> ModuleType:
    """open_clip's ``tokenizer.py`` run by itself. ``import open_clip.tokenizer`` would first run the
    package's ``__init__``, which imports its model zoo (torchvision among others): 0.27 GiB of resident
    memory that inference never uses. The module itself needs only ftfy, regex, numpy and torch."""
    package = importlib.util.find_spec("open_clip")  # finds the package without running it
    if package is None or not package.submodule_search_locations:
        raise ImportError(
            "the open_clip package (open_clip_torch) is not installed; pip install open_clip_torch"
        )
    path = Path(package.submodule_search_locations[0]) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("ldm_inpaint._open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _bpe() -> Any:
    """open_clip's ``SimpleTokenizer`` (ftfy-fixed, whitespace-normalised, lower-cased text), built on first
    use."""
    return _open_clip_tokenizer_module().SimpleTokenizer()


def encode(prompt: str) -> list[int]:
    """The full, uncut token sequence of one prompt: start token, BPE ids, end token."""
    bpe = _bpe()
    return [bpe.sot_token_id, *bpe.encode(prompt), bpe.eot_token_id]


def tokenize(prompts: list[str], pad_token: int, context_length: int = 77) -> Tokens:
    """Token ids (b, context_length): each prompt encoded, cut to ``context_length`` keeping the end token
    last, and padded with ``pad_token`` (SD1: 49407, SD2: 0)."""
    ids = torch.full((len(prompts), context_length), pad_token, dtype=torch.long)
    truncated = []
    for row, prompt in enumerate(prompts):
        tokens = encode(prompt)
        truncated.append(max(0, len(tokens) - context_length))
        if len(tokens) > context_length:
            tokens = [*tokens[: context_length - 1], tokens[-1]]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return Tokens(ids=ids, truncated=truncated)


def chunk_count(prompt: str, context_length: int = 77) -> int:
    """How many ``context_length`` windows the prompt's BPE tokens fill when each window holds
    ``context_length - 2`` of them between its own start and end tokens (at least 1)."""
    body = len(encode(prompt)) - 2
    per_chunk = context_length - 2
    return max(1, -(-body // per_chunk))


def tokenize_chunks(prompts: list[str], pad_token: int, chunks: int, context_length: int = 77) -> Tensor:
    """Token ids (b, chunks, context_length) for long prompts: the BPE tokens cut into runs of
    ``context_length - 2``, each run wrapped in start/end tokens and padded; prompts with fewer runs get
    empty windows (start, end, padding), so a batch shares one length. Tokens beyond ``chunks`` windows are
    an error: the caller sizes ``chunks`` with :func:`chunk_count`."""
    bpe = _bpe()
    per_chunk = context_length - 2
    ids = torch.full((len(prompts), chunks, context_length), pad_token, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        body = encode(prompt)[1:-1]
        if len(body) > chunks * per_chunk:
            raise ValueError(
                f"prompt {row} needs {chunk_count(prompt, context_length)} windows, only {chunks} given"
            )
        for chunk in range(chunks):
            window = [bpe.sot_token_id, *body[chunk * per_chunk : (chunk + 1) * per_chunk], bpe.eot_token_id]
            ids[row, chunk, : len(window)] = torch.tensor(window)
    return ids


def tokenize_prompts(prompts: list[str], pad_token: int, context_length: int, chunks: int | None) -> Tokens:
    """What the text encoder takes: :func:`tokenize` (the original truncation), or with ``chunks``
    :func:`tokenize_chunks` (nothing cut)."""
    if chunks is None:
        return tokenize(prompts, pad_token, context_length)
    ids = tokenize_chunks(prompts, pad_token, chunks, context_length)
    return Tokens(ids=ids, truncated=[0] * len(prompts))
