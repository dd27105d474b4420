"""The scores as pure functions over features and pixels, with LaMa's evaluator's conventions
(``saicinpainting/evaluation``: ``evaluator.py``, ``losses/base_loss.py``).

FID from moments: the features ``x`` (``(n, d)``) of one image set enter only through
``M = sum_i [x_i; 1][x_i; 1]^T``, a ``(d + 1, d + 1)`` float64 matrix holding ``sum x x^T``, ``sum x`` and
``n``. Moments of disjoint sets add, so processes that score different files add theirs (an all-reduce) and
get the moments of the whole set; then ``mu = sum x / n``, ``Sigma = (sum x x^T - n mu mu^T) / (n - 1)``
(``np.cov``'s unbiased estimate, as pytorch-fid) and the Frechet distance of the two Gaussians,
``|mu_1 - mu_2|^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))`` (Dowson & Landau 1982), by
pytorch-fid's ``calculate_frechet_distance``.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from skimage.metrics import structural_similarity
from torch import Tensor

# LaMa's mask-area groups: edges np.linspace(0, 1, bins + 1); the LDM paper reports the 40-50 % group.
AREA_BINS = 10
PAPER_BIN = 4
# LaMa's SSIM (``losses/ssim.py``): an 11 x 11 Gaussian window of sigma 1.5 on images in [0, 1], the
# constants (0.01 * 1)^2 and (0.03 * 1)^2, population (not sample) local variances. scikit-image sizes its
# Gaussian window from sigma: radius int(3.5 sigma + 0.5) = 5, the same 11 taps.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def area_bin(area: float, bins: int = AREA_BINS) -> int:
    """The group of a mask covering ``area`` (0..1) of its image, as LaMa's evaluator:
    ``searchsorted(linspace(0, 1, bins + 1), area, side="right") - 1``, a full mask in the last group."""
    edges = np.linspace(0, 1, bins + 1)
    return min(int(np.searchsorted(edges, area, side="right")) - 1, bins - 1)


def bin_name(index: int, bins: int = AREA_BINS) -> str:
    """``"40-50%"``: the name LaMa gives group ``index`` of 10."""
    return f"{round(100 * index / bins)}-{round(100 * (index + 1) / bins)}%"


def feature_moments(features: Tensor) -> Tensor:
    """``sum_i [x_i; 1][x_i; 1]^T`` over the rows of ``features`` ``(n, d)``, in float64:
    ``(d + 1, d + 1)``."""
    x = features.to(torch.float64)
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (n, d) -> (n, d + 1)
    return x.T @ x


def gaussian_from_moments(moments: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` of the features summed in ``moments``."""
    m = moments.detach().cpu().to(torch.float64).numpy()
    n = m[-1, -1]
    if n < 2:
        raise ValueError(f"expected the moments of at least 2 feature vectors, found {n:g}")
    mu = m[:-1, -1] / n
    sigma = (m[:-1, :-1] - n * np.outer(mu, mu)) / (n - 1)
    return mu, sigma


def frechet_distance(pred_moments: Tensor, real_moments: Tensor) -> float:
    """FID between the two feature sets summed in the moments (see the module docstring)."""
    mu_pred, sigma_pred = gaussian_from_moments(pred_moments)
    mu_real, sigma_real = gaussian_from_moments(real_moments)
    return float(calculate_frechet_distance(mu_pred, sigma_pred, mu_real, sigma_real))


def _unit(image: np.ndarray) -> np.ndarray:
    """8-bit pixels -> float64 in [0, 1], as LaMa's loader (``/ 255``)."""
    return image.astype(np.float64) / 255


def ssim(pred: np.ndarray, real: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of two 8-bit ``(H, W, 3)`` images with LaMa's settings (:data:`SSIM_WINDOW`),
    by scikit-image, averaged over the channels.

    scikit-image leaves out the 5-pixel border where the window does not fit; LaMa's torch SSIM zero-pads
    there and averages the whole map. The two agree away from the border.
    """
    return float(
        structural_similarity(
            _unit(real),
            _unit(pred),
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=-1,
        )
    )


def psnr(pred: np.ndarray, real: np.ndarray) -> float:
    """PSNR in dB of two 8-bit images on the [0, 1] scale: ``10 log10(1 / MSE)``; identical images: inf."""
    mse = float(np.mean((_unit(pred) - _unit(real)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1 / mse))


def mean_std(values: list[float]) -> dict[str, float] | None:
    """``{"mean", "std"}`` of per-image scores (population std, as LaMa's ``PairwiseScore``); None if
    empty."""
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std())}
