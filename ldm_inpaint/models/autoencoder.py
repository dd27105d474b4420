"""AutoencoderKL of the original ``ldm.models.autoencoder``, attribute names = checkpoint keys.

The KL-regularised autoencoder of Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models" (2022), Sec. 3.1 and App. G: a convolutional encoder maps an image in [-1, 1] to the mean and
log-variance of a diagonal Gaussian over a latent downsampled by f = 2 ** (len(ch_mult) - 1); the decoder
maps a latent back to an image. The blocks follow ``ldm/modules/diffusionmodules/model.py`` (from the DDPM
code of Ho et al.): pre-norm residual blocks with GroupNorm(32, eps=1e-6) and swish, no timestep embedding,
single-head self-attention with 1x1 conv projections in the middle of both networks. The latent scale factor
(0.18215) is applied by the pipeline, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks

from ldm_inpaint.errors import ConfigError, LdmInpaintError
from ldm_inpaint.models.attention import attention


@dataclass(frozen=True)
class AutoencoderParams:
    """Hyperparameters of ``ldm.models.autoencoder.AutoencoderKL`` (``embed_dim`` + the ``ddconfig``)."""

    embed_dim: int
    z_channels: int
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    double_z: bool = True


def group_norm(channels: int) -> nn.GroupNorm:
    """The original ``Normalize``: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)


def _overwritable(producer: nn.Module) -> bool:
    """Whether the caller may overwrite the output of ``producer`` in place: autograd is off and no forward
    hook (the module's own or a global one) can have kept a reference to it. At 512x512 every activation of
    the outer levels is 134-268 MB: reusing one instead of allocating another lowers the decoder's peak memory
    and its page faults (values are unchanged: the same operations, written into the input's storage)."""
    return not torch.is_grad_enabled() and not producer._forward_hooks and not _global_forward_hooks


def swish_norm(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """``silu(norm(x))``, in the norm's output when it may be overwritten."""
    return F.silu(norm(x), inplace=_overwritable(norm))


def residual(producer: nn.Module, x: Tensor, shortcut: Tensor) -> Tensor:
    """``shortcut + producer(x)``, summed into the producer's output when it may be overwritten and has the
    shortcut's memory layout (the layout of a sum decides which kernels the next layers run, and so their
    rounding)."""
    h = producer(x)
    if _overwritable(producer) and h.stride() == shortcut.stride():
        return h.add_(shortcut)
    return shortcut + h


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1(x)))))); a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish_norm(self.norm1, x))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return residual(self.conv2, swish_norm(self.norm2, h), shortcut)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, x + proj_out(softmax(q k^T / sqrt(c)) v); q, k, v are
    1x1 convs of the group-normed input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.attention_slice: int | None = None  # see attention.set_attention_slicing
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        h = self.norm(x)
        # (b, c, h, w) -> (b, h*w, c), one token per pixel
        q, k, v = (rearrange(proj(h), "b c h w -> b (h w) c") for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, heads=1, slice_size=self.attention_slice)
        # (b, h*w, c) -> (b, c, h, w)
        out = rearrange(out, "b (h w) c -> b c h w", h=height)
        return residual(self.proj_out, out, x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding one row at the bottom and one column at the right (the original's
    asymmetric padding; a symmetric ``padding=1`` would shift the sampling grid)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # (b, c, h, w) -> (b, c, h + 1, w + 1) -> (b, c, h / 2, w / 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        # (b, c, h, w) -> (b, c, 2h, 2w)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder (``down[i]``) or decoder (``up[i]``): ``block[j]``, each followed by
    ``attn[j]`` when this resolution is in ``attn_resolutions`` (else ``attn`` is empty), then the optional
    ``downsample`` or ``upsample``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        with_attn: bool,
        downsample: bool = False,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1]) for j in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks) if with_attn)
        self.downsample = Downsample(out_channels) if downsample else None
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, h: Tensor) -> Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class MidBlock(nn.Module):
    """``mid``: resnet block, self-attention, resnet block at the lowest resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (b, in_channels, H, W) -> moments (b, 2 * z_channels, H / f, W / f)."""

    def __init__(self, params: AutoencoderParams) -> None:
        super().__init__()
        ch, mult, levels = params.ch, params.ch_mult, len(params.ch_mult)
        in_mult = (1, *mult)
        self.conv_in = conv3x3(params.in_channels, ch)
        self.down = nn.ModuleList(
            Level(
                ch * in_mult[i],
                ch * mult[i],
                params.num_res_blocks,
                with_attn=params.resolution // 2**i in params.attn_resolutions,
                downsample=i != levels - 1,
            )
            for i in range(levels)
        )
        self.mid = MidBlock(ch * mult[-1])
        self.norm_out = group_norm(ch * mult[-1])
        self.conv_out = conv3x3(ch * mult[-1], 2 * params.z_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish_norm(self.norm_out, h))


class Decoder(nn.Module):
    """Latent (b, z_channels, h, w) -> image (b, out_ch, h * f, w * f).

    ``up[i]`` works at the same resolution as the encoder's ``down[i]`` (``up[0]`` is the full resolution),
    so the forward pass walks ``up`` from the last index to the first. Each level has ``num_res_blocks + 1``
    blocks.
    """

    def __init__(self, params: AutoencoderParams) -> None:
        super().__init__()
        ch, mult, levels = params.ch, params.ch_mult, len(params.ch_mult)
        lowest_resolution = params.resolution // 2 ** (levels - 1)
        self.conv_in = conv3x3(params.z_channels, ch * mult[-1])
        self.mid = MidBlock(ch * mult[-1])
        self.up = nn.ModuleList(
            Level(
                ch * mult[min(i + 1, levels - 1)],  # the width coming up from the level below
                ch * mult[i],
                params.num_res_blocks + 1,
                with_attn=lowest_resolution * 2 ** (levels - 1 - i) in params.attn_resolutions,
                upsample=i != 0,
            )
            for i in range(levels)
        )
        self.norm_out = group_norm(ch * mult[0])
        self.conv_out = conv3x3(ch * mult[0], params.out_ch)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish_norm(self.norm_out, h))


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))) of the original ``DiagonalGaussianDistribution``.

    Built from the moments (b, 2c, h, w): the first c channels are the mean, the last c the log-variance,
    clamped to [-30, 20] as in the original.
    """

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps with eps ~ N(0, I), drawn on the generator's device (CPU if none), so that a
        seeded generator gives the same sample on every device."""
        device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """``encoder`` + ``quant_conv`` give the posterior; ``post_quant_conv`` + ``decoder`` map a latent back.

    Latents are the unscaled ones (the diffusion model sees them multiplied by the config's ``scale_factor``).
    """

    def __init__(self, params: AutoencoderParams) -> None:
        super().__init__()
        if not params.double_z:
            raise ConfigError("AutoencoderKL needs double_z: true (mean and log-variance), found false")
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.quant_conv = nn.Conv2d(2 * params.z_channels, 2 * params.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(params.embed_dim, params.z_channels, kernel_size=1)

    @property
    def downscale_factor(self) -> int:
        """Image size / latent size: one halving per level but the last."""
        return 2 ** (len(self.params.ch_mult) - 1)

    def float32_copy(self) -> AutoencoderKL:
        """A float32 twin with plain convolutions and the same attention slicing (the same weights, upcast
        exactly: about 330 MB for SD's VAE), for a half-precision pass that overflowed."""
        with torch.device("meta"):
            twin = AutoencoderKL(self.params)
        twin.load_state_dict({key: value.float() for key, value in self.state_dict().items()}, assign=True)
        slices = {
            name: module.attention_slice
            for name, module in self.named_modules()
            if hasattr(module, "attention_slice")
        }
        for name, module in twin.named_modules():
            if name in slices:
                module.attention_slice = slices[name]
        return twin.eval()

    def forward(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """The original ``AutoencoderKL.forward``: (reconstruction, posterior) of an image, decoded from the
        posterior sample ``mean + std * eps`` (its mean when ``eps`` is None). Used to train the VAE."""
        posterior = self.encode(x)
        z = posterior.mean if eps is None else posterior.mean + posterior.std * eps
        return self.decode(z), posterior

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Image (b, in_channels, H, W) in [-1, 1] -> posterior over latents (b, embed_dim, H / f, W / f)."""
        self._check_image(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent (b, embed_dim, h, w) -> image (b, out_ch, h * f, w * f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def _check_image(self, x: Tensor) -> None:
        f, channels = self.downscale_factor, self.params.in_channels
        if x.ndim != 4 or x.shape[1] != channels:
            raise LdmInpaintError(f"the VAE encodes images (batch, {channels}, H, W), found {tuple(x.shape)}")
        height, width = x.shape[2:]
        if height % f or width % f:
            raise LdmInpaintError(
                f"image height and width must be multiples of {f} (the VAE downscale factor), "
                f"found {height}x{width}"
            )
