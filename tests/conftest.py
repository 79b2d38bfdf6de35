"""Shared test setup: no hub access, and small helpers that write real image files."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_image(path, size, color=(200, 100, 50), mode="RGB", fmt=None, **save_kwargs):
    """Write a solid image of `size` (w, h) to `path` and return the path."""
    from PIL import Image

    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img = Image.new(mode, size, color)
    img.save(str(path), fmt, **save_kwargs)
    return str(path)


def write_caption(image_path, text, ext=".txt"):
    stem = os.path.splitext(str(image_path))[0]
    with open(stem + ext, "w", encoding="utf-8") as f:
        f.write(text)
    return stem + ext


@pytest.fixture
def repo_root():
    return ROOT
