"""Image I/O: every pixel mode to the right tensor values, mask binarization as the original scripts do it,
padding, 8-bit output, numbered non-overwriting saves with metadata, batch pairing, and clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_inpaint import image_io
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.image_io import (
    ImageError,
    check_same_size,
    crop,
    image_to_tensor,
    load_image,
    mask_to_tensor,
    pad_to_multiple,
    read_png_metadata,
    resize_mask,
    save_npy,
    save_png,
    tensor_to_pil,
)
from ldm_inpaint.pairs import find_pairs


def _row(mode: str, values: list, dtype: str) -> Image.Image:
    """A 1-row image of the given mode built from raw values."""
    array = np.array([values], dtype=dtype)
    return Image.frombytes(mode, (len(values), 1), array.tobytes())


def _palette_image(transparency: int | bytes = 1) -> Image.Image:
    """A P image: index 0 red, index 1 green; by default index 1 is fully transparent."""
    image = Image.frombytes("P", (2, 1), bytes([0, 1]))
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.info["transparency"] = transparency
    return image


def _gray(*values: float) -> torch.Tensor:
    """Expected (1, 3, 1, n) tensor of a gray row, from values already in [-1, 1]."""
    return torch.tensor(values, dtype=torch.float32).expand(1, 3, 1, len(values))


def _color(*pixels: tuple[float, float, float]) -> torch.Tensor:
    """Expected (1, 3, 1, n) tensor of a color row, from RGB triples already in [-1, 1]."""
    return torch.tensor(pixels, dtype=torch.float32).T[None, :, None, :]


IMAGE_MODE_CASES = {
    "L": (lambda: _row("L", [0, 255, 51], "u1"), _gray(-1, 1, 51 / 127.5 - 1)),
    "1": (lambda: Image.fromarray(np.array([[False, True]])), _gray(-1, 1)),
    # 16-bit: scaled by 1/65535, not clipped at 255 (1000 would be white if it were).
    "I;16": (lambda: _row("I;16", [65535, 0, 1000], "<u2"), _gray(1, -1, 1000 / 32767.5 - 1)),
    "I;16B": (lambda: _row("I;16B", [65535, 0, 1000], ">u2"), _gray(1, -1, 1000 / 32767.5 - 1)),
    "I": (lambda: _row("I", [65535, 0, 1000, 70000, -5], "<i4"), _gray(1, -1, 1000 / 32767.5 - 1, 1, -1)),
    "F": (lambda: _row("F", [0.0, 255.0, 127.5, 300.0], "<f4"), _gray(-1, 1, 0, 1)),
    # Alpha dropped: the stored colors count, whatever the alpha.
    "LA": (lambda: Image.frombytes("LA", (2, 1), bytes([255, 0, 51, 255])), _gray(1, 51 / 127.5 - 1)),
    "RGBA": (
        lambda: Image.frombytes("RGBA", (1, 1), bytes([255, 0, 51, 0])),
        _color((1, -1, 51 / 127.5 - 1)),
    ),
    "P": (_palette_image, _color((1, -1, -1), (-1, 1, -1))),
    "CMYK": (
        lambda: Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0])),
        _color((1, 1, 1), (-1, 1, 1)),
    ),
}


@pytest.mark.parametrize("mode", IMAGE_MODE_CASES)
def test_image_to_tensor_reads_every_mode(mode: str) -> None:
    make, expected = IMAGE_MODE_CASES[mode]
    image = make()
    assert image.mode == mode
    x = image_to_tensor(image)
    assert x.dtype == torch.float32 and x.shape == expected.shape
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    ends = expected.abs() == 1
    assert torch.equal(x[ends], expected[ends])  # black and white map to exactly -1 and 1


def test_image_to_tensor_8bit_is_the_originals_formula() -> None:
    """``x / 127.5 - 1`` bit for bit, as scripts/gradio/inpainting.py computes it in float32."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    pixels[0, 0], pixels[0, 1] = 0, 255
    x = image_to_tensor(Image.fromarray(pixels))
    expected = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(torch.float32) / 127.5 - 1.0
    assert x.shape == (1, 3, 5, 7)
    assert torch.equal(x, expected)
    assert x[0, :, 0, 0].tolist() == [-1.0] * 3 and x[0, :, 0, 1].tolist() == [1.0] * 3


def test_palette_with_alpha_per_entry_is_read_without_warning() -> None:
    """Transparency as bytes (one alpha per palette entry) makes Pillow warn on a direct P -> RGB / L."""
    image = _palette_image(transparency=bytes([0, 128]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = image_to_tensor(image)
        mask = mask_to_tensor(image)
    torch.testing.assert_close(x, _color((1, -1, -1), (-1, 1, -1)), rtol=0, atol=0)
    assert mask.flatten().tolist() == [0.0, 1.0]


def test_unsupported_mode_names_it() -> None:
    with pytest.raises(ImageError, match="found mode 'La'"):
        image_to_tensor(Image.new("La", (1, 1)))


def _original_mask(image: Image.Image) -> np.ndarray:
    """The original scripts' recipe (scripts/inpaint.py): convert("L"), / 255, binarize at 0.5."""
    mask = np.array(image.convert("L")).astype(np.float32) / 255.0
    return (mask >= 0.5).astype(np.float32)


def test_mask_binarizes_at_exactly_one_half() -> None:
    mask = mask_to_tensor(_row("L", [0, 127, 128, 255], "u1"))
    assert mask.dtype == torch.float32 and mask.shape == (1, 1, 1, 4)
    assert mask.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_mask_16bit_is_scaled_not_clipped() -> None:
    values = [32767, 32768, 65535, 1000, 0]
    expected = [0.0, 1.0, 1.0, 0.0, 0.0]  # 1000 would be 1 if clipped at 255 like convert("L")
    assert mask_to_tensor(_row("I;16", values, "<u2")).flatten().tolist() == expected
    assert mask_to_tensor(_row("I;16B", values, ">u2")).flatten().tolist() == expected
    assert mask_to_tensor(_row("I", values, "<i4")).flatten().tolist() == expected


def test_mask_other_modes() -> None:
    assert mask_to_tensor(_row("F", [127.0, 127.5, 128.0], "<f4")).flatten().tolist() == [0.0, 1.0, 1.0]
    assert mask_to_tensor(Image.fromarray(np.array([[False, True]]))).flatten().tolist() == [0.0, 1.0]
    # Palette: red (luma 76) -> 0, green (luma 150, transparent) -> 1: transparency does not matter.
    assert mask_to_tensor(_palette_image()).flatten().tolist() == [0.0, 1.0]
    # CMYK: no ink is white -> 1; full cyan is RGB (0, 255, 255), luma 179 -> 1; full black -> 0.
    cmyk = Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255]))
    assert mask_to_tensor(cmyk).flatten().tolist() == [1.0, 1.0, 0.0]


def test_mask_alpha_is_ignored() -> None:
    """RGBA / LA masks: the luminance of the color channels decides, never the alpha."""
    rgba = Image.frombytes("RGBA", (2, 1), bytes([255, 255, 255, 0, 0, 0, 0, 255]))
    assert mask_to_tensor(rgba).flatten().tolist() == [1.0, 0.0]
    la = Image.frombytes("LA", (2, 1), bytes([255, 0, 0, 255]))
    assert mask_to_tensor(la).flatten().tolist() == [1.0, 0.0]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P"])
def test_mask_matches_the_original_recipe_on_8bit_masks(mode: str) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(16, 16, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    mask = mask_to_tensor(image)
    expected = _original_mask(image)
    assert mask.shape == (1, 1, 16, 16)
    assert torch.equal(mask[0, 0], torch.from_numpy(expected))
    assert 0 < mask.mean() < 1


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    stored = Image.new("RGB", (3, 2))
    stored.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "rotated.png", exif=exif)
    image = load_image(tmp_path / "rotated.png")
    assert image.size == (2, 3)
    assert image.getpixel((1, 0)) == (255, 0, 0)  # stored top-left -> displayed top-right
    assert image.getpixel((0, 0)) == (0, 0, 0)


def test_load_image_reads_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (4, 4), 200).save(path)
    image = load_image(str(path))
    path.write_bytes(b"overwritten")  # a lazily read image would now fail or change
    assert image.mode == "L" and image.size == (4, 4)
    assert np.asarray(image).tolist() == [[200] * 4] * 4


def test_load_image_errors(tmp_path: Path) -> None:
    assert issubclass(ImageError, LdmInpaintError)
    with pytest.raises(ImageError, match="expected an image file, found nothing at .*missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="expected an image file, found a folder"):
        load_image(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="cannot identify as an image: .*notes.png"):
        load_image(text)
    noise = np.random.default_rng(2).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    whole = tmp_path / "whole.png"
    Image.fromarray(noise).save(whole)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ImageError, match="damaged or truncated one: .*truncated.png"):
        load_image(truncated)


def test_resize_mask_is_nearest_and_takes_width_height() -> None:
    mask = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8))
    resized = resize_mask(mask, (4, 2))
    assert resized.size == (4, 2) and resized.mode == "L"
    assert np.asarray(resized).tolist() == [[0, 0, 255, 255], [255, 255, 0, 0]]


def test_check_same_size() -> None:
    check_same_size(Image.new("RGB", (64, 32)), Image.new("L", (64, 32)))
    with pytest.raises(ImageError, match=r"image's size 64x32 .* found 32x64; pass --resize-mask"):
        check_same_size(Image.new("RGB", (64, 32)), Image.new("L", (32, 64)))


def test_pad_to_multiple_replicates_edges_and_crop_undoes_it() -> None:
    x = torch.arange(2 * 2 * 5 * 7, dtype=torch.float32).reshape(2, 2, 5, 7)
    padded, size = pad_to_multiple(x, 8)
    assert size == (5, 7) and padded.shape == (2, 2, 8, 8)
    assert torch.equal(padded[..., :5, :7], x)
    assert torch.equal(padded[..., 5:, :7], x[..., 4:5, :].expand(2, 2, 3, 7))  # last row repeated
    assert torch.equal(padded[..., :, 7:], padded[..., :, 6:7])  # last column repeated (corner too)
    assert padded[0, 0, 7, 7] == x[0, 0, 4, 6]
    assert torch.equal(crop(padded, size), x)
    unchanged, size = pad_to_multiple(padded, 8)
    assert size == (8, 8) and torch.equal(unchanged, padded)
    with pytest.raises(ValueError, match=r"\(b, c, H, W\) tensor, found shape \(5, 7\)"):
        pad_to_multiple(x[0, 0])


def test_tensor_to_pil_round_trips_every_8bit_value() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    pixels = np.stack([values, values.T, 255 - values], axis=2)
    x = image_to_tensor(Image.fromarray(pixels))
    (image,) = tensor_to_pil(x)
    assert image.mode == "RGB" and image.size == (16, 16)
    assert np.array_equal(np.asarray(image), pixels)


def test_tensor_to_pil_clamps_and_rounds_to_nearest() -> None:
    levels = torch.tensor([0.0, 0.0, 10.4, 10.6, 127.5, 127.49]) / 127.5 - 1  # given as (x + 1) * 127.5
    levels[:2] = torch.tensor([-3.0, 3.0])  # out of range: clamped
    images = tensor_to_pil(levels.expand(2, 3, 1, 6))
    assert len(images) == 2
    assert np.asarray(images[1])[0, :, 0].tolist() == [0, 255, 10, 11, 128, 127]  # 10.6 -> 11, not 10
    with pytest.raises(ValueError, match=r"\(b, 3, H, W\) tensor, found shape \(1, 4, 2, 2\)"):
        tensor_to_pil(torch.zeros(1, 4, 2, 2))


def test_save_png_numbers_past_existing_files(tmp_path: Path) -> None:
    outdir = tmp_path / "out" / "nested"
    image = Image.new("RGB", (2, 2), (1, 2, 3))
    first = save_png(image, outdir, "sample", {})
    assert first == outdir / "sample-00000.png"
    (outdir / "sample-00002.png").write_bytes(b"kept")  # a gap: count 2 lands on a taken number
    (outdir / "other-00000.png").write_bytes(b"other stem")
    (outdir / "sample-notes.png").write_bytes(b"not numbered")
    path = save_png(image, outdir, "sample", {})
    assert path == outdir / "sample-00003.png"
    assert (outdir / "sample-00002.png").read_bytes() == b"kept"
    assert np.asarray(load_image(path)).tolist() == [[[1, 2, 3]] * 2] * 2
    assert save_png(image, outdir, "other", {}) == outdir / "other-00001.png"


def test_save_png_never_overwrites_a_file_created_after_listing(tmp_path: Path, monkeypatch) -> None:
    """Another process writes the counted number between our listing and our writing."""
    count_existing = image_io._count_existing

    def count_then_race(outdir: Path, stem: str) -> int:
        number = count_existing(outdir, stem)
        (outdir / f"{stem}-{number:05d}.png").write_bytes(b"the other process")
        return number

    monkeypatch.setattr(image_io, "_count_existing", count_then_race)
    path = save_png(Image.new("RGB", (2, 2)), tmp_path, "sample", {"seed": "1"})
    assert path == tmp_path / "sample-00001.png"
    assert (tmp_path / "sample-00000.png").read_bytes() == b"the other process"
    assert read_png_metadata(path) == {"seed": "1"}


def test_png_metadata_round_trip(tmp_path: Path) -> None:
    metadata = {"prompt": 'a café ☕ by the sea, "quoted"\nsecond line', "seed": "42", "steps": "50"}
    path = save_png(Image.new("RGB", (2, 2)), tmp_path, "sample", metadata)
    assert read_png_metadata(path) == metadata
    with pytest.raises(ValueError, match="1 to 79 characters, found 80"):
        save_png(Image.new("RGB", (2, 2)), tmp_path, "sample", {"k" * 80: "v"})
    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (2, 2)).save(jpeg)
    with pytest.raises(ImageError, match="expected a PNG file, found a JPEG file"):
        read_png_metadata(jpeg)


def test_save_png_leaves_no_partial_file_when_writing_fails(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"cannot write .*sample-00000.png: cannot write mode CMYK as PNG"):
        save_png(Image.new("CMYK", (2, 2)), tmp_path, "sample", {})
    assert list(tmp_path.iterdir()) == []


def test_save_npy_beside_png_and_never_overwrites(tmp_path: Path) -> None:
    latent = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(0)).half()
    png = save_png(Image.new("RGB", (2, 2)), tmp_path, "sample", {})
    npy = save_npy(latent, png)
    assert npy == tmp_path / "sample-00000.npy"
    saved = np.load(npy)
    assert saved.dtype == np.float32 and np.array_equal(saved, latent.float().numpy())
    with pytest.raises(ImageError, match="found one; not overwriting it"):
        save_npy(np.zeros(3), png)
    assert np.array_equal(np.load(npy), saved)
    # A latent left from an earlier run keeps its number: the next PNG skips past it.
    (tmp_path / "sample-00001.npy").write_bytes(b"stale latent")
    assert save_png(Image.new("RGB", (2, 2)), tmp_path, "sample", {}) == tmp_path / "sample-00002.png"
    assert (tmp_path / "sample-00001.npy").read_bytes() == b"stale latent"


def _touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (2, 2)).save(path)
    return path


def test_find_pairs_in_a_folder(tmp_path: Path) -> None:
    for name in ["b.jpg", "b_mask.png", "a.png", "a_mask.png", "orphan.webp", "lonely_mask.png"]:
        _touch_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    pairs, problems = find_pairs(tmp_path)
    assert pairs == [
        (tmp_path / "a.png", tmp_path / "a_mask.png"),
        (tmp_path / "b.jpg", tmp_path / "b_mask.png"),
    ]
    assert problems == [
        f"{tmp_path / 'lonely_mask.png'}: no image found (expected lonely.<ext> beside it)",
        f"{tmp_path / 'orphan.webp'}: no mask found (expected orphan_mask.<ext> beside it)",
    ]
    _touch_image(tmp_path / "a_mask.jpg")
    pairs, problems = find_pairs(tmp_path)
    assert pairs == [(tmp_path / "b.jpg", tmp_path / "b_mask.png")]
    assert (
        f"{tmp_path}: expected one image and one mask named 'a', found a.png, a_mask.jpg, a_mask.png"
        in problems
    )


def test_find_pairs_in_a_list_file(tmp_path: Path) -> None:
    image = _touch_image(tmp_path / "data" / "cat.png")
    mask = _touch_image(tmp_path / "data" / "cat_mask.png")
    spaced = _touch_image(tmp_path / "data" / "my dog.png")
    absolute = _touch_image(tmp_path / "elsewhere" / "m.png")
    list_file = tmp_path / "data" / "batch.txt"
    list_file.write_text(
        "# image mask\n"
        "\n"
        "cat.png   cat_mask.png\n"
        f"my dog.png\t{absolute}\n"
        "   # indented comment\n"
        "cat.png cat_mask.png extra\n"
        "missing.png cat_mask.png\n"
        "cat_mask.png\tcat.png\n"
    )
    pairs, problems = find_pairs(list_file)
    assert pairs == [(image, mask), (spaced, absolute), (mask, image)]
    assert problems == [
        f"{list_file} line 6: expected 'image_path mask_path', found 3 fields: 'cat.png cat_mask.png extra'",
        f"{list_file} line 7: expected existing files, found none at {tmp_path / 'data' / 'missing.png'}",
    ]


def test_find_pairs_empty_and_missing_sources(tmp_path: Path) -> None:
    assert find_pairs(tmp_path) == (
        [],
        [
            f"{tmp_path}: no image files found (expected X.png with X_mask.png, "
            "or other extensions: .png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff)"
        ],
    )
    comments = tmp_path / "list.txt"
    comments.write_text("# nothing yet\n")
    assert find_pairs(comments) == (
        [],
        [f"{comments}: expected at least one 'image_path mask_path' line, found none"],
    )
    with pytest.raises(ImageError, match="found nothing at .*nowhere"):
        find_pairs(tmp_path / "nowhere")
    binary = tmp_path / "image.png"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ImageError, match="UTF-8 text file listing 'image_path mask_path' pairs"):
        find_pairs(binary)
