"""Check a dataset without any model: buckets, image and caption counts, validation split, and every problem found.

    python tools/check_dataset.py --dataset_config data.toml [--json]
    python tools/check_dataset.py --train_data_dir train --reg_data_dir reg --resolution 512 --enable_bucket

Exit status: 0 when no problem is an error, 1 otherwise, 2 for a configuration that cannot be used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library import config_util  # noqa: E402
from library.args import add_dataset_arguments  # noqa: E402
from library.datasets import Dataset, Problem, build_datasets, decode_problems, image_paths  # noqa: E402


def report(datasets: list[Dataset], problems: list[Problem]) -> dict:
    """The JSON report (see the module docstring of the issue's format)."""
    out = []
    for ds in datasets:
        cfg = ds.config
        subsets = []
        for subset, stats in zip(cfg.subsets, ds.subset_stats):
            entry = {
                "image_dir": subset.image_dir,
                "images": stats.images,
                "num_repeats": subset.num_repeats,
                "is_reg": subset.is_reg,
                "with_caption": stats.with_caption,
                "validation_images": stats.validation,
            }
            if subset.metadata_file:
                entry["metadata_file"] = subset.metadata_file
            if subset.conditioning_data_dir:
                entry["conditioning_data_dir"] = subset.conditioning_data_dir
            subsets.append(entry)
        out.append(
            {
                "type": cfg.kind,
                "resolution": list(cfg.resolution),
                "batch_size": cfg.batch_size,
                "enable_bucket": cfg.enable_bucket,
                "buckets": [{"resolution": list(r), "images": n} for r, n in ds.bucket_images().items()],
                "mean_ar_error": ds.bucket_info()["mean_img_ar_error"],
                "subsets": subsets,
                "train_samples_per_epoch": ds.num_train_images,
                "reg_samples_per_epoch": ds.num_reg_images,
                "batches_per_epoch": ds.num_batches(),
                "validation_images": len(ds.validation),
            }
        )
    return {"datasets": out, "problems": [vars(p) for p in problems]}


def print_text(rep: dict) -> None:
    for n, ds in enumerate(rep["datasets"]):
        w, h = ds["resolution"]
        print(
            f"dataset {n} ({ds['type']}): resolution {w}x{h}, batch size {ds['batch_size']}, "
            f"{ds['batches_per_epoch']} batches per epoch, {ds['validation_images']} validation images"
        )
        for s in ds["subsets"]:
            kind = "regularisation" if s["is_reg"] else "training"
            source = s["image_dir"] or s.get("metadata_file")
            print(
                f"  {kind} subset {source}: {s['images']} images x {s['num_repeats']} repeats, "
                f"{s['with_caption']}/{s['images']} with captions, {s['validation_images']} held out for validation"
            )
        print(f"  buckets (distinct training images), mean aspect-ratio error {ds['mean_ar_error']:.4f}:")
        for b in ds["buckets"]:
            print(f"    {b['resolution'][0]:>5}x{b['resolution'][1]:<5} {b['images']}")
    errors = [p for p in rep["problems"] if p["severity"] == "error"]
    warnings = [p for p in rep["problems"] if p["severity"] != "error"]
    for p in errors + warnings:
        print(f"{p['severity']}: {p['file']}: {p['problem']}")
    print(f"{len(errors)} error(s), {len(warnings)} warning(s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(parser, training=False)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no_decode", action="store_true", help="read image headers only (faster; misses truncated files)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads for decoding images")
    args = parser.parse_args(argv)

    configs = config_util.run_or_exit(config_util.load_dataset_configs, args)
    datasets = build_datasets(configs, args.seed)
    problems = [p for ds in datasets for p in ds.problems]
    if not args.no_decode:
        problems += decode_problems(image_paths(datasets), args.workers)
    rep = report(datasets, problems)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print_text(rep)
    return 1 if any(p.severity == "error" for p in problems) else 0


if __name__ == "__main__":
    sys.exit(main())
