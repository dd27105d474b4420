"""Randomly initialised stand-ins for the evaluation's published weights files, saved as those files are."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from ldm_inpaint.evaluation import features


def _save_legacy(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path, _use_new_zipfile_serialization=False)


def make_weights(hub: Path) -> dict[str, Path]:
    """Random FID Inception (He-initialized convolutions, so that pool3 features are of order one) and VGG16
    features (plus one classifier tensor, which LPIPS skips), where torch hub would cache the published
    files."""
    torch.manual_seed(0)
    inception = features.fid_inception_network()
    for module in inception.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    vgg = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    vgg_state = {f"features.{key}": value for key, value in vgg.state_dict().items()}
    vgg_state["classifier.6.bias"] = torch.zeros(1000)
    paths = {"hub": hub, "inception": hub / "checkpoints" / features.FID_INCEPTION.name}
    paths["vgg"] = hub / "checkpoints" / features.VGG16.name
    _save_legacy(inception.state_dict(), paths["inception"])
    _save_legacy(vgg_state, paths["vgg"])
    return paths
