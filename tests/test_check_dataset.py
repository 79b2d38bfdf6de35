"""tools/check_dataset.py run as a user runs it: text and JSON reports, problems, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, write_caption, write_image

SCRIPT = os.path.join(ROOT, "tools", "check_dataset.py")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def write_toml(path, text):
    path.write_text(text)
    return str(path)


def test_json_report_matches_the_dataset(tmp_path):
    train, reg, cn_img, cn_cond = tmp_path / "train", tmp_path / "reg", tmp_path / "cimg", tmp_path / "ccond"
    sizes = [(512, 512), (512, 512), (512, 512), (768, 512), (768, 512), (512, 768), (300, 300), (512, 512)]
    for i, size in enumerate(sizes):
        p = write_image(train / f"{i}.png", size)
        if i != 1:
            write_caption(p, f"photo {i}")
    for i in range(3):
        write_image(reg / f"r{i}.jpg", (512, 512))
    (train / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    write_image(cn_img / "a.png", (512, 512))
    write_image(cn_img / "b.png", (512, 512))
    write_image(cn_cond / "a.png", (512, 512))
    config = write_toml(
        tmp_path / "data.toml",
        f"""
[general]
enable_bucket = true
caption_extension = ".txt"

[[datasets]]
resolution = 512
batch_size = 2
validation_split = 0.25
validation_seed = 1

  [[datasets.subsets]]
  image_dir = '{train}'
  num_repeats = 4
  class_tokens = "sks"

  [[datasets.subsets]]
  image_dir = '{reg}'
  is_reg = true

[[datasets]]
resolution = [512, 512]

  [[datasets.subsets]]
  image_dir = '{cn_img}'
  conditioning_data_dir = '{cn_cond}'
""",
    )
    res = run("--dataset_config", config, "--json")
    assert res.returncode == 1, res.stderr  # the broken image and the missing conditioning image are errors
    rep = json.loads(res.stdout)
    d0, d1 = rep["datasets"]
    assert d0["resolution"] == [512, 512] and d0["batch_size"] == 2
    # 8 readable training images, round(8 * 0.25) = 2 held out; 6 distinct training images in buckets
    assert d0["validation_images"] == 2
    assert sum(b["images"] for b in d0["buckets"]) == 6
    assert all(len(b["resolution"]) == 2 for b in d0["buckets"])
    s_train, s_reg = d0["subsets"]
    assert (s_train["image_dir"], s_train["images"], s_train["num_repeats"], s_train["is_reg"]) == (str(train), 8, 4, False)
    assert (s_reg["image_dir"], s_reg["images"], s_reg["num_repeats"], s_reg["is_reg"]) == (str(reg), 3, 1, True)
    assert d1["resolution"] == [512, 512] and d1["batch_size"] == 1 and d1["validation_images"] == 0
    assert d1["buckets"] == [{"resolution": [512, 512], "images": 1}]

    problems = {(os.path.basename(p["file"]), p["severity"]) for p in rep["problems"]}
    assert ("broken.png", "error") in problems
    assert ("b.png", "error") in problems  # no conditioning image
    assert ("1.png", "warning") in problems  # no caption file
    assert ("r0.jpg", "warning") in problems
    upscaled = [(os.path.basename(p["file"]), p["severity"]) for p in rep["problems"] if "upscaled" in p["problem"]]
    assert upscaled == [("6.png", "warning")]  # 300x300 into a 512x512 bucket
    for p in rep["problems"]:
        assert set(p) == {"file", "problem", "severity"} and p["severity"] in ("error", "warning")


def test_clean_dataset_exits_zero_and_prints_text(tmp_path):
    for i in range(3):
        write_caption(write_image(tmp_path / "10_cat" / f"{i}.jpg", (640, 512)), "a cat")
    res = run("--train_data_dir", str(tmp_path), "--resolution", "512", "--enable_bucket", "--caption_extension", ".txt")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 images x 10 repeats" in res.stdout and "0 error(s), 0 warning(s)" in res.stdout
    assert "3/3 with captions" in res.stdout


def test_truncated_image_is_found_only_by_decoding(tmp_path):
    import numpy as np
    from PIL import Image

    good = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(str(good))
    folder = tmp_path / "1_x"
    folder.mkdir()
    (folder / "t.png").write_bytes(good.read_bytes()[:5000])
    write_caption(folder / "t.png", "x")
    res = run("--train_data_dir", str(tmp_path), "--resolution", "128", "--caption_extension", ".txt", "--json")
    assert res.returncode == 1
    (problem,) = json.loads(res.stdout)["problems"]
    assert problem["file"].endswith("t.png") and "truncated" in problem["problem"] and problem["severity"] == "error"
    res = run("--train_data_dir", str(tmp_path), "--resolution", "128", "--caption_extension", ".txt", "--json", "--no_decode")
    assert res.returncode == 0


def test_bad_config_names_the_key_and_table(tmp_path):
    config = write_toml(
        tmp_path / "bad.toml",
        """
[general]
resolution = 512
[[datasets]]
  [[datasets.subsets]]
  image_dir = "x"
  num_repeat = 3
""",
    )
    res = run("--dataset_config", config, "--json")
    assert res.returncode == 2
    assert "datasets[0].subsets[0]" in res.stderr and "num_repeat" in res.stderr and "num_repeats" in res.stderr
    assert res.stdout == ""
