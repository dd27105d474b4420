"""The one attention kernel shared by the UNet, the VAE and the text encoder.

Every caller projects its own queries, keys and values (1x1 convs in the VAE, linear layers in the UNet,
a fused ``in_proj`` in the text encoder) and hands them here as ``(batch, tokens, heads * head_dim)``.

Half precision. The SD2 original computes q k^T in float32 under fp16 because the raw dot products of its
UNet can exceed float16's largest value (65504). Here the scores are never formed in the input dtype:
every backend of ``F.scaled_dot_product_attention`` accumulates q k^T and runs the softmax in float32 for
fp16/bf16 inputs (the flash kernels on CPU and CUDA, the memory-efficient and cuDNN kernels on CUDA by
design; the math fallback upcasts its inputs since torch 2.5, unless a user opts out with
``torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)``), and only the output, a convex combination
of the rows of v, is rounded back to the input dtype. So no explicit upcast is needed, and float32 inputs
take exactly the path they always did. ``tests/test_precision.py`` checks fp16 logits far beyond 65504.

Slicing. ``slice_size`` processes the queries ``slice_size`` at a time, so that a backend which materialises
the (n x m) score matrix (the math fallback) holds only (slice_size x m) of it at once; each query's output
depends on its own row of scores only, so the result is the unsliced one up to summation order. The flash
kernels already work in blocks and need no slicing. Modules that call the kernel keep their slice size in an
``attention_slice`` attribute (None: whole), set by :func:`set_attention_slicing`.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm_inpaint.errors import LdmInpaintError


def attention(
    q: Tensor, k: Tensor, v: Tensor, heads: int, causal: bool = False, slice_size: int | None = None
) -> Tensor:
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v, per head.

    q: (b, n, heads * d); k, v: (b, m, heads * d). Returns (b, n, heads * d). ``slice_size`` (non-causal
    only) computes the queries in chunks of that many tokens.
    """
    # (b, n, h*d) -> (b, h, n, d)
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    tokens = q.shape[2]
    if slice_size is None or slice_size >= tokens:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        if causal:
            raise ValueError("sliced attention is for non-causal attention only (query i sees every key)")
        out = q.new_empty(*q.shape[:3], v.shape[3])
        for start in range(0, tokens, slice_size):
            rows = slice(start, start + slice_size)
            # (b, h, slice_size, d) of queries against all m keys
            out[:, :, rows] = F.scaled_dot_product_attention(q[:, :, rows], k, v)
    # (b, h, n, d) -> (b, n, h*d)
    return rearrange(out, "b h n d -> b n (h d)")


def set_attention_slicing(model: nn.Module, slice_size: int | None) -> None:
    """Set ``attention_slice`` on every attention module of ``model`` (UNet and VAE blocks): queries are then
    processed ``slice_size`` tokens at a time, to save memory where the score matrix would be materialised;
    None turns slicing off."""
    if slice_size is not None and slice_size < 1:
        raise LdmInpaintError(
            f"attention slice size must be a positive number of tokens or None, found {slice_size}"
        )
    for module in model.modules():
        if hasattr(module, "attention_slice"):
            module.attention_slice = slice_size
