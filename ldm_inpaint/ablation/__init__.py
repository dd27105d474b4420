"""``ldm-inpaint ablate``: studies over options and checkpoints (see :mod:`ldm_inpaint.ablation.cli`)."""
