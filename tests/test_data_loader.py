"""Batches: crop into the bucket, augmentations, alpha masks, conditioning images, captions, reproducibility."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import write_caption, write_image
from PIL import Image

from library import config_util
from library.data_loader import EpochBatchSampler, SampleRequest, TrainDataset, make_data_loader
from library.datasets import DatasetGroup, build_datasets


def group_for(config: dict, seed: int = 3, args=None) -> DatasetGroup:
    configs = config_util.resolve(config_util.validate_user_config(config, config_util.build_schema()), args)
    return DatasetGroup(build_datasets(configs, seed), seed)


def noise_image(path, size, seed=0, mode="RGB"):
    channels = 4 if mode == "RGBA" else 3
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(arr, mode).save(str(path))
    return str(path)


def all_batches(group, epoch=1, **kw):
    loader = make_data_loader(group, **kw)
    loader.batch_sampler.set_epoch(epoch)
    return list(loader)


def test_centre_crop_matches_a_hand_resize_and_crop(tmp_path):
    path = noise_image(tmp_path / "d" / "wide.png", (900, 500))
    group = group_for(
        {"general": {"resolution": 512, "enable_bucket": True}, "datasets": [{"subsets": [{"image_dir": str(tmp_path / "d")}]}]}
    )
    (batch,) = all_batches(group)
    info = group.datasets[0].train[0]
    bw, bh = info.bucket
    # oracle: scale so that the image covers the bucket, area filter for shrinking, centred crop
    scale = max(bw / 900, bh / 500)
    rw, rh = int(900 * scale + 0.5), int(500 * scale + 0.5)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    expected = Image.open(path).resize((rw, rh), Image.Resampling.BOX).crop((left, top, left + bw, top + bh))
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert batch["images"].shape == (1, 3, bh, bw)
    assert torch.allclose(batch["images"][0], expected, atol=1e-6)
    assert batch["original_sizes_hw"].tolist() == [[500, 900]]
    assert batch["crop_top_lefts"].tolist() == [[top, left]]
    assert batch["target_sizes_hw"].tolist() == [[bh, bw]]
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1


def test_flip_mirrors_pixels_and_crop_left(tmp_path):
    noise_image(tmp_path / "d" / "a.png", (700, 512))
    base = {
        "general": {"resolution": 512, "enable_bucket": True},
        "datasets": [{"subsets": [{"image_dir": str(tmp_path / "d"), "num_repeats": 20}]}],
    }
    plain = all_batches(group_for(base))[0]
    base["general"]["flip_aug"] = True
    batches = all_batches(group_for(base))
    flipped = [b for b in batches if b["flipped"][0]]
    kept = [b for b in batches if not b["flipped"][0]]
    assert flipped and kept  # 20 draws of p=0.5
    assert torch.equal(flipped[0]["images"][0], torch.flip(plain["images"][0], dims=[2]))
    assert torch.equal(kept[0]["images"][0], plain["images"][0])
    rw = int(700 * 448 / 512 + 0.5)  # 700x512 goes to the 576x448 bucket, scaled by height
    bw = plain["target_sizes_hw"][0, 1].item()
    assert bw == 576
    left = plain["crop_top_lefts"][0, 1].item()
    assert flipped[0]["crop_top_lefts"][0].tolist() == [0, rw - left - bw]


def test_random_crop_varies_and_stays_inside(tmp_path):
    noise_image(tmp_path / "d" / "a.png", (800, 512))
    group = group_for(
        {
            "general": {"resolution": 512, "enable_bucket": True, "random_crop": True},
            "datasets": [{"subsets": [{"image_dir": str(tmp_path / "d"), "num_repeats": 10}]}],
        }
    )
    tops = {b["crop_top_lefts"][0, 0].item() for b in all_batches(group)}
    info = group.datasets[0].train[0]
    assert info.bucket == (640, 384) and info.resized_size == (640, 410)  # slack only in height
    assert len(tops) > 1 and all(0 <= y <= 410 - 384 for y in tops)


def test_color_aug_changes_some_samples_only(tmp_path):
    noise_image(tmp_path / "d" / "a.png", (512, 512))
    cfg = {
        "general": {"resolution": 512, "color_aug": True},
        "datasets": [{"subsets": [{"image_dir": str(tmp_path / "d"), "num_repeats": 12}]}],
    }
    plain = all_batches(group_for({**cfg, "general": {"resolution": 512}}))[0]["images"][0]
    changed = [not torch.equal(b["images"][0], plain) for b in all_batches(group_for(cfg))]
    assert any(changed) and not all(changed)


def test_alpha_mask_from_png_alpha(tmp_path):
    path = noise_image(tmp_path / "d" / "a.png", (512, 512), mode="RGBA")
    write_image(tmp_path / "e" / "opaque.jpg", (512, 512))
    group = group_for(
        {
            "general": {"resolution": 512},
            "datasets": [
                {"subsets": [{"image_dir": str(tmp_path / "d"), "alpha_mask": True}]},
                {"subsets": [{"image_dir": str(tmp_path / "e"), "alpha_mask": True}]},
            ],
        }
    )
    batches = {os.path.basename(b["image_keys"][0]): b for b in all_batches(group)}
    alpha = np.asarray(Image.open(path))[..., 3].astype(np.float32) / 255
    assert torch.allclose(batches["a.png"]["alpha_masks"][0], torch.from_numpy(alpha))
    assert torch.equal(batches["opaque.jpg"]["alpha_masks"][0], torch.ones(512, 512))
    assert batches["a.png"]["images"].shape == (1, 3, 512, 512)


def test_no_alpha_masks_unless_asked(tmp_path):
    noise_image(tmp_path / "d" / "a.png", (512, 512), mode="RGBA")
    group = group_for({"general": {"resolution": 512}, "datasets": [{"subsets": [{"image_dir": str(tmp_path / "d")}]}]})
    assert all_batches(group)[0]["alpha_masks"] is None


def test_conditioning_image_is_cropped_and_flipped_with_its_image(tmp_path):
    src = np.random.default_rng(5).integers(0, 256, (512, 800, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "img")
    os.makedirs(tmp_path / "cond")
    Image.fromarray(src).save(str(tmp_path / "img" / "x.png"))
    Image.fromarray(src).save(str(tmp_path / "cond" / "x.png"))  # identical: the two tensors must line up
    group = group_for(
        {
            "general": {"resolution": 512, "enable_bucket": True, "flip_aug": True},
            "datasets": [
                {
                    "subsets": [
                        {"image_dir": str(tmp_path / "img"), "conditioning_data_dir": str(tmp_path / "cond"), "num_repeats": 6}
                    ]
                }
            ],
        }
    )
    for b in all_batches(group):
        assert b["conditioning_images"].min() >= 0
        assert torch.allclose(b["conditioning_images"][0] * 2 - 1, b["images"][0], atol=1e-6)


def test_captions_reg_loss_weight_and_multiplier(tmp_path):
    p = write_image(tmp_path / "t" / "a.png", (512, 512))
    write_caption(p, "sks, red, blue, green")
    write_image(tmp_path / "r" / "b.png", (512, 512))
    parser_args = config_util.argparse.Namespace(prior_loss_weight=0.5)
    group = group_for(
        {
            "general": {
                "resolution": 512,
                "caption_extension": ".txt",
                "shuffle_caption": True,
                "keep_tokens": 1,
                "network_multiplier": 0.75,
            },
            "datasets": [
                {
                    "subsets": [
                        {"image_dir": str(tmp_path / "t"), "num_repeats": 8},
                        {"image_dir": str(tmp_path / "r"), "is_reg": True, "class_tokens": "dog"},
                    ]
                }
            ],
        },
        args=parser_args,
    )
    batches = all_batches(group)
    train = [b["captions"][0] for b in batches if b["loss_weights"][0] == 1.0]
    reg = [b["captions"][0] for b in batches if b["loss_weights"][0] == 0.5]
    assert len(train) == 8 and len(reg) == 8 and set(reg) == {"dog"}
    assert all(c.startswith("sks, ") and sorted(c.split(", ")[1:]) == ["blue", "green", "red"] for c in train)
    assert len(set(train)) > 1
    assert all(b["network_multipliers"].tolist() == [0.75] for b in batches)


def test_batches_same_with_workers_and_after_resume(tmp_path):
    for i in range(6):
        noise_image(tmp_path / "d" / f"{i}.png", [(512, 512), (640, 448)][i % 2], seed=i)
    group = group_for(
        {
            "general": {
                "resolution": 512,
                "enable_bucket": True,
                "batch_size": 2,
                "flip_aug": True,
                "random_crop": True,
                "shuffle_caption": True,
            },
            "datasets": [{"subsets": [{"image_dir": str(tmp_path / "d"), "num_repeats": 2}]}],
        }
    )
    ref = all_batches(group, epoch=2)
    with_workers = all_batches(group, epoch=2, num_workers=2)
    assert len(ref) == len(with_workers) == group.num_batches_per_epoch()
    for a, b in zip(ref, with_workers):
        assert a["image_keys"] == b["image_keys"] and torch.equal(a["images"], b["images"])
    loader = make_data_loader(group)
    loader.batch_sampler.set_epoch(2, skip_batches=3)
    resumed = list(loader)
    assert len(resumed) == len(ref) - 3
    for a, b in zip(ref[3:], resumed):
        assert a["image_keys"] == b["image_keys"] and torch.equal(a["images"], b["images"])
        assert a["crop_top_lefts"].tolist() == b["crop_top_lefts"].tolist()


def test_validation_batches_are_fixed(tmp_path):
    for i in range(8):
        p = noise_image(tmp_path / "d" / f"{i}.png", (512, 512), seed=i)
        write_caption(p, "a, b, c, d")
    group = group_for(
        {
            "general": {
                "resolution": 512,
                "caption_extension": ".txt",
                "validation_split": 0.25,
                "flip_aug": True,
                "shuffle_caption": True,
            },
            "datasets": [{"subsets": [{"image_dir": str(tmp_path / "d")}]}],
        }
    )
    one = all_batches(group, epoch=1, validation=True)
    two = all_batches(group, epoch=2, validation=True)
    assert len(one) == 2
    for a, b in zip(one, two):
        assert a["image_keys"] == b["image_keys"] and torch.equal(a["images"], b["images"])
        assert a["captions"] == ["a, b, c, d"] and not a["flipped"][0]


def test_face_crop_keeps_face_in_view(tmp_path):
    arr = np.zeros((1000, 1000, 3), dtype=np.uint8)
    arr[630:830, 130:330] = 255  # the "face": a 200 px white square centred at (230, 730)
    os.makedirs(tmp_path / "f")
    Image.fromarray(arr).save(str(tmp_path / "f" / "me_230_730_200_200.png"))
    group = group_for(
        {
            "general": {"resolution": 256, "face_crop_aug_range": [2.0, 4.0]},
            "datasets": [{"subsets": [{"image_dir": str(tmp_path / "f"), "num_repeats": 5}]}],
        }
    )
    for b in all_batches(group):
        img = b["images"][0]
        assert img.shape == (3, 256, 256)
        white = (img > 0.5).all(dim=0)
        assert white.any()
        ys, xs = torch.nonzero(white, as_tuple=True)
        face_px = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1).item()
        # range [2, 4]: the crop's side is 2 to 4 face sizes, so the face is 64..128 px
        assert 256 / 4 - 3 <= face_px <= 256 / 2 + 3


def test_sample_request_is_hashable_and_dataset_len(tmp_path):
    noise_image(tmp_path / "d" / "a.png", (512, 512))
    group = group_for({"general": {"resolution": 512}, "datasets": [{"subsets": [{"image_dir": str(tmp_path / "d")}]}]})
    ds = TrainDataset(group)
    assert len(ds) == 1
    sample = ds[SampleRequest(0, 0, 1, 0, 0)]
    assert sample["image"].shape == (3, 512, 512)
    assert len(EpochBatchSampler(group)) == 1


@pytest.mark.parametrize("steps,expected_tags", [(0, 1), (4, 2), (100, 4)])
def test_token_warmup_uses_the_step(tmp_path, steps, expected_tags):
    p = write_image(tmp_path / "d" / "a.png", (512, 512))
    write_caption(p, "a, b, c, d")
    group = group_for(
        {
            "general": {"resolution": 512, "caption_extension": ".txt", "token_warmup_min": 1, "token_warmup_step": 8},
            "datasets": [{"subsets": [{"image_dir": str(tmp_path / "d")}]}],
        }
    )
    ds = TrainDataset(group, max_train_steps=100)
    caption = ds[SampleRequest(0, 0, 1, 0, 0, step=steps)]["caption"]
    # warm-up over 8 steps from 1 to 4 tags: floor(step * 3 / 8) + 1
    assert len(caption.split(", ")) == expected_tags


def test_accumulation_groups_restart_every_epoch():
    from library.data_loader import accumulation_group

    # 5 batches an epoch, 2 per step: steps [0, 1], [2, 3], [4] (a last step of one batch)
    assert [accumulation_group(i, 5, 2) for i in range(5)] == [(0, 2), (0, 2), (1, 2), (1, 2), (2, 1)]
    assert [accumulation_group(i, 3, 1) for i in range(3)] == [(0, 1), (1, 1), (2, 1)]
    assert [accumulation_group(i, 2, 4) for i in range(2)] == [(0, 2), (0, 2)]


def test_sampler_numbers_steps_per_epoch_groups(tmp_path):
    for i in range(3):
        noise_image(tmp_path / "d" / f"{i}.png", (64, 64), seed=i)
    group = group_for({"general": {"resolution": 64, "batch_size": 1}, "datasets": [{"subsets": [{"image_dir": str(tmp_path / "d")}]}]})
    sampler = EpochBatchSampler(group, batches_per_step=2)
    steps = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        steps.append([share[0].step for share in sampler])
    assert steps == [[0, 0, 1], [2, 2, 3]]  # 2 steps an epoch: two batches, then the last one alone
    sampler.set_epoch(2, skip_batches=2)
    assert [share[0].step for share in sampler] == [3]
