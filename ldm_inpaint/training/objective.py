"""The training losses: the diffusion loss, built with the conditioning code that inference uses, and the
autoencoder's (``--stage autoencoder``).

``x0 = scale_factor * E(image)`` (VAE posterior mean, frozen), ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 -
alpha_bar_t) eps`` (:func:`~ldm_inpaint.parameterization.noised`), the UNet input ``cat(x_t, mask, scale_factor
* E(masked image))`` (:func:`~ldm_inpaint.conditioning.inpainting_concat`, :func:`~ldm_inpaint.conditioning.unet_input`)
and the text context (frozen encoder); the loss is the mean squared error to the target of the model's
parameterization (:func:`~ldm_inpaint.parameterization.training_target`: eps, or v), optionally weighted by
min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 8-9).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ldm_inpaint.conditioning import encode_latent, inpainting_concat, unet_input
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.parameterization import noised, training_target
from ldm_inpaint.training.batches import Batch


def min_snr_weight(alpha_bar: Tensor, gamma: float, parameterization: str) -> Tensor:
    """``min(SNR, gamma) / SNR`` for an eps target, ``min(SNR, gamma) / (SNR + 1)`` for a v target, with
    ``SNR = alpha_bar / (1 - alpha_bar)``: the loss weight that makes each target equivalent to an x0 loss
    weighted by ``min(SNR, gamma)``."""
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if parameterization == "eps" else clipped / (snr + 1.0)


@torch.no_grad()
def frozen_inputs(
    model: LatentDiffusion, batch: Batch, tokenize: Callable[[list[str]], Tensor]
) -> tuple[Tensor, Tensor | None, Tensor]:
    """What the frozen parts give the UNet: the clean latents x0, the concat conditioning (None for a
    text-to-image UNet) and the text context."""
    device, dtype = model.device, model.dtype
    image, mask = batch.image.to(device, dtype), batch.mask.to(device, dtype)
    vae, scale_factor = model.first_stage_model, model.config.scale_factor

    def encode(pixels: Tensor) -> Tensor:
        return encode_latent(vae, pixels, scale_factor)

    x0 = encode(image)
    concat = (
        inpainting_concat(encode, image, mask, tuple(x0.shape[-2:])) if model.config.is_inpainting else None
    )
    context = model.cond_stage_model(tokenize(batch.captions).to(device))
    return x0, concat, context


def sample_losses(
    model: LatentDiffusion,
    unet: nn.Module,
    batch: Batch,
    alphas_cumprod: Tensor,
    tokenize: Callable[[list[str]], Tensor],
    snr_gamma: float | None = None,
) -> Tensor:
    """The loss of each sample (b,), float32. ``unet`` is the network that is trained (the model's UNet, or
    it wrapped for data parallelism); everything else is frozen."""
    x0, concat, context = frozen_inputs(model, batch, tokenize)
    timesteps = batch.timesteps.to(x0.device)
    # (b,) -> (b, 1, 1, 1)
    alpha_bar = alphas_cumprod.to(x0.device)[timesteps].float()[:, None, None, None]
    eps = batch.noise.to(x0)
    x_t = noised(x0.float(), eps.float(), alpha_bar).to(x0.dtype)
    prediction = unet(unet_input(x_t, concat), timesteps, context)
    parameterization = model.config.parameterization
    target = training_target(parameterization, x0.float(), eps.float(), alpha_bar)
    losses = (prediction.float() - target).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        losses = losses * min_snr_weight(alpha_bar.flatten(), snr_gamma, parameterization)
    return losses


def autoencoder_losses(vae: nn.Module, batch: Batch, kl_weight: float) -> Tensor:
    """The loss of each sample (b,) of a KL autoencoder (``vae`` is :class:`~ldm_inpaint.models.autoencoder.
    AutoencoderKL` or it wrapped for data parallelism): the L1 reconstruction error of the decoded posterior
    sample (``batch.noise`` is its eps) plus ``kl_weight`` times KL(q(z|x) || N(0, I)) (Kingma & Welling 2014,
    App. B), both summed over the sample and divided by its pixel count: the original ``LPIPSWithDiscriminator``
    loss without its perceptual and adversarial terms and with its learned log-variance at 0 (the original
    weights KL by 1e-6 against the summed L1)."""
    device = next(vae.parameters()).device
    image = batch.image.to(device)
    reconstruction, posterior = vae(image, batch.noise.to(device))
    l1 = (reconstruction.float() - image).abs().flatten(1).sum(1)
    kl = 0.5 * (
        posterior.mean.float().pow(2) + posterior.logvar.float().exp() - 1.0 - posterior.logvar.float()
    )
    return (l1 + kl_weight * kl.flatten(1).sum(1)) / image[0].numel()
