"""Aspect-ratio buckets (reference §3.1): the bucket set, the assignment of images to buckets, bucket_no_upscale,
no bucketing, and min/max_bucket_reso adjustment.

The oracles below are written from the reference's formula text, independently of library/bucketing.py.
"""

from __future__ import annotations

import itertools
import math

import pytest

from library.bucketing import BucketChoice, BucketSelector, adjust_min_max_bucket_reso, make_bucket_resolutions

# ---------------------------------------------------------------------------------------------------------------------
# Oracles


def oracle_buckets(resolution, min_size, max_size, step):
    """Bucket set per reference §3.1: square side floor(sqrt(area)/step)*step, and for width = min..max step `step`:
    height = min(max, floor(area/width/step)*step); add (w,h) and (h,w) if height >= min."""
    area = resolution[0] * resolution[1]
    out = set()
    side = math.floor(math.sqrt(area) / step) * step
    out.add((side, side))
    for width in range(min_size, max_size + 1, step):
        height = min(max_size, math.floor(area / width / step) * step)
        if height >= min_size:
            out.add((width, height))
            out.add((height, width))
    return sorted(out)


def oracle_select(buckets, width, height):
    """Exact size if present, else the first bucket (in sorted order) with minimal |AR error|."""
    if (width, height) in buckets:
        return (width, height)
    aspect = width / height
    return min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))


def round_half_up(x):
    return int(x + 0.5)


def oracle_no_upscale(width, height, resolution, step):
    """bucket_no_upscale per reference §3.1 (sd-scripts' BucketManager.select_bucket, no_upscale branch)."""
    max_area = resolution[0] * resolution[1]
    aspect = width / height

    def round_to_steps(x):
        x = round_half_up(x)
        return x - x % step

    if width * height > max_area:
        rw = math.sqrt(max_area * aspect)
        rh = max_area / rw
        wr = round_to_steps(rw)
        ar_w = wr / round_to_steps(wr / aspect)
        hr = round_to_steps(rh)
        ar_h = round_to_steps(hr * aspect) / hr
        if abs(ar_w - aspect) < abs(ar_h - aspect):
            resized = (wr, round_half_up(wr / aspect))
        else:
            resized = (round_half_up(hr * aspect), hr)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    return bucket, resized


def as_pair(res):
    return (res, res) if isinstance(res, int) else tuple(res)


RESOLUTIONS = [512, 768, 1024, (768, 512), (1024, 768)]
MINS = [256, 320, 512]
MAXES = [1024, 1536, 2048]
STEPS = [32, 64]
GRID = list(itertools.product(RESOLUTIONS, MINS, MAXES, STEPS))

# fmt: off
IMAGE_SIZES = [
    # square
    (512, 512), (1024, 1024), (300, 300), (2000, 2000),
    # landscape
    (640, 384), (1280, 768), (1920, 1080), (800, 600), (1000, 333), (4000, 1000), (6000, 4000), (3072, 3000),
    # portrait
    (384, 640), (1080, 1920), (600, 800), (333, 1000), (1000, 4000), (2000, 2001),
    # tiny
    (1, 1), (8, 13), (1, 1000), (1000, 1), (17, 5),
    # huge
    (10000, 10000), (100000, 50), (50, 100000), (16384, 9000),
]
# fmt: on


def assert_covers(choice: BucketChoice, width, height):
    """resized_size covers the bucket with one side equal, and is the image scaled by one factor (rounded)."""
    bw, bh = choice.bucket
    rw, rh = choice.resized_size
    assert rw >= bw and rh >= bh, (choice, width, height)
    assert rw == bw or rh == bh, (choice, width, height)
    scale = max(bw / width, bh / height)
    assert abs(rw - width * scale) <= 0.5 + 1e-9, (choice, width, height)
    assert abs(rh - height * scale) <= 0.5 + 1e-9, (choice, width, height)


# ---------------------------------------------------------------------------------------------------------------------
# 1. The bucket set


@pytest.mark.parametrize("res,min_size,max_size,step", GRID)
def test_bucket_set_matches_reference_formula(res, min_size, max_size, step):
    resolution = as_pair(res)
    got = make_bucket_resolutions(resolution, min_size, max_size, step)
    assert got == oracle_buckets(resolution, min_size, max_size, step)
    # general properties of the set
    assert got == sorted(set(got))
    area = resolution[0] * resolution[1]
    for w, h in got:
        assert w % step == 0 and h % step == 0
        assert (h, w) in got  # symmetric
        assert w * h <= area
        if (w, h) != (w, w):
            assert min_size <= w <= max_size and min_size <= h <= max_size


def test_bucket_set_hand_computed_512():
    # area 262144, step 64, sides 256..1024; height(w) = min(1024, floor(262144/w/64)*64):
    # 256->1024, 320->768, 384->640, 448->576, 512->512, 576->448, 640->384, 704->320, 768->320, 832..1024->256
    # fmt: off
    expected = [
        (256, 832), (256, 896), (256, 960), (256, 1024),
        (320, 704), (320, 768),
        (384, 640),
        (448, 576),
        (512, 512),
        (576, 448),
        (640, 384),
        (704, 320), (768, 320),
        (832, 256), (896, 256), (960, 256), (1024, 256),
    ]
    # fmt: on
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == expected


def test_bucket_set_hand_computed_defaults_and_spot_values():
    got = make_bucket_resolutions((1024, 1024))  # defaults 256..1024 step 64: every (w, 1024), (1024, w)
    assert got == sorted({(w, 1024) for w in range(256, 1025, 64)} | {(1024, w) for w in range(256, 1025, 64)})
    # 768x512 (area 393216), step 64: square side floor(627.06/64)*64 = 576
    got = make_bucket_resolutions((768, 512), 256, 1024, 64)
    assert (576, 576) in got
    assert (768, 512) in got and (512, 768) in got  # 393216/768/64 = 8 -> 512
    assert (640, 576) in got  # 393216/640/64 = 9.6 -> 576
    assert (1024, 384) in got  # 393216/1024/64 = 6 -> 384
    assert (640, 640) not in got


def test_bucket_set_square_side_is_floored():
    # area 1000*1000: sqrt = 1000, floor(1000/64)*64 = 960
    got = make_bucket_resolutions((1000, 1000), 960, 960, 64)
    assert got == [(960, 960)]


def test_bucket_set_height_clamped_to_max():
    # resolution 1024 with max 2048: width 256 -> floor(4096/64)*64 = 4096, clamped to 2048
    got = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert (256, 2048) in got and (2048, 256) in got
    assert all(max(b) <= 2048 for b in got)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Assignment with bucketing (upscaling allowed)


@pytest.mark.parametrize("res,min_size,max_size,step", GRID)
def test_assignment_matches_oracle_and_covers(res, min_size, max_size, step):
    resolution = as_pair(res)
    sel = BucketSelector(resolution, True, False, min_size, max_size, step)
    buckets = oracle_buckets(resolution, min_size, max_size, step)
    for width, height in IMAGE_SIZES + buckets:
        choice = sel.select(width, height)
        assert choice.bucket == oracle_select(buckets, width, height), (width, height)
        assert choice.ar_error == pytest.approx(choice.bucket[0] / choice.bucket[1] - width / height)
        assert_covers(choice, width, height)


def test_exact_size_match_wins():
    sel = BucketSelector((512, 512), True)
    for b in make_bucket_resolutions((512, 512), 256, 1024, 64):
        choice = sel.select(*b)
        assert choice == BucketChoice(b, b, 0.0)


def test_min_ar_error_hand_examples():
    sel = BucketSelector((512, 512), True)  # buckets listed in test_bucket_set_hand_computed_512
    # 1280x768 has the AR of (640, 384) exactly: downscaled into it
    c = sel.select(1280, 768)
    assert c.bucket == (640, 384) and c.resized_size == (640, 384) and c.ar_error == pytest.approx(0.0)
    # 1920x1080 (AR 1.778): candidates 640x384 (1.667), 704x320 (2.2) -> 640x384; wider than the bucket -> match height
    c = sel.select(1920, 1080)
    assert c.bucket == (640, 384)
    assert c.resized_size == (683, 384)  # 1920*384/1080 = 682.67
    assert c.ar_error == pytest.approx(640 / 384 - 1920 / 1080)
    # portrait 1080x1920 -> 384x640; narrower than the bucket -> match width
    c = sel.select(1080, 1920)
    assert c.bucket == (384, 640)
    assert c.resized_size == (384, 683)
    assert c.ar_error == pytest.approx(384 / 640 - 1080 / 1920)
    # square, any size -> 512x512
    for s in (1, 100, 512, 5000):
        c = sel.select(s, s)
        assert c.bucket == (512, 512) and c.resized_size == (512, 512) and c.ar_error == 0.0
    # 800x600 (1.333): 576x448 (1.286) vs 640x384 (1.667) -> 576x448, scaled by width: 600*576/800 = 432 < 448,
    # so by height: 800*448/600 = 597.33
    c = sel.select(800, 600)
    assert c.bucket == (576, 448)
    assert c.resized_size == (597, 448)


def test_ar_error_sign():
    sel = BucketSelector((512, 512), True)
    c = sel.select(800, 600)  # bucket 576x448 is narrower than the image
    assert c.ar_error < 0
    c = sel.select(600, 800)  # bucket 448x576 is wider (relative) than the image
    assert c.ar_error == pytest.approx(448 / 576 - 600 / 800)
    assert c.ar_error > 0


def test_tiny_and_huge_images():
    sel = BucketSelector((512, 512), True)
    # extreme aspect ratios go to the extreme buckets
    c = sel.select(1, 1000)
    assert c.bucket == (256, 1024)
    assert c.resized_size == (256, 256000)
    c = sel.select(1000, 1)
    assert c.bucket == (1024, 256)
    assert c.resized_size == (256000, 256)
    c = sel.select(100000, 50)
    assert c.bucket == (1024, 256)
    assert c.resized_size == (512000, 256)
    c = sel.select(8, 8)  # upscaled 64x
    assert c.bucket == (512, 512) and c.resized_size == (512, 512)
    c = sel.select(10000, 10000)
    assert c.bucket == (512, 512) and c.resized_size == (512, 512)


# ---------------------------------------------------------------------------------------------------------------------
# 3. bucket_no_upscale


# fmt: off
NO_UPSCALE_SIZES = [
    (64, 64), (100, 70), (500, 300), (512, 512), (640, 480), (1000, 1000), (1024, 1024), (1025, 1024), (1024, 1025),
    (2048, 1024), (1024, 2048), (3072, 3000), (3000, 3072), (1920, 1080), (1080, 1920), (4000, 3000), (6000, 1000),
    (1000, 6000), (12345, 6789), (20000, 600), (600, 20000), (4096, 64),
]
# fmt: on


@pytest.mark.parametrize("res", [512, 1024, (1024, 768)])
@pytest.mark.parametrize("step", [32, 64])
def test_no_upscale_matches_oracle_and_properties(res, step):
    resolution = as_pair(res)
    max_area = resolution[0] * resolution[1]
    sel = BucketSelector(resolution, True, True, 256, 1024, step)
    for width, height in NO_UPSCALE_SIZES:
        choice = sel.select(width, height)
        bucket, resized = oracle_no_upscale(width, height, resolution, step)
        assert choice.bucket == bucket, (width, height)
        assert choice.resized_size == resized, (width, height)
        assert choice.ar_error == pytest.approx(bucket[0] / bucket[1] - width / height)
        rw, rh = choice.resized_size
        bw, bh = choice.bucket
        # never padded: the bucket fits in the resized image and is the resized size floored to the step
        assert bw % step == 0 and bh % step == 0
        assert 0 <= rw - bw < step and 0 <= rh - bh < step
        # never enlarged
        assert rw <= width and rh <= height
        if width * height <= max_area:
            assert (rw, rh) == (width, height)
        else:
            # shrunk to about the max area, keeping the aspect ratio, one side on the step grid
            assert rw * rh <= max_area * 1.01
            assert rw % step == 0 or rh % step == 0
            assert rw / rh == pytest.approx(width / height, rel=0.5 / min(rw, rh) * 2 + 1e-9)
            # the snapped side lost less than one step
            assert rw * rh >= max_area * (1 - (step + 1) / min(rw, rh)) ** 2


def test_no_upscale_small_image_keeps_size_floored():
    sel = BucketSelector((1024, 1024), True, True)
    c = sel.select(500, 300)
    assert c.resized_size == (500, 300)
    assert c.bucket == (448, 256)
    assert c.ar_error == pytest.approx(448 / 256 - 500 / 300)
    c = sel.select(1000, 1000)  # below the area: no bucket of 1024 (that would upscale)
    assert c.bucket == (960, 960) and c.resized_size == (1000, 1000)


def test_no_upscale_hand_computed_3072x3000():
    # aspect 1.024; exact resize to area 1024^2: 1036.19 x 1011.91.
    # width snapped: round(1036.19)=1036 -> 1024; 1024/1.024 = 1000 -> 960; AR 1.0667 (err 0.0427)
    # height snapped: round(1011.91)=1012 -> 960; 960*1.024 = 983.04 -> 960; AR 1.0 (err 0.024) -> wins
    # resized = (round(960*1.024), 960) = (983, 960); bucket = floor to 64 = (960, 960).
    # (This is the known weakness #2352: 1024x1024 would fit; kiln follows sd-scripts.)
    sel = BucketSelector((1024, 1024), True, True, 256, 1024, 64)
    c = sel.select(3072, 3000)
    assert c.resized_size == (983, 960)
    assert c.bucket == (960, 960)
    assert c.ar_error == pytest.approx(1.0 - 1.024)


def test_no_upscale_hand_computed_2048x1024():
    # aspect 2: exact 1448.15 x 724.08; width 1448 -> 1408, 1408/2 = 704 (AR 2.0); height 724 -> 704, 1408 (AR 2.0);
    # tie -> the height-snapped branch: (1408, 704), already on the grid.
    sel = BucketSelector((1024, 1024), True, True)
    c = sel.select(2048, 1024)
    assert c.resized_size == (1408, 704) and c.bucket == (1408, 704)
    assert c.ar_error == pytest.approx(0.0)


def test_no_upscale_ignores_min_max_bucket_reso():
    # min/max_bucket_reso would be invalid for this resolution, but no_upscale ignores them
    sel = BucketSelector((512, 512), True, True, min_reso=600, max_reso=256)
    assert sel.select(2000, 500).bucket[0] > 600  # beyond max 256 and the 1024 default too


@pytest.mark.parametrize("size", [(50, 50), (63, 1000), (1000, 63), (1, 1), (2000, 50)])
def test_no_upscale_image_smaller_than_step_raises(size):
    sel = BucketSelector((1024, 1024), True, True, 256, 1024, 64)
    with pytest.raises(ValueError):
        sel.select(*size)


def test_no_upscale_huge_elongated_image_raises_value_error():
    # 20000x70 (area 1.4M > 1024^2): shrinking to the area gives ~60.6 px of height, which snaps to 0
    sel = BucketSelector((1024, 1024), True, True, 256, 1024, 64)
    with pytest.raises(ValueError):
        sel.select(20000, 70)


def test_no_upscale_very_wide_image_with_valid_bucket_portrait_twin():
    # Control: the portrait 100x25920 (aspect 1/259.2) gets a valid bucket: width snaps round(63.6)=64,
    # height round(64*259.2) = 16589 -> bucket (64, 16576).
    sel = BucketSelector((1024, 1024), True, True, 256, 1024, 64)
    c = sel.select(100, 25920)
    assert c.resized_size == (64, 16589) and c.bucket == (64, 16576)


def test_no_upscale_very_wide_image_gets_height_snapped_bucket():
    # exact resize: 16486.6 x 63.60. Height snapped: round(63.60)=64 -> 64, width round(64*259.2)=16589.
    # Width snapped: 16486.6 -> 16448, 16448/259.2 = 63.46 -> 63 -> 0: that candidate is unusable, not fatal.
    sel = BucketSelector((1024, 1024), True, True, 256, 1024, 64)
    c = sel.select(25920, 100)
    assert c.resized_size == (16589, 64) and c.bucket == (16576, 64)


# ---------------------------------------------------------------------------------------------------------------------
# 4. No bucketing


@pytest.mark.parametrize("res", [512, (768, 512), (512, 768)])
@pytest.mark.parametrize("no_upscale", [False, True])
def test_no_bucketing_single_bucket_and_cover(res, no_upscale):
    resolution = as_pair(res)
    # min/max_bucket_reso are not used (these would be invalid with bucketing)
    sel = BucketSelector(resolution, False, no_upscale, min_reso=2000, max_reso=100)
    for width, height in IMAGE_SIZES:
        c = sel.select(width, height)
        assert c.bucket == resolution
        assert c.ar_error == pytest.approx(resolution[0] / resolution[1] - width / height)
        assert_covers(c, width, height)


def test_no_bucketing_hand_examples():
    sel = BucketSelector((512, 512), False)
    assert sel.select(512, 512) == BucketChoice((512, 512), (512, 512), 0.0)
    c = sel.select(1024, 768)  # wider: height matched
    assert c.bucket == (512, 512) and c.resized_size == (683, 512)
    c = sel.select(300, 600)  # taller: width matched, upscaled
    assert c.bucket == (512, 512) and c.resized_size == (512, 1024)


# ---------------------------------------------------------------------------------------------------------------------
# 5. adjust_min_max_bucket_reso


@pytest.mark.parametrize(
    "resolution,mn,mx,steps,expected",
    [
        ((512, 512), 256, 1024, 64, (256, 1024)),
        ((512, 512), 300, 1000, 64, (256, 1024)),  # min down, max up
        ((512, 512), 319, 1025, 64, (256, 1088)),
        ((1024, 768), 320, 1100, 32, (320, 1120)),
        ((1024, 768), 330, 1030, 32, (320, 1056)),
        ((512, 512), 530, 1024, 64, (512, 1024)),  # rounding down makes it valid
        ((1024, 1024), 256, 1000, 64, (256, 1024)),  # rounding up makes it valid
        ((768, 512), 512, 768, 64, (512, 768)),  # boundaries are inclusive
    ],
)
def test_adjust_min_max_rounding(resolution, mn, mx, steps, expected):
    assert adjust_min_max_bucket_reso(resolution, mn, mx, steps) == expected


@pytest.mark.parametrize(
    "resolution,mn,mx,steps",
    [
        ((512, 512), 576, 1024, 64),  # min above the resolution
        ((768, 512), 576, 1024, 64),  # min above the smaller side
        ((1024, 1024), 256, 900, 64),  # 900 -> 960 < 1024
        ((1024, 768), 256, 960, 64),  # max below the larger side
    ],
)
def test_adjust_min_max_errors(resolution, mn, mx, steps):
    with pytest.raises(ValueError):
        adjust_min_max_bucket_reso(resolution, mn, mx, steps)


def test_selector_with_bucketing_validates_min_max():
    with pytest.raises(ValueError):
        BucketSelector((512, 512), True, False, min_reso=576, max_reso=1024, steps=64)
    # rounded values are used for the bucket set
    sel = BucketSelector((512, 512), True, False, min_reso=300, max_reso=1000, steps=64)
    assert sel.predefined == make_bucket_resolutions((512, 512), 256, 1024, 64)
