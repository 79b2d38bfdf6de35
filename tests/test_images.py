"""Image reading: formats, modes, EXIF orientation, header-only sizes, resize filters."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_image
from PIL import Image, ImageFile, ImageOps

from library.image_util import ImageReadError, is_image_file, list_images, load_image, read_image_size, resize_image


@pytest.mark.parametrize(
    "name,mode,color,fmt",
    [
        ("rgb.png", "RGB", (10, 20, 30), None),
        ("rgb.jpg", "RGB", (10, 20, 30), None),
        ("rgb.webp", "RGB", (10, 20, 30), None),
        ("rgb.bmp", "RGB", (10, 20, 30), None),
        ("rgb.tiff", "RGB", (10, 20, 30), None),
        ("gray.png", "L", 77, None),
        ("cmyk.jpg", "CMYK", (0, 0, 0, 0), None),
        ("pal.gif", "P", 3, None),
    ],
)
def test_formats_and_modes_decode_to_rgb(tmp_path, name, mode, color, fmt):
    path = write_image(tmp_path / name, (37, 23), color, mode=mode, fmt=fmt)
    assert read_image_size(path) == (37, 23)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (37, 23)
    if mode == "CMYK":  # CMYK 0,0,0,0 is white paper
        assert np.asarray(img).min() >= 250
    if mode == "L":
        assert np.asarray(img)[0, 0].tolist() == [77, 77, 77]


def test_rgba_is_composited_on_white_and_alpha_kept_on_request(tmp_path):
    img = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))  # transparent black
    img.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black
    path = str(tmp_path / "a.png")
    img.save(path)
    rgb = np.asarray(load_image(path))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert abs(int(rgb[0, 1, 0]) - 127) <= 1
    assert rgb[1, 3].tolist() == [255, 0, 0]
    rgba = load_image(path, keep_alpha=True)
    assert rgba.mode == "RGBA"
    assert np.asarray(rgba)[0, :2, 3].tolist() == [0, 128]


def test_la_and_transparent_palette(tmp_path):
    la = Image.new("LA", (3, 3), (100, 0))
    la.save(str(tmp_path / "la.png"))
    assert np.asarray(load_image(str(tmp_path / "la.png")))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(str(tmp_path / "la.png"), keep_alpha=True))[0, 0, 3] == 0

    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(str(tmp_path / "p.png"), transparency=0)
    out = np.asarray(load_image(str(tmp_path / "p.png")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [10, 200, 30]


def test_opaque_image_with_keep_alpha_has_full_alpha(tmp_path):
    path = write_image(tmp_path / "x.jpg", (5, 5))
    assert np.asarray(load_image(path, keep_alpha=True))[..., 3].min() == 255


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    Image.fromarray(arr).save(str(tmp_path / "g16.png"))
    out = np.asarray(load_image(str(tmp_path / "g16.png")))
    assert 126 <= out[0, 0, 0] <= 129


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_exif_orientation_matches_pillow_exif_transpose(tmp_path, orientation, ext):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    for x in range(10):
        img.putpixel((x, 0), (255, 0, 0))  # a red mark along the top-left edge
    img.putpixel((39, 19), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = str(tmp_path / f"o{orientation}{ext}")
    img.save(path, exif=exif.tobytes(), **({"quality": 100} if ext != ".png" else {}))

    expected = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert read_image_size(path) == expected.size
    got = load_image(path)
    assert got.size == expected.size
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(expected, dtype=int)).max() == 0


def test_size_is_read_without_decoding_pixels(tmp_path, monkeypatch):
    paths = [write_image(tmp_path / f"h{ext}", (300, 200)) for ext in (".png", ".jpg", ".webp")]

    def refuse(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    for path in paths:
        assert read_image_size(path) == (300, 200)


def test_unreadable_and_truncated_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image_size(str(bad))
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    full = tmp_path / "full.png"
    noisy.save(str(full))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(full.read_bytes()[:2000])
    assert read_image_size(str(trunc)) == (64, 64)  # the header is intact
    with pytest.raises(ImageReadError, match="trunc.png"):
        load_image(str(trunc))


def test_listing_takes_every_pillow_format_and_skips_others(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.webp", "d.bmp"):
        write_image(tmp_path / name, (8, 8))
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "notes.json").write_text("{}")
    (tmp_path / "sub.png").mkdir()
    assert [p.rsplit("/", 1)[1] for p in list_images(str(tmp_path))] == ["a.jpg", "b.PNG", "c.webp", "d.bmp"]
    assert is_image_file("x.jpeg") and is_image_file("x.TIF") and not is_image_file("x.npz")


def test_resize_default_filters_and_named_filter():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    down = resize_image(img, (16, 16))
    assert np.array_equal(np.asarray(down), np.asarray(img.resize((16, 16), Image.Resampling.BOX)))
    up = resize_image(img, (128, 128))
    assert np.array_equal(np.asarray(up), np.asarray(img.resize((128, 128), Image.Resampling.LANCZOS)))
    near = resize_image(img, (32, 32), "nearest")
    assert np.array_equal(np.asarray(near), np.asarray(img.resize((32, 32), Image.Resampling.NEAREST)))
    assert resize_image(img, (64, 64)) is img
