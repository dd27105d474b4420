"""The networks the scores look through, built from their packages' own classes and loaded from files given by
path: nothing is downloaded.

- FID (Heusel et al. 2017) as pytorch-fid and LaMa's evaluator compute it: the 2048-d pool3 features of the
  TensorFlow FID Inception, ported by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``). pytorch-fid
  builds it in ``fid_inception_v3``, which fetches the file by URL; :func:`fid_inception_network` builds the
  same network (torchvision's Inception v3 with pytorch-fid's ``FIDInception*`` blocks) without fetching, and
  :class:`FidInception` runs it as pytorch-fid's ``InceptionV3`` does: bilinear resize to 299 x 299, [0, 1]
  -> [-1, 1], the layers up to the final average pool.
- LPIPS (Zhang et al. 2018) v0.1 "net-lin" over VGG16, as LaMa's evaluator: the ``lpips`` package, which ships
  its linear heads but takes the VGG16 backbone from torchvision's ImageNet file (``vgg16-397923af.pth``), by
  URL too; :func:`load_lpips` builds ``lpips.LPIPS`` with a random backbone and loads the file into it.

Both published files predate PyTorch's zip format; ``torch.load(weights_only=True)`` reads them with its
restricted unpickler (tensors and plain containers only).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import lpips
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid import inception as fid
from torch import Tensor, nn

from ldm_inpaint.errors import LdmInpaintError

# pytorch-fid ``InceptionV3``: inputs resized to 299 x 299; block 3 (pool3) gives 2048 features.
INCEPTION_SIZE = 299
FID_DIMS = 2048
# torchvision ``Inception3`` layers up to pool3, in the order of pytorch-fid's blocks 0-3.
_POOL3_PATH = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "avgpool",
)
# lpips ``pretrained_networks.vgg16``: torchvision ``vgg16().features[start:stop]`` becomes ``slice<k>``, each
# layer keeping its index as its name (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 end the slices).
LPIPS_VGG_SLICES = ((1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30))


@dataclass(frozen=True)
class WeightsFile:
    """A published weights file that the user downloads once and names by ``option``."""

    what: str
    name: str
    url: str
    option: str


FID_INCEPTION = WeightsFile(
    "FID Inception weights",
    "pt_inception-2015-12-05-6726825d.pth",
    fid.FID_WEIGHTS_URL,
    "--inception-weights",
)
VGG16 = WeightsFile(
    "LPIPS VGG16 backbone",
    "vgg16-397923af.pth",
    "https://download.pytorch.org/models/vgg16-397923af.pth",
    "--lpips-weights",
)


def read_weights(path: str | Path, weights: WeightsFile) -> dict[str, Tensor]:
    """The tensors of a state-dict file, read without running code from it; a missing or unreadable file is
    an :class:`LdmInpaintError` saying where the published one is."""
    path = Path(path)
    if not path.is_file():
        found = "a folder" if path.is_dir() else "nothing"
        raise LdmInpaintError(
            f"{weights.what}: expected the file {weights.name} at {path}, found {found}; download it from "
            f"{weights.url} and pass its path with {weights.option}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as error:  # a damaged pickle makes the restricted unpickler raise anything (KeyError, ...)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LdmInpaintError(
            f"{path}: expected the {weights.what} ({weights.name}, a PyTorch state dict), could not read it "
            f"({reason})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise LdmInpaintError(
            f"{path}: expected the {weights.what} ({weights.name}), a dict of tensors; found a "
            f"{type(state).__name__} of other objects"
        )
    return state


def _load_exactly(module: nn.Module, state: dict[str, Tensor], weights: WeightsFile, path: Path) -> None:
    """``module.load_state_dict(state, strict=True)``, its error as one line naming the differing keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        expected = module.state_dict()
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
        found = [
            f"{len(keys)} {kind} {keys[:3]}"
            for kind, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("of another shape", reshaped),
            )
            if keys
        ]
        raise LdmInpaintError(
            f"{path}: expected the {weights.what} ({weights.name}); its tensors do not fit the network: "
            f"{', '.join(found) or str(error).splitlines()[0]}"
        ) from error


def fid_inception_network() -> nn.Module:
    """pytorch-fid's FID Inception (``fid_inception_v3``) with torchvision's default initialization instead of
    the downloaded weights: torchvision's Inception v3 (1008 classes, no auxiliary head) with the blocks that
    differ in the TensorFlow graph replaced by pytorch-fid's."""
    network = torchvision.models.inception_v3(
        num_classes=1008, aux_logits=False, weights=None, init_weights=False
    )
    network.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    network.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    network.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    network.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    network.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    network.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    network.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    network.Mixed_7b = fid.FIDInceptionE_1(1280)
    network.Mixed_7c = fid.FIDInceptionE_2(2048)
    return network


class FidInception(nn.Module):
    """Images ``(b, 3, H, W)`` in [0, 1] -> pool3 features ``(b, 2048)``, as pytorch-fid's ``InceptionV3``
    (default block 3, ``resize_input`` and ``normalize_input`` on)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for name in _POOL3_PATH:
            x = getattr(self.network, name)(x)
        return x.flatten(1)  # (b, 2048, 1, 1) -> (b, 2048)


def load_fid_inception(path: str | Path) -> FidInception:
    """The FID Inception with the weights of ``path`` (pytorch-fid's file), in eval mode, on the CPU."""
    network = fid_inception_network()
    _load_exactly(network, read_weights(path, FID_INCEPTION), FID_INCEPTION, Path(path))
    return FidInception(network).eval()


def lpips_network() -> lpips.LPIPS:
    """``lpips.LPIPS`` v0.1 net-lin over VGG16 with its shipped linear heads and a random backbone (nothing
    downloaded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision on lpips' ``pretrained=`` argument
        return lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()


def lpips_vgg_name(key: str) -> str | None:
    """The name in ``LPIPS.net`` of torchvision's ``features.<i>.<param>``; None outside the five slices."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "features" or not parts[1].isdigit():
        return None
    _, index, param = parts
    for number, start, stop in LPIPS_VGG_SLICES:
        if start <= int(index) < stop:
            return f"slice{number}.{index}.{param}"
    return None


def load_lpips(path: str | Path) -> lpips.LPIPS:
    """LPIPS (VGG, v0.1) with the backbone of ``path``, torchvision's ``vgg16`` ImageNet file: its
    ``features.*`` tensors go into lpips' slices; its ``classifier.*`` tensors are not used by LPIPS and are
    skipped; anything else is an error."""
    path = Path(path)
    state = read_weights(path, VGG16)
    features = {key: value for key, value in state.items() if key.startswith("features.")}
    other = sorted(key for key in state if not key.startswith(("features.", "classifier.")))
    outside = sorted(key for key in features if lpips_vgg_name(key) is None)
    if other or outside:
        raise LdmInpaintError(
            f"{path}: expected torchvision's vgg16 weights ({VGG16.name}: features.* and classifier.*), "
            f"found other tensors: {(other + outside)[:3]}"
        )
    model = lpips_network()
    _load_exactly(model.net, {lpips_vgg_name(key): value for key, value in features.items()}, VGG16, path)
    return model


def lpips_distances(model: lpips.LPIPS, pred: Tensor, real: Tensor) -> Tensor:
    """LPIPS between image pairs ``(b, 3, H, W)`` in [0, 1] (``normalize=True`` maps them to [-1, 1], as
    LaMa's ``PerceptualLoss``): ``(b,)``."""
    return model(pred, real, normalize=True).flatten()  # (b, 1, 1, 1) -> (b,)
