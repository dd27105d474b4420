"""``ldm-inpaint eval score``: FID against pytorch-fid and a direct computation, LPIPS against the lpips
package, SSIM and PSNR against direct formulas, LaMa's area bins, file matching, several processes, the report, errors.

The networks have random weights, written to files in the layout of the published ones (legacy torch.save
format, as they are); the oracles (pytorch-fid, lpips) read the same files through their own loaders, found in
the torch hub cache or handed to torchvision's builder, so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pytorch_fid.fid_score import calculate_fid_given_paths
from scipy import linalg, signal
from skimage import data as photos
from skimage.metrics import peak_signal_noise_ratio
from skimage.transform import resize

from ldm_inpaint.evaluation import features, metrics, report
from ldm_inpaint.evaluation.score import Record, Scores, match_files, score_main, scoring_throughput
from tests.conftest import REPO
from tests.eval_weights import make_weights

# Float parity: the same numbers reached by another order of float operations (moments vs centered features,
# batches of another size, sums over processes) agree to this relative error.
TOLERANCE = 1e-6
SIZE = 64
# Masks of full-width rows: areas 3/64, 10/64, 16/64, 23/64, 29/64, 52/64, one in each of the bins 0-10 %,
# 10-20 %, 20-30 %, 30-40 %, 40-50 %, 80-90 %. Each FID costs a 2048 x 2048 matrix square root (seconds): with
# one image per bin only the overall FID is computed here; the FID of bins is tested on small features.
MASK_ROWS = (3, 10, 16, 23, 29, 52)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    return make_weights(tmp_path_factory.mktemp("hub"))


def _photo(index: int) -> np.ndarray:
    picture = getattr(photos, PHOTOS[index])()
    square = picture[: min(picture.shape[:2]), : min(picture.shape[:2])]
    return (resize(square, (SIZE, SIZE), anti_aliasing=True) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """real/ (crops only), masks/, pred/: each prediction is its crop with the masked rows replaced by
    noise."""
    root = tmp_path_factory.mktemp("eval")
    paths = {name: root / name for name in ("real", "masks", "pred")}
    for path in paths.values():
        path.mkdir()
    generator = np.random.default_rng(0)
    for index, rows in enumerate(MASK_ROWS):
        real = _photo(index)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[:rows] = 255
        pred = real.copy()
        pred[:rows] = generator.integers(0, 256, (rows, SIZE, 3), dtype=np.uint8)
        Image.fromarray(real).save(paths["real"] / f"img{index}_crop000.png")
        Image.fromarray(mask).save(paths["masks"] / f"img{index}_crop000_mask000.png")
        Image.fromarray(pred).save(paths["pred"] / f"img{index}_crop000_mask000.png")
    return paths


def _arguments(folders, weights, out: Path, masks: bool = True) -> list[str]:
    arguments = ["--pred", str(folders["pred"]), "--real", str(folders["real"]), "--out", str(out)]
    arguments += ["--inception-weights", str(weights["inception"]), "--lpips-weights", str(weights["vgg"])]
    arguments += ["--device", "cpu", "--batch-size", "4"]
    return arguments + (["--masks", str(folders["masks"])] if masks else [])


@pytest.fixture(scope="module")
def single(folders, weights, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("single") / "report"
    assert score_main(_arguments(folders, weights, out)) == 0
    return out, json.loads((out / report.JSON_FILE).read_text())


def _pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.iterdir())]


def test_fid_from_moments_equals_the_direct_computation() -> None:
    generator = np.random.default_rng(1)
    pred, real = (
        generator.normal(size=(40, 6)),
        generator.normal(0.3, 2.0, size=(30, 6)) @ generator.normal(size=(6, 6)),
    )
    # moments summed over uneven chunks, as batches and processes give them
    pred_moments = sum(metrics.feature_moments(torch.from_numpy(chunk)) for chunk in np.split(pred, [7, 25]))
    real_moments = sum(
        metrics.feature_moments(torch.from_numpy(chunk)) for chunk in np.split(real, [1, 2, 29])
    )
    mu, sigma = metrics.gaussian_from_moments(pred_moments)
    np.testing.assert_allclose(mu, pred.mean(axis=0), rtol=TOLERANCE)
    np.testing.assert_allclose(sigma, np.cov(pred, rowvar=False), rtol=TOLERANCE)
    # Tr (S1 S2)^(1/2) = sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric)
    sigma_pred, sigma_real = np.cov(pred, rowvar=False), np.cov(real, rowvar=False)
    root = linalg.sqrtm(sigma_pred).real
    trace_root = np.sqrt(np.linalg.eigvalsh(root @ sigma_real @ root)).sum()
    diff = pred.mean(axis=0) - real.mean(axis=0)
    direct = diff @ diff + np.trace(sigma_pred) + np.trace(sigma_real) - 2 * trace_root
    assert metrics.frechet_distance(pred_moments, real_moments) == pytest.approx(direct, rel=TOLERANCE)


def test_fid_equals_pytorch_fid_on_the_same_folders_and_weights(
    single, folders, weights, monkeypatch
) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", str(weights["hub"]))  # pytorch-fid finds "its" cached file
    paths = [str(folders["pred"]), str(folders["real"])]
    expected = calculate_fid_given_paths(paths, batch_size=50, device="cpu", dims=2048, num_workers=0)
    assert expected > 1  # the random network tells the noisy predictions from the photos
    assert single[1]["overall"]["fid"] == pytest.approx(expected, rel=TOLERANCE)


def test_lpips_equals_the_lpips_package_with_the_same_backbone(single, folders, weights, monkeypatch) -> None:
    vgg16 = torchvision.models.vgg16
    state = torch.load(weights["vgg"], weights_only=True)

    def vgg16_from_the_file(**_: object) -> torch.nn.Module:  # what torchvision's download would give
        network = vgg16(weights=None)
        network.features.load_state_dict(
            {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        )
        return network

    monkeypatch.setattr(torchvision.models, "vgg16", vgg16_from_the_file)
    oracle = lpips.LPIPS(net="vgg", version="0.1", verbose=False).eval()
    pred = torch.from_numpy(np.stack(_pixels(folders["pred"]))).permute(0, 3, 1, 2).float() / 255
    real = torch.from_numpy(np.stack(_pixels(folders["real"]))).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = oracle(pred, real, normalize=True).flatten().numpy()
        ours = features.lpips_distances(features.load_lpips(weights["vgg"]), pred, real).numpy()
    np.testing.assert_allclose(ours, expected, rtol=TOLERANCE)
    reported = [image["lpips"] for image in single[1]["per_image"]]
    np.testing.assert_allclose(reported, expected, rtol=TOLERANCE)
    assert expected.min() > 0


def _gaussian_ssim(pred: np.ndarray, real: np.ndarray) -> float:
    """SSIM with LaMa's 11 x 11 Gaussian window (sigma 1.5), over the positions where the window fits."""
    taps = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    window = np.outer(taps, taps) / taps.sum() ** 2
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for channel in range(3):
        x, y = pred[..., channel] / 255, real[..., channel] / 255

        def blur(image):
            return signal.convolve2d(image, window, mode="valid")

        mu_x, mu_y = blur(x), blur(y)
        var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
        ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        values.append(ssim_map.mean())
    return float(np.mean(values))


def test_ssim_and_psnr_equal_their_formulas(single, folders) -> None:
    preds, reals = _pixels(folders["pred"]), _pixels(folders["real"])
    for pred, real, image in zip(preds, reals, single[1]["per_image"], strict=True):
        assert metrics.ssim(pred, real) == pytest.approx(_gaussian_ssim(pred, real), rel=TOLERANCE)
        assert image["ssim"] == metrics.ssim(pred, real)
        assert image["psnr"] == pytest.approx(
            peak_signal_noise_ratio(real, pred, data_range=255), rel=TOLERANCE
        )
    assert metrics.psnr(reals[0], reals[0]) == float("inf")


def test_area_bins_follow_lamas_edges() -> None:
    areas = {0.0: 0, 0.0999: 0, 0.1: 1, 0.45: 4, 0.4999: 4, 0.5: 5, 0.95: 9, 1.0: 9}
    assert {area: metrics.area_bin(area) for area in areas} == areas
    assert [metrics.bin_name(index) for index in (0, 4, 9)] == ["0-10%", "40-50%", "90-100%"]


def test_fid_by_mask_area_is_over_each_bins_images() -> None:
    generator = np.random.default_rng(2)
    areas = [0.05, 0.42, 0.43, 0.44, 0.46, 0.5, 0.55, 1.0]  # bins 0, 4, 4, 4, 4, 5, 5, 9
    pred, real = generator.normal(size=(8, 3)), generator.normal(size=(8, 3))
    records = [Record(f"{index}.png", area, 0.1 * index, 0.5, 20.0) for index, area in enumerate(areas)]
    moments = {}
    for index, record in enumerate(records):
        both = torch.stack(
            [metrics.feature_moments(torch.from_numpy(x[index : index + 1])) for x in (pred, real)]
        )
        moments[record.group] = moments.get(record.group, 0) + both
    content = report.build_report(Scores(records, moments, [], 1.0), [], {}, 1)

    def fid(rows: list[int]) -> float:
        """The FID of just these images' features."""
        pred_moments, real_moments = (
            metrics.feature_moments(torch.from_numpy(x[rows])) for x in (pred, real)
        )
        return metrics.frechet_distance(pred_moments, real_moments)

    assert content["overall"]["fid"] == pytest.approx(fid(list(range(8))), rel=TOLERANCE)
    assert [row["images"] for row in content["bins"]] == [1, 0, 0, 0, 4, 2, 0, 0, 0, 1]
    assert content["bins"][4]["fid"] == pytest.approx(fid([1, 2, 3, 4]), rel=TOLERANCE)
    assert content["bins"][5]["fid"] == pytest.approx(fid([5, 6]), rel=TOLERANCE)
    assert [row["fid"] for index, row in enumerate(content["bins"]) if index not in (4, 5)] == [None] * 8
    assert content["bins"][4]["lpips"] == {
        "mean": pytest.approx(0.25),
        "std": pytest.approx(np.std([0.1, 0.2, 0.3, 0.4])),
    }


def test_the_report_files(single) -> None:
    out, content = single
    assert [image["area"] for image in content["per_image"]] == [rows / SIZE for rows in MASK_ROWS]
    assert [image["bin"] for image in content["per_image"]] == [0, 1, 2, 3, 4, 8]
    assert [row["images"] for row in content["bins"]] == [1, 1, 1, 1, 1, 0, 0, 0, 1, 0]
    assert content["overall"]["images"] == 6 and content["not_scored"] == []
    lpips_values = [image["lpips"] for image in content["per_image"]]
    assert content["overall"]["lpips"] == {
        "mean": pytest.approx(np.mean(lpips_values)),
        "std": pytest.approx(np.std(lpips_values)),
    }
    text = (out / report.MARKDOWN_FILE).read_text()
    assert (
        "| Stable Diffusion inpainting | Places validation, 30k" in text
        and "| 1.00 | 0.141 ± 0.082 |" in text
    )
    assert f"| this run | the given data (6 images) | {content['overall']['fid']:.2f} |" in text
    assert "| 40-50% | 1 | – |" in text
    assert Image.open(out / report.CHART_FILE).size == (960, 600)
    inception = Path(content["sources"]["inception_weights"])
    assert (
        content["sources"]["inception_weights_sha256"] == hashlib.sha256(inception.read_bytes()).hexdigest()
    )


def test_two_processes_give_the_scores_of_one(single, folders, weights, tmp_path) -> None:
    out = tmp_path / "report"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ldm_inpaint.evaluation.score", *_arguments(folders, weights, out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    sharded, expected = json.loads((out / report.JSON_FILE).read_text()), single[1]
    assert sharded["processes"] == 2
    assert [image["name"] for image in sharded["per_image"]] == [
        image["name"] for image in expected["per_image"]
    ]
    for key in ("area", "lpips", "ssim", "psnr"):
        np.testing.assert_allclose(
            [image[key] for image in sharded["per_image"]],
            [image[key] for image in expected["per_image"]],
            rtol=TOLERANCE,
        )
    assert sharded["overall"]["fid"] == pytest.approx(expected["overall"]["fid"], rel=TOLERANCE)
    assert [row["images"] for row in sharded["bins"]] == [row["images"] for row in expected["bins"]]


def test_files_are_matched_by_lamas_names(tmp_path) -> None:
    """LaMa's layout: crops and masks side by side in one folder, serving as --real and --masks."""
    data, pred = tmp_path / "data", tmp_path / "pred"
    data.mkdir()
    pred.mkdir()
    for name in ("a_crop000", "a_crop000_mask000", "a_crop000_mask001", "b_crop000", "c_crop000_mask000"):
        (data / f"{name}.png").touch()
    for name in ("a_crop000_mask000", "a_crop000_mask001", "a_crop000_mask002", "d_crop000_mask000"):
        (pred / f"{name}.png").touch()
    items, problems = match_files(pred, data, data)
    assert [(item.prediction.name, item.real.name, item.mask.name) for item in items] == [
        ("a_crop000_mask000.png", "a_crop000.png", "a_crop000_mask000.png"),
        ("a_crop000_mask001.png", "a_crop000.png", "a_crop000_mask001.png"),
    ]
    assert problems == [
        f"{pred / 'a_crop000_mask002.png'}: no mask a_crop000_mask002.<ext> in {data}",
        f"{pred / 'd_crop000_mask000.png'}: no real image d_crop000.<ext> in {data}",
        f"{pred / 'd_crop000_mask000.png'}: no mask d_crop000_mask000.<ext> in {data}",
        f"{data / 'b_crop000.png'}: no prediction for it in {pred}",
    ]
    items, problems = match_files(pred, data, None)
    assert len(items) == 3 and len(problems) == 2


@pytest.mark.parametrize("which", ["inception", "vgg"])
def test_a_missing_weights_file_is_one_line_naming_it(which, folders, weights, tmp_path, capsys) -> None:
    arguments = _arguments(folders, {**weights, which: tmp_path / "absent.pth"}, tmp_path / "report")
    assert score_main(arguments) == 2
    published = {"inception": features.FID_INCEPTION, "vgg": features.VGG16}[which]
    assert capsys.readouterr().err == (
        f"ldm-inpaint eval score: error: {published.what}: expected the file {published.name} at "
        f"{tmp_path / 'absent.pth'}, found nothing; download it from {published.url} and pass its path with "
        f"{published.option}\n"
    )
    assert not (tmp_path / "report").exists()


def test_a_file_that_is_not_the_weights_is_one_line(folders, weights, tmp_path, capsys) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    assert score_main(_arguments(folders, {**weights, "inception": junk}, tmp_path / "report")) == 2
    assert capsys.readouterr().err.startswith(
        f"ldm-inpaint eval score: error: {junk}: expected the FID Inception weights "
        f"({features.FID_INCEPTION.name}, a PyTorch state dict), could not read it ("
    )
    assert score_main(_arguments(folders, {**weights, "inception": weights["vgg"]}, tmp_path / "report")) == 2
    assert capsys.readouterr().err == (
        f"ldm-inpaint eval score: error: {weights['vgg']}: expected the FID Inception weights "
        f"({features.FID_INCEPTION.name}); its tensors do not fit the network: 566 missing "
        "['Conv2d_1a_3x3.bn.bias', 'Conv2d_1a_3x3.bn.num_batches_tracked', 'Conv2d_1a_3x3.bn.running_mean'], "
        "27 unexpected ['classifier.6.bias', 'features.0.bias', 'features.0.weight']\n"
    )


def test_an_existing_report_is_never_overwritten(folders, weights, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / report.JSON_FILE).write_text("{}")
    assert score_main(_arguments(folders, weights, out)) == 2
    assert capsys.readouterr().err == (
        f"ldm-inpaint eval score: error: {out / report.JSON_FILE} exists; a report is never overwritten: "
        "choose another --out or move it away\n"
    )
    assert (out / report.JSON_FILE).read_text() == "{}"


def test_scoring_throughput_is_measured() -> None:
    assert scoring_throughput(count=2, size=SIZE, batch_size=2) > 0
