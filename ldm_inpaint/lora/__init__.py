"""LoRA (low-rank adaptation) for the UNet and the text encoder: kohya / AUTOMATIC1111 files, adapters to train
(:class:`~ldm_inpaint.lora.network.LoRANetwork`) and LoRAs merged at inference
(:func:`~ldm_inpaint.lora.merge.apply_loras`)."""
