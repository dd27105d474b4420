"""A run's starting point: the model (from a checkpoint, or from scratch for a config), what is trained in
it, and the optimizer, schedule, EMA, data and loss around it (:func:`build`).

Two stages, one loop: ``--stage unet`` trains the UNet with the diffusion loss (VAE and text encoder frozen);
``--stage autoencoder`` trains the VAE with L1 + KL (:func:`~.objective.autoencoder_losses`), the first stage
of a latent diffusion model trained from scratch. With ``--lora RANK`` only low-rank adapters on the UNet's
attention projections train (:class:`~ldm_inpaint.lora.network.LoRANetwork`), the UNet frozen. EMA follows
what the UNet stage trains (the UNet, or the adapters), never the autoencoder.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import yaml
from torch import Tensor, nn

from ldm_inpaint import distributed
from ldm_inpaint.checkpoint import DETECTED, config_beside, load_model
from ldm_inpaint.checkpoint_files import checkpoint_path
from ldm_inpaint.config import load_config, read_raw_config
from ldm_inpaint.lora.network import LoRANetwork
from ldm_inpaint.models.latent_diffusion import LatentDiffusion
from ldm_inpaint.schedule import alphas_cumprod
from ldm_inpaint.tokenizer import tokenize_prompts
from ldm_inpaint.training.batches import BatchRecipe
from ldm_inpaint.training.data import ImageFolder
from ldm_inpaint.training.ema import Ema
from ldm_inpaint.training.loop import Trainer, warmup_factor
from ldm_inpaint.training.objective import autoencoder_losses, sample_losses
from ldm_inpaint.training.settings import TrainSettings


def initial_model(settings: TrainSettings, device: torch.device) -> tuple[LatentDiffusion, str | None]:
    """The model at step 0, float32, frozen; and its config's YAML when the weights do not tell the config
    (to be written beside each checkpoint). Without ``--ckpt``: every network of ``--config`` at PyTorch's
    default initialisation, seeded by ``--seed`` (training from scratch; the text encoder stays random)."""
    if settings.ckpt is None:
        torch.manual_seed(settings.seed)
        model = LatentDiffusion(load_config(settings.config)).to(device).eval().requires_grad_(False)
        source = settings.config
    else:
        loaded = load_model(settings.ckpt, settings.config, dtype=torch.float32, device=device)
        model = loaded.model
        source = (
            None
            if loaded.config_source == DETECTED
            else settings.config or config_beside(checkpoint_path(settings.ckpt))
        )
    if source is None:
        return model, None
    raw, _ = read_raw_config(source)
    return model, yaml.safe_dump(raw, sort_keys=False)


class Adapted(nn.Module):
    """The UNet with LoRA adapters attached (``--lora``): what DDP wraps, so that it sees the adapters, the
    only parameters that train."""

    def __init__(self, unet: nn.Module, network: LoRANetwork) -> None:
        super().__init__()
        self.unet = unet
        self.network = network

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        return self.unet(x, timesteps, context)


def _tokenizer(model: LatentDiffusion) -> Callable[[list[str]], Tensor]:
    """Captions -> token ids (b, 77) for the model's text encoder."""
    params = model.config.text_encoder
    return lambda captions: tokenize_prompts(captions, params.pad_token, params.context_length, None).ids


def build(settings: TrainSettings, world: distributed.World) -> Trainer:
    """Model, data, optimizer, EMA and loss of a run, at step 0."""
    model, config_yaml = initial_model(settings, world.device)
    unet = model.model.diffusion_model
    unet.checkpointing = settings.grad_checkpointing
    if settings.stage == "autoencoder":
        trained: nn.Module = model.first_stage_model
        called: nn.Module = trained
    elif settings.lora is not None:
        torch.manual_seed(settings.seed)
        trained = LoRANetwork.create(unet, settings.lora)
        trained.attach(unet)
        called = Adapted(unet, trained)
    else:
        trained = called = unet
    trained.requires_grad_(True).train()
    wrapped = distributed.wrap(called, world)
    if settings.stage == "autoencoder":
        losses = partial(autoencoder_losses, wrapped, kl_weight=settings.kl_weight)
    else:
        schedule = alphas_cumprod(model.config.schedule).float().to(world.device)
        losses = partial(
            sample_losses,
            model,
            wrapped,
            alphas_cumprod=schedule,
            tokenize=_tokenizer(model),
            snr_gamma=settings.snr_gamma,
        )
    parameters = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    ema = None
    if settings.ema_decay and settings.stage == "unet":
        ema = Ema(
            ((name, p) for name, p in trained.named_parameters() if p.requires_grad), settings.ema_decay
        )
    factor = model.first_stage_model.downscale_factor
    settings.check_resolution(factor * 2 ** (len(model.config.unet.channel_mult) - 1))
    recipe = BatchRecipe(
        seed=settings.seed,
        batch_size=settings.batch_size,
        masks=settings.masks,
        p_full_mask=settings.p_full_mask,
        p_drop_text=settings.p_drop_text,
        timesteps=model.config.schedule.timesteps,
        latent_shape=(
            model.config.autoencoder.embed_dim,
            settings.resolution // factor,
            settings.resolution // factor,
        ),
    )
    return Trainer(
        settings=settings,
        world=world,
        model=model,
        trained=trained,
        wrapped=wrapped,
        losses=losses,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(settings.warmup)),
        scaler=torch.amp.GradScaler(world.device.type, enabled=settings.precision == "fp16"),
        ema=ema,
        data=ImageFolder(settings.data, settings.resolution, settings.masks == "files"),
        recipe=recipe,
        config_yaml=config_yaml,
    )
