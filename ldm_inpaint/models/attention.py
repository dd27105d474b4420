"""The one attention kernel shared by the UNet, the VAE and the text encoder.

Every caller projects its own queries, keys and values (1x1 convs in the VAE, linear layers in the UNet,
a fused ``in_proj`` in the text encoder) and hands them here as ``(batch, tokens, heads * head_dim)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, causal: bool = False) -> Tensor:
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v, per head.

    q: (b, n, heads * d); k, v: (b, m, heads * d). Returns (b, n, heads * d).
    """
    # (b, n, h*d) -> (b, h, n, d)
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    # (b, h, n, d) -> (b, n, h*d)
    return rearrange(out, "b h n d -> b n (h d)")
