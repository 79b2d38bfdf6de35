"""Text-encoder output cache: files and staleness, caption variants and dropout, sharding, data-loader batches."""

from __future__ import annotations

import json
import os
import pickle
import random

import pytest
import torch
from conftest import write_caption, write_image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library import config_util
from library.captions import caption_variants, process_caption
from library.data_loader import SampleRequest, TrainDataset, make_data_loader
from library.datasets import DatasetGroup, build_datasets
from library.te_cache import EMPTY_KEY, TextEncoderOutputCache, empty_caption_path, te_cache_path

IDENTITY = {"te1": "abc123", "te2": "def456", "max_token_length": 75, "clip_skip": None, "weighted": False}


class FakeEncoder:
    """A deterministic stand-in for SDXL's two text encoders: outputs are a function of the caption's bytes.

    Records every batch of captions it is asked to encode."""

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype
        self.calls: list[list[str]] = []

    @staticmethod
    def codes(caption: str) -> torch.Tensor:
        data = list(caption.encode("utf-8")[:64]) + [0] * max(0, 64 - len(caption.encode("utf-8")))
        return torch.tensor(data, dtype=torch.float32)

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.calls.append(list(captions))
        c = torch.stack([self.codes(t) for t in captions])  # (B, 64)
        return {
            "hidden_state1": c.reshape(-1, 8, 8).to(self.dtype),
            "hidden_state2": (c.reshape(-1, 8, 8) / 2).to(self.dtype),
            "pool2": c[:, :5].to(self.dtype),
        }

    def encoded(self) -> list[str]:
        return [t for call in self.calls for t in call]

    def expected(self, caption: str) -> dict[str, torch.Tensor]:
        out = FakeEncoder(self.dtype)([caption])
        return {k: v[0] for k, v in out.items()}


def assert_outputs_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def group_for(config: dict, seed: int = 3) -> DatasetGroup:
    configs = config_util.resolve(config_util.validate_user_config(config, config_util.build_schema()), None)
    return DatasetGroup(build_datasets(configs, seed), seed)


def make_images(folder, captions: list[str], size=(64, 64)) -> list[str]:
    paths = []
    for i, text in enumerate(captions):
        p = write_image(folder / f"img{i}.png", size, color=(10 * i, 100, 50))
        write_caption(p, text)
        paths.append(p)
    return paths


def config(folder, **general) -> dict:
    return {
        "general": {"resolution": 64, "caption_extension": ".txt"} | general,
        "datasets": [{"subsets": [{"image_dir": str(folder)}]}],
    }


def infos(group: DatasetGroup):
    return [i for ds in group.datasets for i in ds.train + ds.validation]


CAPTIONS = ["a red apple", "a green pear, on a table", "blue sky"]


def test_memory_fill_get_and_second_fill(tmp_path):
    make_images(tmp_path / "d", CAPTIONS)
    group = group_for(config(tmp_path / "d"))
    enc = FakeEncoder()
    cache = TextEncoderOutputCache("sdxl", enc, IDENTITY, cache_to_disk=False, batch_size=2)
    assert cache.fill(group, show_progress=False) == 3
    assert sorted(enc.encoded()) == sorted(CAPTIONS) and all(len(c) <= 2 for c in enc.calls)
    assert set(cache.memory) == {i.path for i in infos(group)}  # no empty entry: no caption dropout
    for info in infos(group):
        assert_outputs_equal(cache.get(info, 0), enc.expected(info.caption))
        assert cache.variant_captions(info) == [info.caption]
    assert not [f for f in os.listdir(tmp_path / "d") if f.endswith(".safetensors")]
    enc.calls.clear()
    assert cache.fill(group, show_progress=False) == 0 and enc.calls == []


def test_disk_files_next_to_images_keys_metadata_and_reuse(tmp_path):
    paths = make_images(tmp_path / "d", CAPTIONS)
    group = group_for(config(tmp_path / "d"))
    enc = FakeEncoder(torch.bfloat16)
    cache = TextEncoderOutputCache("sdxl", enc, IDENTITY, cache_to_disk=True)
    assert cache.fill(group, show_progress=False) == 3
    assert cache.memory == {}
    for path, caption in zip(paths, CAPTIONS):
        file = os.path.splitext(path)[0] + "_sdxl_te.safetensors"
        assert te_cache_path(path, "sdxl") == file and os.path.isfile(file)
        with safe_open(file, framework="pt") as f:
            meta = f.metadata()
            assert set(f.keys()) == {"v0.hidden_state1", "v0.hidden_state2", "v0.pool2"}
            assert f.get_tensor("v0.hidden_state1").dtype == torch.bfloat16  # stored as encoded
        assert meta["format_version"] == "1" and meta["architecture"] == "sdxl"
        assert json.loads(meta["identity"]) == IDENTITY and json.loads(meta["captions"]) == [caption]
    for info in infos(group):
        assert_outputs_equal(cache.get(info, 0), enc.expected(info.caption))
    # a new run (new cache object) finds everything valid and encodes nothing
    enc2 = FakeEncoder(torch.bfloat16)
    assert TextEncoderOutputCache("sdxl", enc2, IDENTITY, cache_to_disk=True).fill(group, show_progress=False) == 0
    assert enc2.calls == []
    # a complete disk cache can be read without an encoder
    reader = TextEncoderOutputCache("sdxl", None, IDENTITY, cache_to_disk=True)
    assert reader.fill(group, show_progress=False) == 0
    assert_outputs_equal(reader.get(infos(group)[0], 0), enc.expected(infos(group)[0].caption))


def test_changed_caption_identity_or_missing_variant_rebuilds(tmp_path):
    paths = make_images(tmp_path / "d", CAPTIONS)
    cfg = config(tmp_path / "d")
    enc = FakeEncoder()
    TextEncoderOutputCache("sdxl", enc, IDENTITY, cache_to_disk=True).fill(group_for(cfg), show_progress=False)

    # the caption file of one image changes: only that image is encoded again, with its new caption
    write_caption(paths[1], "a yellow banana, ripe, curved, on a plate")
    group = group_for(cfg)
    enc = FakeEncoder()
    cache = TextEncoderOutputCache("sdxl", enc, IDENTITY, cache_to_disk=True)
    assert cache.fill(group, show_progress=False) == 1 and enc.encoded() == ["a yellow banana, ripe, curved, on a plate"]
    info = next(i for i in infos(group) if i.path == paths[1])
    assert_outputs_equal(cache.get(info, 0), enc.expected("a yellow banana, ripe, curved, on a plate"))

    # another text-encoder identity (say clip_skip): everything is rebuilt
    enc = FakeEncoder()
    other = TextEncoderOutputCache("sdxl", enc, IDENTITY | {"clip_skip": 2}, cache_to_disk=True)
    assert other.fill(group, show_progress=False) == 3

    # shuffled captions with 3 variants; then a file loses a variant's tensor: that file is rebuilt
    cfg["general"]["shuffle_caption"] = True
    group = group_for(cfg)
    cache = TextEncoderOutputCache("sdxl", FakeEncoder(), IDENTITY, cache_to_disk=True, variants=3)
    assert cache.fill(group, show_progress=False) == 3
    file = te_cache_path(paths[1], "sdxl")
    with safe_open(file, framework="pt") as f:
        meta = f.metadata()
        assert len(json.loads(meta["captions"])) == 3
    tensors = {k: v for k, v in load_file(file).items() if not k.startswith("v2.")}
    save_file(tensors, file, meta)
    enc = FakeEncoder()
    assert TextEncoderOutputCache("sdxl", enc, IDENTITY, cache_to_disk=True, variants=3).fill(group, show_progress=False) == 1
    assert set(enc.encoded()) <= set(json.loads(meta["captions"]))
    # more variants asked for: the shuffled images are rebuilt ("blue sky" has one tag: one variant whatever is asked)
    assert (
        TextEncoderOutputCache("sdxl", FakeEncoder(), IDENTITY, cache_to_disk=True, variants=4).fill(group, show_progress=False)
        == 1
    )
    # a damaged file is rebuilt, not trusted
    with open(file, "wb") as f:
        f.write(b"not safetensors")
    assert (
        TextEncoderOutputCache("sdxl", FakeEncoder(), IDENTITY, cache_to_disk=True, variants=4).fill(group, show_progress=False)
        == 1
    )


def test_variants_differ_for_shuffled_captions_and_are_reproducible(tmp_path):
    tags = "sks, red, green, blue, round, shiny"
    make_images(tmp_path / "d", [tags, "one tag only"])
    cfg = config(tmp_path / "d", shuffle_caption=True, keep_tokens=1)
    group = group_for(cfg)
    cache = TextEncoderOutputCache("sdxl", FakeEncoder(), IDENTITY, cache_to_disk=False, variants=5)
    cache.fill(group, show_progress=False)
    info = next(i for i in infos(group) if i.caption == tags)
    texts = cache.variant_captions(info)
    assert len(texts) == 5 and len(set(texts)) > 2
    for t in texts:
        assert t.startswith("sks, ") and sorted(t.split(", ")) == sorted(tags.split(", "))
    for k, t in enumerate(texts):
        assert_outputs_equal(cache.get(info, k), FakeEncoder().expected(t))
    single = next(i for i in infos(group) if i.caption == "one tag only")
    assert cache.variant_captions(single) == ["one tag only"]  # identical variants are kept once

    # reproducible: another run (and another seed) makes the same variants, the captions module's own function too
    again = TextEncoderOutputCache("sdxl", FakeEncoder(), IDENTITY, cache_to_disk=False, variants=5)
    again.fill(group_for(cfg, seed=99), show_progress=False)
    assert again.variant_captions(info) == texts
    assert caption_variants(tags, group.datasets[0].config.subsets[0].caption, os.path.basename(info.key), 5) == texts

    # captions that are not random: one variant, whatever is asked
    plain = group_for(config(tmp_path / "d"))
    cache = TextEncoderOutputCache("sdxl", FakeEncoder(), IDENTITY, cache_to_disk=False, variants=5)
    cache.fill(plain, show_progress=False)
    assert all(len(e.captions) == 1 for e in cache.memory.values())


def test_caption_dropout_draws_the_empty_entry_at_the_rate(tmp_path):
    make_images(tmp_path / "d", ["a, b, c, d"])
    group = group_for(config(tmp_path / "d", shuffle_caption=True, caption_dropout_rate=0.3))
    opts = group.datasets[0].config.subsets[0].caption
    enc = FakeEncoder()
    cache = TextEncoderOutputCache("sdxl", enc, IDENTITY, cache_to_disk=False, variants=4)
    assert cache.fill(group, show_progress=False) == 2  # the image and the shared empty caption
    assert cache.memory[EMPTY_KEY].captions == [""]
    assert all(t for t in cache.memory[group.datasets[0].train[0].path].captions)  # variants are never dropped
    info = group.datasets[0].train[0]
    dropped = 0
    for s in range(2000):
        caption, out = cache.draw(info, opts, random.Random(s), epoch=1)
        # dropout is decided by the same draw as in the uncached pipeline
        assert (caption == "") == (process_caption(info.caption, opts, random.Random(s), 1) == "")
        if caption == "":
            dropped += 1
            assert_outputs_equal(out, enc.expected(""))
        else:
            assert caption in cache.variant_captions(info)
    assert 0.26 < dropped / 2000 < 0.34


@pytest.mark.parametrize("to_disk", [False, True])
def test_dropout_every_n_epochs_through_the_data_loader(tmp_path, to_disk):
    make_images(tmp_path / "d", ["x, y, z"])
    cfg = config(tmp_path / "d", caption_dropout_every_n_epochs=2)
    cfg["datasets"][0]["subsets"][0]["num_repeats"] = 4
    group = group_for(cfg)
    cache = TextEncoderOutputCache("sdxl", FakeEncoder(), IDENTITY, cache_to_disk=to_disk)
    cache.fill(group, show_progress=False)
    if to_disk:
        assert os.path.isfile(empty_caption_path(str(tmp_path / "d"), "sdxl"))
    loader = make_data_loader(group, te_cache=cache)
    for epoch in (1, 2, 3, 4):
        loader.batch_sampler.set_epoch(epoch)
        captions = [c for b in loader for c in b["captions"]]
        assert captions == (["", "", "", ""] if epoch % 2 == 0 else ["x, y, z"] * 4)


def test_token_warmup_is_refused(tmp_path):
    make_images(tmp_path / "d", CAPTIONS)
    group = group_for(config(tmp_path / "d", token_warmup_step=10))
    enc = FakeEncoder()
    with pytest.raises(ValueError, match=r"datasets\[0\]\.subsets\[0\].*token warm-up.*turn off token warm-up or text-encoder"):
        TextEncoderOutputCache("sdxl", enc, IDENTITY, cache_to_disk=True).fill(group, show_progress=False)
    assert enc.calls == []


def test_same_image_with_two_captionings_is_refused(tmp_path):
    make_images(tmp_path / "d", CAPTIONS)
    cfg = config(tmp_path / "d")
    cfg["datasets"].append({"subsets": [{"image_dir": str(tmp_path / "d"), "caption_prefix": "photo of"}]})
    with pytest.raises(ValueError, match="two subsets with different captions"):
        TextEncoderOutputCache("sdxl", FakeEncoder(), IDENTITY, cache_to_disk=False).fill(group_for(cfg), show_progress=False)


def test_processes_share_disk_work_exactly_once(tmp_path):
    make_images(tmp_path / "a", [f"cat {i}, sitting" for i in range(5)])
    make_images(tmp_path / "b", [f"dog {i}" for i in range(4)])
    cfg = {
        "general": {"resolution": 64, "caption_extension": ".txt", "caption_dropout_rate": 0.1},
        "datasets": [{"subsets": [{"image_dir": str(tmp_path / "a")}, {"image_dir": str(tmp_path / "b")}]}],
    }
    group = group_for(cfg)
    built, encoded = 0, []
    for p in range(3):
        enc = FakeEncoder()
        built += TextEncoderOutputCache("sdxl", enc, IDENTITY, cache_to_disk=True).fill(
            group, process_index=p, num_processes=3, show_progress=False
        )
        encoded += enc.encoded()
    # 9 images and one empty caption per folder, each encoded by exactly one process
    assert built == 11 and sorted(encoded) == sorted([i.caption for i in infos(group)] + ["", ""])
    for folder in ("a", "b"):
        assert os.path.isfile(empty_caption_path(str(tmp_path / folder), "sdxl"))
    enc = FakeEncoder()
    assert TextEncoderOutputCache("sdxl", enc, IDENTITY, cache_to_disk=True).fill(group, show_progress=False) == 0
    # memory caches: every process holds everything
    mem = TextEncoderOutputCache("sdxl", FakeEncoder(), IDENTITY, cache_to_disk=False)
    assert mem.fill(group, process_index=1, num_processes=3, show_progress=False) == 10


@pytest.mark.parametrize("to_disk", [False, True])
def test_loader_batches_carry_the_cached_outputs(tmp_path, to_disk):
    make_images(tmp_path / "d", [f"sks, tag{i}, red, blue, green" for i in range(4)])
    cfg = config(tmp_path / "d", shuffle_caption=True, keep_tokens=1, batch_size=2, caption_dropout_rate=0.25)
    cfg["datasets"][0]["subsets"][0]["num_repeats"] = 3
    group = group_for(cfg)
    cache = TextEncoderOutputCache("sdxl", FakeEncoder(torch.bfloat16), IDENTITY, cache_to_disk=to_disk, variants=3)
    cache.fill(group, show_progress=False)
    by_key = {i.key: i for i in infos(group)}
    loader = make_data_loader(group, te_cache=cache)
    loader.batch_sampler.set_epoch(1)
    batches = list(loader)
    used = set()
    for b in batches:
        assert set(b["text_outputs"]) == {"hidden_state1", "hidden_state2", "pool2"}
        assert b["text_outputs"]["hidden_state1"].shape == (len(b["captions"]), 8, 8)
        assert b["text_outputs"]["pool2"].dtype == torch.bfloat16
        for n, (key, caption) in enumerate(zip(b["image_keys"], b["captions"])):
            info = by_key[key]
            expected = cache.empty(info) if caption == "" else cache.get(info, cache.variant_captions(info).index(caption))
            for name, t in b["text_outputs"].items():
                assert torch.equal(t[n], expected[name])
            used.add(caption)
    assert "" in used and len(used) > 5  # dropout happened and several variants were drawn
    # the same batches again: the draws come from the samples' seeded rngs
    again = list(loader)
    assert [b["captions"] for b in again] == [b["captions"] for b in batches]
    # without a cache the batch says so
    plain = make_data_loader(group)
    plain.batch_sampler.set_epoch(1)
    assert next(iter(plain))["text_outputs"] is None


def test_validation_uses_variant_0_without_dropout(tmp_path):
    make_images(tmp_path / "d", [f"sks, tag{i}, red, blue, green" for i in range(6)])
    group = group_for(config(tmp_path / "d", shuffle_caption=True, caption_dropout_rate=1.0, validation_split=0.5))
    assert group.datasets[0].validation
    cache = TextEncoderOutputCache("sdxl", FakeEncoder(), IDENTITY, cache_to_disk=False, variants=4)
    cache.fill(group, show_progress=False)
    for info in group.datasets[0].validation:
        assert len(cache.variant_captions(info)) == 1  # validation needs variant 0 only
    loader = make_data_loader(group, validation=True, te_cache=cache)
    loader.batch_sampler.set_epoch(1)
    batches = list(loader)
    assert batches
    for b in batches:
        for n, key in enumerate(b["image_keys"]):
            info = next(i for i in group.datasets[0].validation if i.key == key)
            v0 = cache.variant_captions(info)[0]
            assert b["captions"][n] == v0 != ""
            assert torch.equal(b["text_outputs"]["pool2"][n], cache.get(info, 0)["pool2"])
    # variant 0 of a validation image is the variant 0 it would have as a training image
    info = group.datasets[0].validation[0]
    opts = group.datasets[0].config.subsets[0].caption
    assert cache.variant_captions(info)[0] == caption_variants(info.caption, opts, os.path.basename(info.key), 4)[0]
    # training samples of this subset are always dropped (rate 1.0)
    ds = TrainDataset(group, te_cache=cache)
    sample = ds[SampleRequest(0, 0, 1, 0, 0)]
    assert sample["caption"] == "" and torch.equal(
        sample["text_outputs"]["pool2"], cache.empty(group.datasets[0].train[0])["pool2"]
    )


def test_cache_pickles_without_its_encoder(tmp_path):
    make_images(tmp_path / "d", CAPTIONS)
    group = group_for(config(tmp_path / "d"))
    cache = TextEncoderOutputCache("sdxl", lambda captions: FakeEncoder()(captions), IDENTITY, cache_to_disk=False)
    cache.fill(group, show_progress=False)
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.encode is None and cache.encode is not None
    info = infos(group)[0]
    assert_outputs_equal(copy.get(info, 0), cache.get(info, 0))


def test_tokenizer_identity_is_what_it_does_not_where_it_was_loaded_from(tmp_path):
    """The built-in models load their tokenizers from a new temporary folder each run: their text-encoder caches must
    stay valid. Another vocabulary or special token is another identity."""
    from transformers import CLIPTokenizer

    from library.strategy_base import tokenizer_fingerprint
    from library.tiny_models import build_tiny_flux, write_tiny_clip_tokenizer

    first, second = build_tiny_flux(), build_tiny_flux()
    assert first["tokenizer"].name_or_path != second["tokenizer"].name_or_path
    for key in ("tokenizer", "tokenizer_2"):
        assert tokenizer_fingerprint(first[key]) == tokenizer_fingerprint(second[key])
    assert tokenizer_fingerprint(first["tokenizer"]) != tokenizer_fingerprint(first["tokenizer_2"])
    write_tiny_clip_tokenizer(str(tmp_path / "bang"), pad_token="!")
    bang = CLIPTokenizer.from_pretrained(str(tmp_path / "bang"))
    assert tokenizer_fingerprint(bang) != tokenizer_fingerprint(first["tokenizer"])
