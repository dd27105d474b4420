"""The UNet of the original ``openaimodel.UNetModel`` (SD1 and SD2 variants), attribute names = checkpoint
keys.

The denoiser eps_theta(x_t, t, c) of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", Sec. 3.3): a UNet of residual blocks conditioned on a sinusoidal timestep
embedding, with a ``SpatialTransformer`` (self-attention, cross-attention to the text context c, GEGLU
feed-forward) after the residual blocks at the resolutions listed in ``attention_resolutions``. Inference
only: the original's dropout layers are identities here, kept as placeholders so that the ``nn.Sequential``
indices match the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm_inpaint.models.attention import attention


@dataclass(frozen=True)
class UNetParams:
    """Hyperparameters of ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` as the YAML configs give
    them.

    Exactly one of ``num_heads`` (SD1: fixed head count) and ``num_head_channels`` (SD2: fixed head width) is
    set; the other is -1, as in the original.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    attention_resolutions: tuple[int, ...]
    num_res_blocks: int
    channel_mult: tuple[int, ...]
    context_dim: int
    num_heads: int = -1
    num_head_channels: int = -1
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``cat([cos(t w_i), sin(t w_i)])`` with
    frequencies ``w_i = max_period^(-i / half)``, i < half = dim // 2 (Vaswani et al. 2017, Sec. 3.5; the
    original's ``timestep_embedding`` puts cos first). ``dim`` is even for every SD UNet.

    timesteps: (b,) -> (b, dim), float32.
    """
    half = dim // 2
    # Same operation order as the original: at t ~ 1000 a last-bit difference in w_i moves t * w_i by ~1e-4.
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """The original ``normalization()``: 32 groups, eps 1e-5, computed in fp32 whatever the input dtype (the
    affine parameters too: a model cast to half precision holds them in half)."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class ResBlock(nn.Module):
    """``h = in_layers(x) + emb_layers(emb)``; ``out = skip_connection(x) + out_layers(h)``.

    The timestep embedding is added per channel (no scale-shift norm in SD). ``skip_connection`` is a 1x1 conv
    when the channel count changes and the identity otherwise.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Index 2 is the original's Dropout, an identity at inference.
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        # (b, c) -> (b, c, 1, 1), broadcast over the pixels
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Halve the resolution with a 3x3 stride-2 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    """Multi-head attention of the tokens ``x`` to ``context`` (to themselves when ``context`` is None)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.attention_slice: int | None = None  # see attention.set_attention_slicing
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # Index 1 was the original's Dropout; only the projection holds weights.
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        # (b, n, query_dim), (b, m, context_dim) -> (b, n, heads * dim_head)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = attention(q, k, v, self.heads, slice_size=self.attention_slice)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): ``a * gelu(g)`` where ``[a, g]`` is one linear projection split in two."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4x the width, back to ``dim``. Index 1 of ``net`` is the original's Dropout."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer layer: self-attention, cross-attention to the context, feed-forward, each
    residual. LayerNorms use PyTorch's default eps 1e-5, as the original."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, residual around the whole: GroupNorm (eps 1e-6), project
    in, ``depth`` transformer layers on the (h*w) tokens, project out.

    SD1 projects with 1x1 convs before flattening; SD2 (``use_linear``) flattens first and projects with
    linear layers. Both compute the same map; only the weight shapes differ.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner_dim)
            self.proj_out: nn.Module = nn.Linear(inner_dim, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, 1)
            self.proj_out = nn.Conv2d(inner_dim, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim) for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        # (b, c, h, w) -> (b, h*w, c)
        h = rearrange(h, "b c h w -> b (h w) c")
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        # (b, h*w, c) -> (b, c, h, w)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class TimestepEmbedSequential(nn.ModuleList):
    """The original container of one UNet stage (children numbered 0, 1, ...): each child gets the input it
    needs, residual blocks the timestep embedding, transformers the text context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """eps_theta(x_t, t, c): ``forward(x, timesteps, context)`` with x (b, in_channels, h, w), timesteps (b,)
    and context (b, tokens, context_dim); returns (b, out_channels, h, w).

    h and w must be multiples of 2^(len(channel_mult) - 1), the total downsampling factor.
    """

    def __init__(self, params: UNetParams) -> None:
        super().__init__()
        self.params = params
        ch = params.model_channels
        emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential([nn.Conv2d(params.in_channels, ch, 3, padding=1)])]
        )
        skip_channels = [ch]
        ds = 1  # downsampling factor of the current level
        for level, mult in enumerate(params.channel_mult):
            for _ in range(params.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * params.model_channels)]
                ch = mult * params.model_channels
                if ds in params.attention_resolutions:
                    layers.append(self._transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(params.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            [ResBlock(ch, emb_dim, ch), self._transformer(ch), ResBlock(ch, emb_dim, ch)]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(params.channel_mult))):
            for i in range(params.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * params.model_channels)]
                ch = mult * params.model_channels
                if ds in params.attention_resolutions:
                    layers.append(self._transformer(ch))
                if level != 0 and i == params.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, params.out_channels, 3, padding=1))
        # Gradient checkpointing (the original ``use_checkpoint``): when autograd records, each stage keeps
        # only its input and recomputes its activations in the backward pass; same outputs and gradients.
        self.checkpointing = False

    def _transformer(self, channels: int) -> SpatialTransformer:
        """The original's head split: SD1 fixes the head count, SD2 the head width."""
        p = self.params
        if p.num_head_channels == -1:
            heads, dim_head = p.num_heads, channels // p.num_heads
        else:
            heads, dim_head = channels // p.num_head_channels, p.num_head_channels
        return SpatialTransformer(
            channels, heads, dim_head, p.transformer_depth, p.context_dim, p.use_linear_in_transformer
        )

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        self._check_input(x)
        emb = self.time_embed(timestep_embedding(timesteps, self.params.model_channels).to(x.dtype))
        stage = self._stage
        skips = []
        h = x
        for block in self.input_blocks:
            h = stage(block, h, emb, context)
            skips.append(h)
        h = stage(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            # (b, c, h, w) + (b, c_skip, h, w) -> (b, c + c_skip, h, w)
            h = stage(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def _stage(self, block: TimestepEmbedSequential, h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def _check_input(self, x: Tensor) -> None:
        expected_channels = self.params.in_channels
        if x.ndim != 4 or x.shape[1] != expected_channels:
            raise ValueError(
                f"UNet input must be (batch, {expected_channels}, height, width), "
                f"found shape {tuple(x.shape)}"
            )
        factor = 2 ** (len(self.params.channel_mult) - 1)
        height, width = x.shape[-2:]
        if height % factor or width % factor:
            raise ValueError(
                f"UNet input height and width must be multiples of {factor} (the UNet downsamples "
                f"{len(self.params.channel_mult) - 1} times), found {height}x{width}"
            )
