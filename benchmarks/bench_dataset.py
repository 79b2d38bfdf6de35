"""Dataset throughput: scanning (headers and captions) + bucketing + one epoch of batch ordering, in images/s.

    python benchmarks/bench_dataset.py --num_images 100000

Writes N PNG files of varied sizes and aspect ratios (and a caption for each) into a temporary folder, then times
kiln's dataset build exactly as a trainer runs it. Target: >= 5,000 images/s at N = 100,000 on a 2-core machine.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

from library import config_util  # noqa: E402
from library.datasets import DatasetGroup, build_datasets  # noqa: E402


def make_images(folder: str, n: int, seed: int = 0) -> None:
    """N images of 40 different sizes (aspect ratios 1:3 to 3:1, 256 to 2048 px), each with a caption file."""
    rng = random.Random(seed)
    sizes = [(rng.randrange(256, 2048), rng.randrange(256, 2048)) for _ in range(40)]
    sizes = [(w, max(h, w // 3, 1)) if w > h else (max(w, h // 3, 1), h) for w, h in sizes]
    encoded = []
    for w, h in sizes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (rng.randrange(256), 90, 160)).save(buf, "PNG", compress_level=1)
        encoded.append(buf.getvalue())
    for i in range(n):
        stem = os.path.join(folder, f"img_{i:07d}")
        with open(stem + ".png", "wb") as f:
            f.write(encoded[i % len(encoded)])
        with open(stem + ".txt", "w") as f:
            f.write(f"a photo, tag{i % 97}, tag{i % 13}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=100_000)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    root = tempfile.mkdtemp(prefix="kiln_bench_")
    folder = os.path.join(root, "1_bench")
    os.makedirs(folder)
    try:
        t0 = time.perf_counter()
        make_images(folder, args.num_images)
        print(f"made {args.num_images} images in {time.perf_counter() - t0:.1f} s (not timed below)")

        config = {
            "general": {"resolution": args.resolution, "enable_bucket": True, "caption_extension": ".txt", "batch_size": 4},
            "datasets": [{"subsets": [{"image_dir": folder, "num_repeats": 2}]}],
        }
        t0 = time.perf_counter()
        schema = config_util.build_schema()
        configs = config_util.resolve(config_util.validate_user_config(config, schema))
        datasets = build_datasets(configs, seed=0)
        t_scan = time.perf_counter() - t0
        t1 = time.perf_counter()
        batches = DatasetGroup(datasets, seed=0).epoch_batches(1)
        t_order = time.perf_counter() - t1
        total = time.perf_counter() - t0

        n = len(datasets[0].train)
        assert n == args.num_images, f"scanned {n} of {args.num_images} images"
        print(f"scan + bucketing: {t_scan:.2f} s; one epoch of batch order ({len(batches)} batches): {t_order:.2f} s")
        print(f"buckets used: {len(datasets[0].bucket_images())}")
        print(f"{n / total:,.0f} images/s over {n} images ({total:.2f} s)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
