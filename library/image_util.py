"""Reading images: listing a folder, sizes from file headers, decoding to RGB, resizing.

Everything here works on any format Pillow opens. EXIF orientation is applied both when a size is read from
the header and when pixels are decoded, from the same tag, so the two always agree.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
from PIL import Image

# Pillow refuses huge images by default ("decompression bomb"); training sets do hold large scans.
Image.MAX_IMAGE_PIXELS = None

_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation value -> Pillow transpose that makes the image upright.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

RESIZE_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}


class ImageReadError(Exception):
    """An image file that cannot be opened or decoded; the message names the file.

    A DataLoader worker's error reaches the training process as this class made from the worker's whole traceback
    text; the message is then cut back to the original one line."""

    def __init__(self, message: str = "") -> None:
        if "Original Traceback" in message:
            last = [line for line in message.strip().splitlines() if "ImageReadError: " in line]
            if last:
                message = last[-1].split("ImageReadError: ", 1)[1]
        super().__init__(message)


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with dot) of every format this Pillow can open."""
    Image.init()
    openable = set(Image.OPEN)
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in openable)


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_extensions()


def list_images(directory: str) -> list[str]:
    """Image files directly inside `directory` (not recursive), sorted by name, as full paths."""
    exts = image_extensions()
    with os.scandir(directory) as it:
        names = [e.name for e in it if os.path.splitext(e.name)[1].lower() in exts and e.is_file()]
    names.sort()
    return [os.path.join(directory, n) for n in names]


def _orientation(img: Image.Image) -> int:
    """EXIF orientation read from the header only (never decodes pixels)."""
    try:
        if img.format == "PNG":
            # Pillow's PNG getexif() decodes the whole image when the eXIf chunk is not before IDAT.
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = exif.get(_EXIF_ORIENTATION_TAG, 1)
        return value if value in _ORIENTATION_TRANSPOSE else 1
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return 1


def read_image_size(path: str) -> tuple[int, int]:
    """(width, height) as the image will be decoded (EXIF orientation applied), from the header alone."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if _orientation(img) in (5, 6, 7, 8):
                w, h = h, w
            return w, h
    except Exception as e:
        raise ImageReadError(f"cannot read image header of {path}: {e}") from e


def _to_rgb_or_rgba(img: Image.Image, keep_alpha: bool) -> Image.Image:
    """Convert any Pillow mode to RGB (or RGBA when keep_alpha). Transparency without keep_alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if img.mode == "RGBA" and keep_alpha:
        return img
    if has_alpha or (img.mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        if keep_alpha:
            return rgba
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    if keep_alpha:
        rgb = rgb.convert("RGBA")  # opaque: alpha 255 everywhere
    return rgb


def load_image(path: str, keep_alpha: bool = False) -> Image.Image:
    """Decode an image upright (EXIF applied) as RGB, or RGBA when keep_alpha (alpha 255 if the file has none).

    Raises ImageReadError naming the file for unreadable or truncated files.
    """
    try:
        with Image.open(path) as img:
            orientation = _orientation(img)
            img.load()
            out = _to_rgb_or_rgba(img, keep_alpha)
            if orientation != 1:
                out = out.transpose(_ORIENTATION_TRANSPOSE[orientation])
            if out is img:
                out = img.copy()
            return out
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(f"cannot decode image {path}: {e}; remove the file or re-save it with an image editor") from e


def resize_image(img: Image.Image, size: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    """Resize to size=(w, h). Default filter: area (box) when shrinking, lanczos when enlarging."""
    if img.size == tuple(size):
        return img
    if interpolation is None:
        shrinking = size[0] * size[1] < img.size[0] * img.size[1]
        interpolation = "area" if shrinking else "lanczos"
    return img.resize(tuple(size), RESIZE_FILTERS[interpolation])
