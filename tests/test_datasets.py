"""Datasets: DreamBooth folders, fine-tuning metadata, ControlNet pairs, regularisation balance, validation split,
cache_info, buckets and the per-epoch batch order."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from conftest import write_caption, write_image

from library import config_util, datasets
from library.datasets import DatasetGroup, balance_regularisation, build_datasets


def build(config: dict, seed: int = 0):
    configs = config_util.resolve(config_util.validate_user_config(config, config_util.build_schema()))
    return build_datasets(configs, seed)


def make_folder(folder, n, size=(512, 512), caption=True, prefix="img"):
    paths = []
    for i in range(n):
        p = write_image(os.path.join(folder, f"{prefix}{i:03d}.png"), size, (i * 7 % 255, 40, 90))
        if caption:
            write_caption(p, f"{prefix} {i}, tag a, tag b")
        paths.append(p)
    return paths


def test_dreambooth_captions_class_tokens_and_first_line(tmp_path):
    d = tmp_path / "imgs"
    p0, p1 = make_folder(d, 2)
    write_caption(p0, "first line\nsecond line")
    os.remove(os.path.splitext(p1)[0] + ".txt")
    (ds,) = build(
        {
            "general": {"resolution": 512, "caption_extension": "txt"},
            "datasets": [{"subsets": [{"image_dir": str(d), "class_tokens": "sks dog"}]}],
        }
    )
    by_path = {i.path: i for i in ds.train}
    assert by_path[p0].caption == "first line"
    assert by_path[p1].caption == "sks dog" and not by_path[p1].has_caption
    assert [p.severity for p in ds.problems] == ["warning"] and "img001.txt" in ds.problems[0].problem


def test_wildcard_keeps_all_lines(tmp_path):
    d = tmp_path / "w"
    (p,) = make_folder(d, 1)
    write_caption(p, "line a\n\nline b\n")
    (ds,) = build(
        {
            "general": {"resolution": 512, "caption_extension": ".txt", "enable_wildcard": True},
            "datasets": [{"subsets": [{"image_dir": str(d)}]}],
        }
    )
    assert ds.train[0].caption == "line a\nline b"


def test_face_suffix_caption_fallback(tmp_path):
    d = tmp_path / "f"
    p = write_image(d / "person_10_20_30_40.png", (512, 512))
    (d / "person.txt").write_text("a person")
    (ds,) = build(
        {
            "general": {"resolution": 512, "caption_extension": ".txt", "face_crop_aug_range": [2.0, 4.0]},
            "datasets": [{"subsets": [{"image_dir": str(d)}]}],
        }
    )
    assert ds.train[0].caption == "a person" and ds.train[0].face == (10, 20, 30, 40) and ds.train[0].path == p


def test_regularisation_balanced_to_training_count(tmp_path):
    make_folder(tmp_path / "train", 5)
    make_folder(tmp_path / "reg", 3, prefix="reg")
    (ds,) = build(
        {
            "general": {"resolution": 512, "caption_extension": ".txt"},
            "datasets": [
                {
                    "subsets": [
                        {"image_dir": str(tmp_path / "train"), "num_repeats": 10},
                        {"image_dir": str(tmp_path / "reg"), "is_reg": True},
                    ]
                }
            ],
        }
    )
    reg = [i for i in ds.train if i.is_reg]
    # 50 training samples; 3 reg images start at 1 repeat each, then +1 round robin until 50: 17, 17, 16
    assert sorted(i.num_repeats for i in reg) == [16, 17, 17]
    assert ds.num_train_images == 50 and ds.num_reg_images == 50


def test_regularisation_surplus_is_left_out():
    train = [datasets.ImageInfo(key=f"t{i}", path="", size=(1, 1), caption="", subset_index=0, num_repeats=2) for i in range(3)]
    reg = [
        datasets.ImageInfo(key=f"r{i}", path="", size=(1, 1), caption="", subset_index=1, is_reg=True, num_repeats=4)
        for i in range(5)
    ]
    used = balance_regularisation(train, reg)
    # target 6: two reg images of 4 repeats reach 8 >= 6; the other three are unused
    assert [i.key for i in used] == ["r0", "r1"] and sum(i.num_repeats for i in used) == 8


def test_validation_split_is_deterministic_per_subset_and_never_takes_reg(tmp_path):
    make_folder(tmp_path / "a", 10, prefix="a")
    make_folder(tmp_path / "b", 4, prefix="b")
    make_folder(tmp_path / "reg", 6, prefix="r")
    config = {
        "general": {"resolution": 512, "caption_extension": ".txt", "validation_split": 0.25, "validation_seed": 7},
        "datasets": [
            {
                "subsets": [
                    {"image_dir": str(tmp_path / "a")},
                    {"image_dir": str(tmp_path / "b")},
                    {"image_dir": str(tmp_path / "reg"), "is_reg": True},
                ]
            }
        ],
    }
    (ds,) = build(config)
    val = [i.key for i in ds.validation]
    # round(10 * 0.25) = 3 (2.5 rounds half up) from a, round(4 * 0.25) = 1 from b, none from reg
    assert sum("/a/" in k for k in val) == 3 and sum("/b/" in k for k in val) == 1
    assert not any("/reg/" in k for k in val)
    assert not set(val) & {i.key for i in ds.train}
    assert [s.validation for s in ds.subset_stats] == [3, 1, 0] and [s.images for s in ds.subset_stats] == [10, 4, 6]
    (again,) = build(config, seed=123)  # the training seed does not matter when validation_seed is set
    assert [i.key for i in again.validation] == val
    config["general"]["validation_seed"] = 8
    (other,) = build(config)
    assert [i.key for i in other.validation] != val


def test_finetuning_json_and_jsonl_with_split(tmp_path):
    img_dir = tmp_path / "ft"
    make_folder(img_dir, 8, caption=False)
    meta = {f"img{i:03d}": {"caption": f"caption {i}", "tags": "t1, t2"} for i in range(8)}
    meta["img000"]["image_size"] = [640, 480]  # taken from metadata, not the file
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with open(tmp_path / "meta.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"image_path": str(img_dir / f"img{i:03d}.png"), "caption": f"c{i}"}) + "\n")
    (ds,) = build(
        {
            "general": {"resolution": 512, "validation_split": 0.25},
            "datasets": [{"subsets": [{"metadata_file": str(tmp_path / "meta.json"), "image_dir": str(img_dir)}]}],
        }
    )
    assert ds.config.kind == "finetuning"
    assert len(ds.train) == 6 and len(ds.validation) == 2
    info = {i.key: i for i in ds.train + ds.validation}
    assert info["img001"].caption == "caption 1,t1, t2"
    assert info["img000"].size == (640, 480) and info["img001"].size == (512, 512)
    (ds2,) = build({"general": {"resolution": 512}, "datasets": [{"subsets": [{"metadata_file": str(tmp_path / "meta.jsonl")}]}]})
    assert sorted(i.caption for i in ds2.train) == [f"c{i}" for i in range(8)]


def test_finetuning_missing_image_is_an_error(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"nothere": {"caption": "x"}}))
    (ds,) = build(
        {
            "general": {"resolution": 512},
            "datasets": [{"subsets": [{"metadata_file": str(tmp_path / "m.json"), "image_dir": str(tmp_path)}]}],
        }
    )
    files = {(p.file, p.severity) for p in ds.problems}
    assert ("nothere", "error") in files
    with pytest.raises(datasets.DatasetError, match="nothere"):
        datasets.raise_on_errors([ds])


def test_controlnet_pairs_by_stem(tmp_path):
    make_folder(tmp_path / "img", 3)
    write_image(tmp_path / "cond" / "img000.jpg", (512, 512))
    write_image(tmp_path / "cond" / "img001.png", (512, 512))
    write_image(tmp_path / "cond" / "stray.png", (512, 512))
    (ds,) = build(
        {
            "general": {"resolution": 512, "caption_extension": ".txt"},
            "datasets": [{"subsets": [{"image_dir": str(tmp_path / "img"), "conditioning_data_dir": str(tmp_path / "cond")}]}],
        }
    )
    assert ds.config.kind == "controlnet"
    assert {os.path.basename(i.conditioning_path) for i in ds.train} == {"img000.jpg", "img001.png"}
    errors = [p for p in ds.problems if p.severity == "error"]
    assert len(errors) == 1 and errors[0].file.endswith("img002.png")
    assert any(p.file.endswith("stray.png") and p.severity == "warning" for p in ds.problems)


def test_cache_info_reuses_sizes_and_notices_edits(tmp_path, monkeypatch):
    d = tmp_path / "c"
    (p,) = make_folder(d, 1)
    config = {
        "general": {"resolution": 512, "caption_extension": ".txt", "cache_info": True},
        "datasets": [{"subsets": [{"image_dir": str(d)}]}],
    }
    build(config)
    cache = json.loads((d / "metadata_cache.json").read_text())
    assert cache[p]["caption"] == "img 0, tag a, tag b" and cache[p]["resolution"] == [512, 512]

    def no_header_reads(path):
        raise AssertionError("header read despite cache")

    monkeypatch.setattr(datasets, "read_image_size", no_header_reads)
    (ds,) = build(config)
    assert ds.train[0].size == (512, 512)
    monkeypatch.undo()
    write_caption(p, "edited caption, longer than before")
    (ds,) = build(config)
    assert ds.train[0].caption == "edited caption, longer than before"


def test_buckets_distinct_counts_and_info(tmp_path):
    d = tmp_path / "b"
    for i, size in enumerate([(512, 512), (512, 512), (768, 512), (512, 768), (1024, 512)]):
        write_image(d / f"{i}.png", size)
    (ds,) = build(
        {
            "general": {"resolution": 512, "enable_bucket": True, "caption_extension": ".txt"},
            "datasets": [{"subsets": [{"image_dir": str(d), "num_repeats": 3}]}],
        }
    )
    counts = ds.bucket_images()
    assert sum(counts.values()) == 5 and counts[(512, 512)] == 2
    info = ds.bucket_info()
    assert sum(b["count"] for b in info["buckets"].values()) == 15
    assert info["mean_img_ar_error"] == pytest.approx(sum(abs(i.ar_error) for i in ds.train) / 5)


def test_no_bucket_mode_larger_image_with_random_crop_is_not_resized(tmp_path):
    d = tmp_path / "nb"
    write_image(d / "big.png", (800, 600))
    write_image(d / "small.png", (300, 300))
    (ds,) = build({"general": {"resolution": 512, "random_crop": True}, "datasets": [{"subsets": [{"image_dir": str(d)}]}]})
    info = {os.path.basename(i.path): i for i in ds.train}
    assert info["big.png"].bucket == (512, 512) and info["big.png"].resized_size == (800, 600)
    assert info["small.png"].resized_size == (512, 512)
    assert any(p.file.endswith("small.png") and "upscaled" in p.problem for p in ds.problems)


def test_epoch_order_reproducible_never_mixes_buckets_and_counts_repeats(tmp_path):
    d1, d2 = tmp_path / "x", tmp_path / "y"
    for i in range(7):
        write_image(d1 / f"{i}.png", [(512, 512), (768, 512), (512, 768)][i % 3])
    for i in range(4):
        write_image(d2 / f"{i}.png", (512, 512))
    dsets = build(
        {
            "general": {"resolution": 512, "enable_bucket": True, "batch_size": 2},
            "datasets": [
                {"subsets": [{"image_dir": str(d1), "num_repeats": 3}]},
                {"resolution": 256, "batch_size": 3, "subsets": [{"image_dir": str(d2)}]},
            ],
        }
    )
    group = DatasetGroup(dsets, seed=5)
    e1 = group.epoch_batches(1)
    assert e1 == DatasetGroup(dsets, seed=5).epoch_batches(1)
    assert e1 != group.epoch_batches(2)
    assert e1 != DatasetGroup(dsets, seed=6).epoch_batches(1)
    seen = Counter()
    for d, batch in e1:
        assert len({dsets[d].train[i].bucket for i in batch}) == 1
        assert len(batch) <= dsets[d].config.batch_size
        seen.update((d, i) for i in batch)
    assert all(seen[(0, i)] == 3 for i in range(7)) and all(seen[(1, i)] == 1 for i in range(4))
    assert len(e1) == group.num_batches_per_epoch()
    assert group.epoch_batches(1, validation=True) == group.epoch_batches(2, validation=True)


def test_unreadable_image_is_an_error_and_missing_folder_too(tmp_path):
    d = tmp_path / "u"
    make_folder(d, 1)
    (d / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    (ds,) = build(
        {
            "general": {"resolution": 512, "caption_extension": ".txt"},
            "datasets": [{"subsets": [{"image_dir": str(d)}, {"image_dir": str(tmp_path / "missing")}]}],
        }
    )
    errors = {os.path.basename(p.file) for p in ds.problems if p.severity == "error"}
    assert errors == {"broken.jpg", "missing"}
    assert len(ds.train) == 1
