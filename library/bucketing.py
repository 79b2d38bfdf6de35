"""Aspect-ratio buckets: the bucket set, the image-to-bucket assignment and the crop into a bucket.

The rules are sd-scripts' (reference §3.1), so that a dataset lands in the same buckets as there:
- with bucketing and upscaling allowed, a fixed set of resolutions of about the area of `resolution`;
  an image goes to the bucket of its exact size if there is one, else the nearest aspect ratio, and is scaled to
  cover the bucket, then cropped;
- with `bucket_no_upscale`, every image gets a bucket of its own size (shrunk to the target area if larger),
  floored to multiples of the step: images are cropped, never padded or enlarged;
- without bucketing, one bucket of exactly `resolution`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """Sorted bucket resolutions (w, h) with about the area of max_reso, sides in [min_size, max_size]."""
    max_area = max_reso[0] * max_reso[1]
    resos = set()
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def adjust_min_max_bucket_reso(resolution: tuple[int, int], min_reso: int, max_reso: int, steps: int) -> tuple[int, int]:
    """Round min down and max up to multiples of `steps`; raise ValueError unless they bracket `resolution`."""
    if min_reso % steps:
        min_reso -= min_reso % steps
    if max_reso % steps:
        max_reso += steps - max_reso % steps
    if min(resolution) < min_reso:
        raise ValueError(
            f"min_bucket_reso ({min_reso}) must be at most the smaller side of resolution {resolution[0]}x{resolution[1]}"
        )
    if max(resolution) > max_reso:
        raise ValueError(
            f"max_bucket_reso ({max_reso}) must be at least the larger side of resolution {resolution[0]}x{resolution[1]}"
        )
    return min_reso, max_reso


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: its bucket (w, h), the size it is resized to before cropping, and the AR error."""

    bucket: tuple[int, int]
    resized_size: tuple[int, int]
    ar_error: float


class BucketSelector:
    """Assigns images to buckets by sd-scripts' rules; see the module docstring."""

    def __init__(
        self,
        resolution: tuple[int, int],
        enable_bucket: bool,
        no_upscale: bool = False,
        min_reso: int = 256,
        max_reso: int = 1024,
        steps: int = 64,
    ) -> None:
        self.resolution = tuple(resolution)
        self.max_area = resolution[0] * resolution[1]
        self.enable_bucket = enable_bucket
        self.no_upscale = enable_bucket and no_upscale
        self.steps = steps
        if not enable_bucket:
            self.predefined = [self.resolution]
        elif not no_upscale:
            min_reso, max_reso = adjust_min_max_bucket_reso(resolution, min_reso, max_reso, steps)
            self.predefined = make_bucket_resolutions(resolution, min_reso, max_reso, steps)
        else:
            self.predefined = []
        self._predefined_set = set(self.predefined)
        self._predefined_ar = np.array([w / h for w, h in self.predefined]) if self.predefined else None

    def _round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def select(self, width: int, height: int) -> BucketChoice:
        """The bucket for an image of (width, height)."""
        aspect = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self._predefined_set:
                reso = self.predefined[int(np.abs(self._predefined_ar - aspect).argmin())]
            # scale so the image covers the bucket: match the side that is relatively shorter
            scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            if width * height > self.max_area:
                resized_w = math.sqrt(self.max_area * aspect)
                resized_h = self.max_area / resized_w
                # snap one side to the step grid: the one that keeps the aspect ratio better
                w_rounded = self._round_to_steps(resized_w)
                h_of_w = self._round_to_steps(w_rounded / aspect)
                ar_w = w_rounded / h_of_w if h_of_w else math.inf
                h_rounded = self._round_to_steps(resized_h)
                w_of_h = self._round_to_steps(h_rounded * aspect)
                ar_h = w_of_h / h_rounded if h_rounded else math.inf
                if math.isinf(ar_w) and math.isinf(ar_h):
                    raise ValueError(f"a {width}x{height} image is too narrow for bucket_reso_steps ({self.steps})")
                if abs(ar_w - aspect) < abs(ar_h - aspect):
                    resized = (w_rounded, int(w_rounded / aspect + 0.5))
                else:
                    resized = (int(h_rounded * aspect + 0.5), h_rounded)
            else:
                resized = (width, height)
            reso = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
            if reso[0] == 0 or reso[1] == 0:
                raise ValueError(f"a {width}x{height} image is smaller than bucket_reso_steps ({self.steps})")
        return BucketChoice(reso, resized, reso[0] / reso[1] - aspect)


def crop_offset(resized_size: tuple[int, int], bucket: tuple[int, int], rng=None) -> tuple[int, int]:
    """(left, top) of the bucket-sized window in the resized image: centred, or uniform random when rng is given."""
    slack_x = resized_size[0] - bucket[0]
    slack_y = resized_size[1] - bucket[1]
    if slack_x < 0 or slack_y < 0:
        raise ValueError(f"resized image {resized_size} is smaller than its bucket {bucket}")
    if rng is None:
        return slack_x // 2, slack_y // 2
    return rng.randint(0, slack_x), rng.randint(0, slack_y)
