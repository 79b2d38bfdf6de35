"""Dataset config: schema (which key at which level), error messages, inheritance, type inference, legacy folder mode.

Expectations are written from the sd-scripts interface reference (§3 "Dataset config", §3.1 bucketing), not copied
from library/config_util.py's tables: the key lists below are this file's own reading of the reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from library.args import add_dataset_arguments
from library.captions import CaptionOptions
from library.config_util import (
    ConfigError,
    build_schema,
    dreambooth_subsets_from_folders,
    load_config_file,
    load_dataset_configs,
    resolve,
    user_config_from_args,
    validate_user_config,
)

DB, FT, CN = "dreambooth", "finetuning", "controlnet"
KINDS = (DB, FT, CN)

# ---------------------------------------------------------------------------------------------------------------------
# The reference, §3, as tables of this test file: key -> a valid value.

# "Dataset-level keys (allowed in `general` and `[[datasets]]`, not in subsets)"
DATASET_KEYS = {
    "batch_size": 2,
    "resolution": [640, 512],
    "enable_bucket": True,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": True,
    "validation_seed": 7,
    "validation_split": 0.1,
    "network_multiplier": 0.5,
    "resize_interpolation": "lanczos",
}
# "Subset keys allowed at all three levels"
SUBSET_ALL_LEVEL_KEYS = {
    "num_repeats": 3,
    "shuffle_caption": True,
    "caption_separator": ";",
    "keep_tokens": 2,
    "keep_tokens_separator": "|||",
    "secondary_separator": ";;;",
    "enable_wildcard": True,
    "caption_prefix": "photo of",
    "caption_suffix": "best quality",
    "color_aug": True,
    "flip_aug": True,
    "face_crop_aug_range": [2.0, 4.0],
    "random_crop": True,
    "token_warmup_min": 1,
    "token_warmup_step": 0.5,
    "custom_attributes": {"diff_output_preservation": True},
    "resize_interpolation": "area",
}
# "Dropout keys (all levels, when the script supports dropout)"
DROPOUT_KEYS = {"caption_dropout_rate": 0.1, "caption_dropout_every_n_epochs": 3, "caption_tag_dropout_rate": 0.2}
# DreamBooth / ControlNet keys allowed at all levels of datasets of that type
TYPE_ALL_LEVEL_KEYS = {
    DB: {"caption_extension": ".txt", "class_tokens": "sks dog", "cache_info": True},
    FT: {},
    CN: {"caption_extension": ".txt", "cache_info": True},
}
# subset-only keys of each type
SUBSET_ONLY_KEYS = {
    DB: {"image_dir": "img", "is_reg": True, "alpha_mask": True},
    FT: {"metadata_file": "meta.json", "image_dir": "img", "alpha_mask": True},
    CN: {"image_dir": "img", "conditioning_data_dir": "cond"},
}
# the smallest subset of each type
BASE_SUBSET = {
    DB: {"image_dir": "img"},
    FT: {"metadata_file": "meta.json"},
    CN: {"image_dir": "img", "conditioning_data_dir": "cond"},
}
# keys whose presence in a subset changes the inferred dataset type (tested separately)
TYPE_MARKERS = {"metadata_file", "conditioning_data_dir"}

ALL_KEYS: dict = {
    **DATASET_KEYS,
    **SUBSET_ALL_LEVEL_KEYS,
    **DROPOUT_KEYS,
    **TYPE_ALL_LEVEL_KEYS[DB],
    **SUBSET_ONLY_KEYS[DB],
    **SUBSET_ONLY_KEYS[FT],
    **SUBSET_ONLY_KEYS[CN],
}


def allowed_keys(kind: str, level: str) -> dict:
    """Keys the reference allows at `level` ("general", "dataset", "subset") of a dataset of type `kind`."""
    common = {**SUBSET_ALL_LEVEL_KEYS, **DROPOUT_KEYS}
    if level == "general":  # general applies to every dataset, so it takes the union of the all-level keys
        return {**DATASET_KEYS, **common, **TYPE_ALL_LEVEL_KEYS[DB], **TYPE_ALL_LEVEL_KEYS[CN]}
    if level == "dataset":
        return {**DATASET_KEYS, **common, **TYPE_ALL_LEVEL_KEYS[kind]}
    out = {**common, **TYPE_ALL_LEVEL_KEYS[kind], **SUBSET_ONLY_KEYS[kind]}
    if kind == CN:
        out["random_crop"] = False  # "random_crop not allowed" for ControlNet: only its off value passes
    return out


def _valid_level_label(key: str) -> str:
    """Where the error message should send a misplaced key."""
    if any(key in SUBSET_ONLY_KEYS[k] for k in KINDS):
        return "[[datasets.subsets]]"
    return "[[datasets]]"


ACCEPT_CASES = [
    pytest.param(kind, level, key, value, id=f"{kind}-{level}-{key}")
    for kind in KINDS
    for level in ("general", "dataset", "subset")
    for key, value in allowed_keys(kind, level).items()
]
REJECT_CASES = [
    pytest.param(kind, level, key, id=f"{kind}-{level}-{key}")
    for kind in KINDS
    for level in ("general", "dataset", "subset")
    for key in ALL_KEYS
    if key not in allowed_keys(kind, level) and not (level == "subset" and key in TYPE_MARKERS and kind != CN)
]
LEVEL_PATH = {"general": "general", "dataset": "datasets[0]", "subset": "datasets[0].subsets[0]"}


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: real files on disk, a real argparse parser.


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(cfg: dict) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if k not in ("general", "datasets")]
    if "general" in cfg:
        lines.append("[general]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in cfg["general"].items()]
    for ds in cfg.get("datasets", []):
        lines.append("\n[[datasets]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in ds.items() if k != "subsets"]
        for sub in ds.get("subsets", []):
            lines.append("\n  [[datasets.subsets]]")
            lines += [f"  {k} = {_toml_value(v)}" for k, v in sub.items()]
    return "\n".join(lines) + "\n"


def write_config(tmp_path: Path, cfg: dict, fmt: str = "toml", name: str = "dataset") -> Path:
    path = tmp_path / f"{name}.{fmt}"
    path.write_text(to_toml(cfg) if fmt == "toml" else json.dumps(cfg), encoding="utf-8")
    return path


def load_and_validate(tmp_path: Path, cfg: dict, fmt: str = "toml", schema=None) -> dict:
    path = write_config(tmp_path, cfg, fmt)
    return validate_user_config(load_config_file(str(path)), schema or build_schema(), str(path))


def config_error(tmp_path: Path, cfg: dict, fmt: str = "toml", schema=None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_and_validate(tmp_path, cfg, fmt, schema)
    return str(exc.value)


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(list(argv))


def resolve_config(tmp_path: Path, cfg: dict, *argv: str, use_cli: bool = True):
    return resolve(load_and_validate(tmp_path, cfg), cli(*argv) if use_cli else None)


def one_dataset(kind: str = DB, general: dict | None = None, dataset: dict | None = None, subset: dict | None = None) -> dict:
    cfg: dict = {"datasets": [{**(dataset or {}), "subsets": [{**BASE_SUBSET[kind], **(subset or {})}]}]}
    if general is not None:
        cfg["general"] = general
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# 1. Every key is accepted where sd-scripts accepts it, from TOML and JSON files.


@pytest.mark.parametrize("fmt", ["toml", "json"])
@pytest.mark.parametrize("kind,level,key,value", ACCEPT_CASES)
def test_key_accepted_at_level(tmp_path, fmt, kind, level, key, value):
    general = {"resolution": 512}
    dataset, subset = {}, {}
    {"general": general, "dataset": dataset, "subset": subset}[level][key] = value
    validated = load_and_validate(tmp_path, one_dataset(kind, general, dataset, subset), fmt)

    ds = validated["datasets"][0]
    assert ds["type"] == kind
    table = {"general": validated["general"], "dataset": ds, "subset": ds["subsets"][0]}[level]
    assert key in table
    if isinstance(value, list):
        assert list(table[key]) == value
    else:
        assert table[key] == value


def test_realistic_toml_file(tmp_path):
    """A hand-written config in the style of sd-scripts' docs, literal strings and comments included."""
    path = tmp_path / "cfg.toml"
    path.write_text(
        r"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# a DreamBooth dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'C:\hoge'
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = 'C:\fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'C:\reg'
  class_tokens = 'human'
  keep_tokens = 1

# a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2
flip_aug = true
color_aug = false

  [[datasets.subsets]]
  image_dir = 'C:\piyo'
  metadata_file = 'C:\piyo\piyo_md.json'
""",
        encoding="utf-8",
    )
    datasets = resolve(validate_user_config(load_config_file(str(path)), build_schema()), cli())
    assert [d.kind for d in datasets] == [DB, FT]
    db, ft = datasets
    assert db.resolution == (512, 512) and db.batch_size == 4
    assert [s.image_dir for s in db.subsets] == [r"C:\hoge", r"C:\fuga", r"C:\reg"]
    assert [s.caption.keep_tokens for s in db.subsets] == [2, 3, 1]
    assert [s.is_reg for s in db.subsets] == [False, False, True]
    assert all(s.caption_extension == ".txt" and s.caption.shuffle_caption for s in db.subsets)
    assert ft.resolution == (768, 768) and ft.batch_size == 2
    assert ft.subsets[0].metadata_file == r"C:\piyo\piyo_md.json"
    assert ft.subsets[0].flip_aug is True and ft.subsets[0].color_aug is False
    assert ft.subsets[0].caption.keep_tokens == 1  # from [general]


def test_json_file_with_same_content_as_toml(tmp_path):
    cfg = one_dataset(DB, {"resolution": [512, 768], "flip_aug": True}, {"batch_size": 2}, {"num_repeats": 4})
    from_toml = load_and_validate(tmp_path, cfg, "toml")
    from_json = load_and_validate(tmp_path, cfg, "json")
    assert from_toml == from_json


# ---------------------------------------------------------------------------------------------------------------------
# 2. Unknown keys, keys at the wrong level, wrong types.


@pytest.mark.parametrize("kind,level,key", REJECT_CASES)
def test_key_rejected_at_wrong_level(tmp_path, kind, level, key):
    general = {"resolution": 512}
    dataset, subset = {}, {}
    {"general": general, "dataset": dataset, "subset": subset}[level][key] = ALL_KEYS[key]
    msg = config_error(tmp_path, one_dataset(kind, general, dataset, subset))
    assert f"'{key}'" in msg
    assert f"{LEVEL_PATH[level]}:" in msg
    assert _valid_level_label(key) in msg  # says where the key does belong


def test_unknown_key_suggests_nearest_valid_key(tmp_path):
    cfg = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "a"}, {"image_dir": "b", "num_repeat": 10}]}]}
    msg = config_error(tmp_path, cfg)
    assert "datasets[0].subsets[1]" in msg
    assert "'num_repeat'" in msg
    assert "'num_repeats'" in msg
    assert "datasets[0].subsets[0]" not in msg


def test_misspelled_dataset_key_suggests_nearest(tmp_path):
    msg = config_error(tmp_path, {"datasets": [{"resoluton": 512, "subsets": [{"image_dir": "a"}]}]})
    assert "datasets[0]" in msg and "'resoluton'" in msg and "'resolution'" in msg


def test_validation_split_in_subset_says_dataset_level(tmp_path):
    """docs/validation.md puts validation_split in a subset; the schema only has it at dataset level."""
    msg = config_error(tmp_path, one_dataset(DB, {"resolution": 512}, subset={"validation_split": 0.1}))
    assert "datasets[0].subsets[0]" in msg
    assert "'validation_split'" in msg
    assert "[[datasets]]" in msg and "[general]" in msg


def test_validation_split_in_subset_suggests_no_unrelated_key(tmp_path):
    msg = config_error(tmp_path, one_dataset(DB, {"resolution": 512}, subset={"validation_split": 0.1}))
    assert "did you mean" not in msg


def test_image_dir_in_general_belongs_in_subsets(tmp_path):
    msg = config_error(tmp_path, one_dataset(DB, {"resolution": 512, "image_dir": "x"}))
    assert "general:" in msg and "'image_dir'" in msg and "[[datasets.subsets]]" in msg


def test_is_reg_in_finetuning_subset(tmp_path):
    msg = config_error(tmp_path, one_dataset(FT, {"resolution": 512}, subset={"is_reg": True}))
    assert "datasets[0].subsets[0]" in msg and "'is_reg'" in msg and "DreamBooth" in msg


@pytest.mark.parametrize("level", ["general", "dataset"])
def test_interpolation_type_suggests_resize_interpolation(tmp_path, level):
    """docs/flux_train_network.md shows interpolation_type; only resize_interpolation exists."""
    general, dataset = {"resolution": 512}, {}
    (general if level == "general" else dataset)["interpolation_type"] = "lanczos"
    msg = config_error(tmp_path, one_dataset(DB, general, dataset))
    assert f"{LEVEL_PATH[level]}:" in msg
    assert "'interpolation_type'" in msg and "'resize_interpolation'" in msg


def test_unknown_top_level_key(tmp_path):
    msg = config_error(tmp_path, {"generall": {}, **one_dataset(DB, {"resolution": 512})})
    assert "'generall'" in msg and "'general'" in msg


def test_unknown_key_without_near_match_lists_valid_keys(tmp_path):
    msg = config_error(tmp_path, one_dataset(DB, {"resolution": 512, "zzzzqqqq": 1}))
    assert "general:" in msg and "'zzzzqqqq'" in msg
    assert "num_repeats" in msg  # some list of what is valid there


WRONG_TYPES = [
    ("subset", "num_repeats", "10"),
    ("subset", "keep_tokens", True),  # bool for int
    ("subset", "image_dir", 5),
    ("subset", "face_crop_aug_range", [2.0]),
    ("subset", "custom_attributes", "diff_output_preservation"),
    ("general", "flip_aug", 1),
    ("general", "batch_size", True),  # bool for int
    ("general", "caption_dropout_rate", "0.1"),
    ("general", "resize_interpolation", "sinc"),
    ("dataset", "resolution", [512]),
    ("dataset", "resolution", [512, 512, 512]),
    ("dataset", "resolution", "512"),
    ("dataset", "resolution", [0, 512]),
    ("dataset", "resolution", [512.0, 512.0]),
    ("dataset", "enable_bucket", "true"),
    ("dataset", "validation_split", False),  # bool for float
    ("dataset", "min_bucket_reso", 256.0),
]


@pytest.mark.parametrize("fmt", ["toml", "json"])
@pytest.mark.parametrize("level,key,value", WRONG_TYPES, ids=[f"{lv}-{k}-{v!r}" for lv, k, v in WRONG_TYPES])
def test_wrong_type_rejected(tmp_path, fmt, level, key, value):
    general, dataset, subset = {"resolution": 512}, {}, {}
    {"general": general, "dataset": dataset, "subset": subset}[level][key] = value
    msg = config_error(tmp_path, one_dataset(DB, general, dataset, subset), fmt)
    assert f"{LEVEL_PATH[level]}:" in msg
    assert f"'{key}'" in msg


def test_missing_required_key_is_named(tmp_path):
    cfg = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "a"}, {"num_repeats": 2}]}]}
    msg = config_error(tmp_path, cfg)
    assert "datasets[0].subsets[1]" in msg and "image_dir" in msg


def test_controlnet_subset_needs_both_dirs(tmp_path):
    cfg = {"datasets": [{"resolution": 512, "subsets": [{"conditioning_data_dir": "c"}]}]}
    msg = config_error(tmp_path, cfg)
    assert "datasets[0].subsets[0]" in msg and "image_dir" in msg


def test_mixed_dreambooth_and_finetuning_subsets_rejected(tmp_path):
    cfg = {
        "general": {"resolution": 512},
        "datasets": [
            {"subsets": [{"image_dir": "ok"}]},
            {"subsets": [{"image_dir": "a"}, {"metadata_file": "m.json"}]},
        ],
    }
    msg = config_error(tmp_path, cfg)
    assert "datasets[1]" in msg
    assert "datasets[0]" not in msg
    assert "mix" in msg.lower()


def test_several_errors_reported_together(tmp_path):
    cfg = {
        "general": {"resolution": 512, "flip_aug": 1},
        "datasets": [
            {"batch_sise": 2, "subsets": [{"image_dir": "a", "num_repeats": "10"}]},
            {"subsets": [{"image_dir": "b", "validation_split": 0.2}]},
        ],
    }
    msg = config_error(tmp_path, cfg)
    for fragment in (
        "general:",
        "'flip_aug'",
        "datasets[0]:",
        "'batch_sise'",
        "datasets[0].subsets[0]:",
        "'num_repeats'",
        "datasets[1].subsets[0]:",
        "'validation_split'",
    ):
        assert fragment in msg
    assert "4 problem" in msg


def test_error_message_names_the_file(tmp_path):
    path = write_config(tmp_path, one_dataset(DB, {"resolution": 512, "num_repeat": 2}))
    with pytest.raises(ConfigError, match="num_repeat") as exc:
        validate_user_config(load_config_file(str(path)), build_schema(), str(path))
    assert str(path) in str(exc.value)


@pytest.mark.parametrize(
    "cfg,fragment",
    [
        ({}, "datasets"),
        ({"datasets": []}, "datasets"),
        ({"datasets": {"subsets": []}}, "datasets"),
        ({"datasets": [{"resolution": 512}]}, "datasets[0]"),
        ({"datasets": [{"resolution": 512, "subsets": []}]}, "datasets[0]"),
    ],
    ids=["empty", "no-datasets", "datasets-not-list", "no-subsets", "empty-subsets"],
)
def test_structural_errors(cfg, fragment):
    with pytest.raises(ConfigError) as exc:
        validate_user_config(cfg, build_schema())
    assert fragment in str(exc.value)


def test_unparsable_and_missing_files(tmp_path):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[general\nresolution = 512\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config_file(str(bad_toml))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"datasets": [', encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.json"):
        load_config_file(str(bad_json))
    with pytest.raises(ConfigError, match="nothere.toml"):
        load_config_file(str(tmp_path / "nothere.toml"))
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text("general: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="toml"):
        load_config_file(str(yaml))


def test_schema_without_dropout_rejects_dropout_keys(tmp_path):
    schema = build_schema(support_dropout=False)
    msg = config_error(tmp_path, one_dataset(DB, {"resolution": 512}, subset={"caption_dropout_rate": 0.1}), schema=schema)
    assert "datasets[0].subsets[0]" in msg and "'caption_dropout_rate'" in msg


def test_schema_without_finetuning_rejects_finetuning_dataset(tmp_path):
    schema = build_schema(support_finetuning=False)
    msg = config_error(tmp_path, one_dataset(FT, {"resolution": 512}), schema=schema)
    assert "datasets[0]" in msg


def test_schema_without_controlnet_rejects_conditioning_dir(tmp_path):
    schema = build_schema(support_controlnet=False)
    msg = config_error(tmp_path, one_dataset(CN, {"resolution": 512}), schema=schema)
    assert "datasets[0].subsets[0]" in msg and "'conditioning_data_dir'" in msg


# ---------------------------------------------------------------------------------------------------------------------
# 3. Inheritance: subset -> dataset -> general -> command line -> default.

CAPTION_KEYS = {
    "shuffle_caption",
    "caption_separator",
    "keep_tokens",
    "keep_tokens_separator",
    "secondary_separator",
    "enable_wildcard",
    "caption_prefix",
    "caption_suffix",
    "token_warmup_min",
    "token_warmup_step",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
}
LEVELS = ("subset", "dataset", "general", "cli", "default")

# key -> (subset value, dataset value, general value, (command line argv, its value) or None, default)
# Values are pairwise different so the winner is visible; booleans alternate so that a False
# at a higher level must beat a True below it.
SUBSET_INHERIT = {
    "num_repeats": (5, 4, 3, (["--dataset_repeats", "2"], 2), 1),
    "caption_extension": (".a", ".b", ".c", (["--caption_extension", ".txt"], ".txt"), ".caption"),
    "class_tokens": ("sks dog", "sks cat", "sks", None, None),
    "cache_info": (False, True, False, (["--cache_info"], True), False),
    "color_aug": (False, True, False, (["--color_aug"], True), False),
    "flip_aug": (False, True, False, (["--flip_aug"], True), False),
    "random_crop": (False, True, False, (["--random_crop"], True), False),
    "face_crop_aug_range": ([1.0, 2.0], [2.0, 3.0], [3.0, 4.0], (["--face_crop_aug_range", "4,5"], (4.0, 5.0)), None),
    "resize_interpolation": ("nearest", "bilinear", "bicubic", (["--resize_interpolation", "box"], "box"), None),
    "custom_attributes": ({"a": 1}, {"b": 2}, {"c": 3}, None, {}),
    "shuffle_caption": (False, True, False, (["--shuffle_caption"], True), False),
    "enable_wildcard": (False, True, False, (["--enable_wildcard"], True), False),
    "caption_separator": (";", "|", "/", (["--caption_separator", "+"], "+"), ","),
    "keep_tokens": (4, 3, 2, (["--keep_tokens", "1"], 1), 0),
    "keep_tokens_separator": ("|||", "###", "@@@", (["--keep_tokens_separator", "%%%"], "%%%"), ""),
    "secondary_separator": (";;;", ":::", "^^^", (["--secondary_separator", "~~~"], "~~~"), None),
    "caption_prefix": ("p1", "p2", "p3", (["--caption_prefix", "p4"], "p4"), None),
    "caption_suffix": ("s1", "s2", "s3", (["--caption_suffix", "s4"], "s4"), None),
    "token_warmup_min": (5, 4, 3, (["--token_warmup_min", "2"], 2), 1),
    "token_warmup_step": (0.4, 0.3, 0.2, (["--token_warmup_step", "0.1"], 0.1), 0),
    "caption_dropout_rate": (0.4, 0.3, 0.2, (["--caption_dropout_rate", "0.1"], 0.1), 0.0),
    "caption_dropout_every_n_epochs": (5, 4, 3, (["--caption_dropout_every_n_epochs", "2"], 2), 0),
    "caption_tag_dropout_rate": (0.4, 0.3, 0.2, (["--caption_tag_dropout_rate", "0.1"], 0.1), 0.0),
}
DATASET_INHERIT = {
    "batch_size": (None, 4, 3, (["--train_batch_size", "2"], 2), 1),
    "resolution": (None, [640, 704], 768, (["--resolution", "512,768"], (512, 768)), None),
    "enable_bucket": (None, True, False, (["--enable_bucket"], True), False),
    "bucket_no_upscale": (None, True, False, (["--bucket_no_upscale"], True), False),
    "bucket_reso_steps": (None, 32, 16, (["--bucket_reso_steps", "8"], 8), 64),
    "min_bucket_reso": (None, 320, 288, (["--min_bucket_reso", "192"], 192), 256),
    "max_bucket_reso": (None, 960, 896, (["--max_bucket_reso", "832"], 832), 1024),
    "validation_split": (None, 0.3, 0.2, (["--validation_split", "0.1"], 0.1), 0.0),
    "validation_seed": (None, 4, 3, (["--validation_seed", "2"], 2), None),
    "network_multiplier": (None, 0.5, 0.25, None, 1.0),
    "resize_interpolation": (None, "nearest", "bilinear", (["--resize_interpolation", "box"], "box"), None),
}


def _expected(key: str, level: str, spec: tuple):
    sub, ds, gen, cli_spec, default = spec
    value = {"subset": sub, "dataset": ds, "general": gen, "cli": cli_spec and cli_spec[1], "default": default}[level]
    if key == "resolution" and isinstance(value, int):
        return (value, value)
    return tuple(value) if isinstance(value, list) else value


def _inherit_cases(table: dict, levels: tuple[str, ...]):
    for key, spec in table.items():
        for level in levels:
            if level == "cli" and spec[3] is None:
                continue
            if key == "resolution" and level == "default":
                continue
            yield pytest.param(key, level, id=f"{key}-wins-at-{level}")


def _build_levels(key: str, spec: tuple, winner: str, base_general: dict):
    """Set the key at `winner` and every level below it."""
    sub_v, ds_v, gen_v, cli_spec, _ = spec
    below = LEVELS[LEVELS.index(winner) :]
    general, dataset, subset = dict(base_general), {}, {}
    if "subset" in below and sub_v is not None:
        subset[key] = sub_v
    if "dataset" in below:
        dataset[key] = ds_v
    if "general" in below:
        general[key] = gen_v
    args = list(cli_spec[0]) if ("cli" in below and cli_spec) else []
    return general, dataset, subset, args


@pytest.mark.parametrize("key,level", list(_inherit_cases(SUBSET_INHERIT, LEVELS)))
def test_subset_key_inheritance(tmp_path, key, level):
    spec = SUBSET_INHERIT[key]
    general, dataset, subset, argv = _build_levels(key, spec, level, {"resolution": 512})
    (ds,) = resolve_config(tmp_path, one_dataset(DB, general, dataset, subset), *argv)
    (sub,) = ds.subsets
    expected = _expected(key, level, spec)
    if key in CAPTION_KEYS:
        assert isinstance(sub.caption, CaptionOptions)
        got = getattr(sub.caption, key)
    else:
        got = getattr(sub, key)
    if isinstance(got, list):
        got = tuple(got)
    assert got == expected
    assert type(got) is type(expected) or isinstance(expected, float)


@pytest.mark.parametrize("key,level", list(_inherit_cases(DATASET_INHERIT, LEVELS[1:])))
def test_dataset_key_inheritance(tmp_path, key, level):
    spec = DATASET_INHERIT[key]
    base = {} if key == "resolution" else {"resolution": 512}
    general, dataset, _, argv = _build_levels(key, spec, level, base)
    (ds,) = resolve_config(tmp_path, one_dataset(DB, general, dataset), *argv)
    got = getattr(ds, key)
    assert (tuple(got) if isinstance(got, list) else got) == _expected(key, level, spec)


def test_defaults_without_command_line():
    (ds,) = resolve(validate_user_config(one_dataset(DB, {"resolution": 512}), build_schema()), None)
    (sub,) = ds.subsets
    assert (ds.batch_size, ds.enable_bucket, ds.bucket_no_upscale) == (1, False, False)
    assert (ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps) == (256, 1024, 64)
    assert (ds.validation_split, ds.validation_seed, ds.network_multiplier) == (0.0, None, 1.0)
    assert ds.prior_loss_weight == 1.0
    assert (sub.num_repeats, sub.caption_extension, sub.is_reg, sub.alpha_mask, sub.cache_info) == (
        1,
        ".caption",
        False,
        False,
        False,
    )
    assert (sub.flip_aug, sub.color_aug, sub.random_crop, sub.face_crop_aug_range) == (False, False, False, None)
    assert sub.caption == CaptionOptions()
    c = sub.caption
    assert (c.shuffle_caption, c.caption_separator, c.keep_tokens, c.keep_tokens_separator) == (False, ",", 0, "")
    assert (c.secondary_separator, c.enable_wildcard, c.token_warmup_min, c.token_warmup_step) == (None, False, 1, 0)
    assert (c.caption_dropout_rate, c.caption_dropout_every_n_epochs, c.caption_tag_dropout_rate) == (0.0, 0, 0.0)


def test_command_line_only_parameters():
    args = cli("--prior_loss_weight", "0.5", "--max_token_length", "225")
    (ds,) = resolve(validate_user_config(one_dataset(DB, {"resolution": 512}), build_schema()), args)
    assert (ds.prior_loss_weight, ds.max_token_length) == (0.5, 225)


def test_reading_only_parser_resolves_training_defaults():
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser, training=False)
    args = parser.parse_args(["--resolution", "512"])
    (ds,) = resolve(validate_user_config(one_dataset(DB), build_schema()), args)
    assert (ds.prior_loss_weight, ds.max_token_length, ds.resolution) == (1.0, None, (512, 512))


@pytest.mark.parametrize("key", ["prior_loss_weight", "max_token_length", "debug_dataset"])
def test_command_line_only_parameters_not_in_toml(tmp_path, key):
    msg = config_error(tmp_path, one_dataset(DB, {"resolution": 512, key: 1}))
    assert f"'{key}'" in msg


def test_alpha_mask_subset_or_command_line(tmp_path):
    cfg = {
        "general": {"resolution": 512},
        "datasets": [{"subsets": [{"image_dir": "a", "alpha_mask": False}, {"image_dir": "b"}]}],
    }
    (ds,) = resolve_config(tmp_path, cfg, "--alpha_mask")
    assert [s.alpha_mask for s in ds.subsets] == [False, True]


def test_is_reg_is_subset_only(tmp_path):
    cfg = {"general": {"resolution": 512}, "datasets": [{"subsets": [{"image_dir": "a", "is_reg": True}, {"image_dir": "b"}]}]}
    (ds,) = resolve_config(tmp_path, cfg)
    assert [s.is_reg for s in ds.subsets] == [True, False]


@pytest.mark.parametrize("level", ["subset", "dataset", "general", "cli"])
def test_caption_extension_gets_a_dot(tmp_path, level):
    general, dataset, subset = {"resolution": 512}, {}, {}
    argv = []
    if level == "cli":
        argv = ["--caption_extension", "txt"]
    else:
        {"general": general, "dataset": dataset, "subset": subset}[level]["caption_extension"] = "txt"
    (ds,) = resolve_config(tmp_path, one_dataset(DB, general, dataset, subset), *argv)
    assert ds.subsets[0].caption_extension == ".txt"


def test_old_caption_extention_spelling(tmp_path):
    (ds,) = resolve_config(tmp_path, one_dataset(DB, {"resolution": 512}), "--caption_extention", ".txt")
    assert ds.subsets[0].caption_extension == ".txt"


def test_inheritance_is_per_dataset(tmp_path):
    cfg = {
        "general": {"resolution": 512, "num_repeats": 2, "batch_size": 3},
        "datasets": [
            {"num_repeats": 7, "resolution": [768, 512], "subsets": [{"image_dir": "a"}, {"image_dir": "b", "num_repeats": 9}]},
            {"subsets": [{"image_dir": "a"}]},
        ],
    }
    d0, d1 = resolve_config(tmp_path, cfg, "--train_batch_size", "5", "--dataset_repeats", "11")
    assert [s.num_repeats for s in d0.subsets] == [7, 9]
    assert [s.num_repeats for s in d1.subsets] == [2]
    assert (d0.resolution, d1.resolution) == ((768, 512), (512, 512))
    assert d0.batch_size == d1.batch_size == 3
    assert (d0.name, d1.name) == ("datasets[0]", "datasets[1]")


def test_duplicate_subsets_inside_a_dataset_ignored_across_datasets_kept(tmp_path, caplog):
    cfg = {
        "general": {"resolution": 512},
        "datasets": [
            {"subsets": [{"image_dir": "a"}, {"image_dir": "a", "num_repeats": 5}, {"image_dir": "b"}]},
            {"resolution": 768, "subsets": [{"image_dir": "a"}]},
        ],
    }
    with caplog.at_level(logging.WARNING):
        d0, d1 = resolve_config(tmp_path, cfg)
    assert [s.image_dir for s in d0.subsets] == ["a", "b"]
    assert d0.subsets[0].num_repeats == 1
    assert [s.image_dir for s in d1.subsets] == ["a"]
    assert "datasets[0].subsets[1]" in caplog.text


def test_duplicate_finetuning_subsets_by_metadata_file(tmp_path):
    cfg = {
        "general": {"resolution": 512},
        "datasets": [{"subsets": [{"metadata_file": "m.json"}, {"metadata_file": "m.json", "image_dir": "x"}]}],
    }
    (ds,) = resolve_config(tmp_path, cfg)
    assert len(ds.subsets) == 1


@pytest.mark.parametrize(
    "level,cfg_value",
    [("subset", 0), ("dataset", -1)],
)
def test_num_repeats_below_one_rejected(tmp_path, level, cfg_value):
    cfg = one_dataset(
        DB,
        {"resolution": 512},
        {"num_repeats": cfg_value} if level == "dataset" else {},
        {"num_repeats": cfg_value} if level == "subset" else {},
    )
    with pytest.raises(ConfigError, match="num_repeats"):
        resolve_config(tmp_path, cfg)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Dataset type inference; ControlNet random_crop.


@pytest.mark.parametrize(
    "subsets,kind",
    [
        ([{"image_dir": "a"}, {"image_dir": "b", "is_reg": True}], DB),
        ([{"metadata_file": "a.json"}, {"metadata_file": "b.jsonl", "image_dir": "img"}], FT),
        ([{"image_dir": "a", "conditioning_data_dir": "c"}, {"image_dir": "b", "conditioning_data_dir": "d"}], CN),
    ],
    ids=[DB, FT, CN],
)
def test_dataset_type_inference(tmp_path, subsets, kind):
    cfg = {"general": {"resolution": 512}, "datasets": [{"subsets": subsets}]}
    validated = load_and_validate(tmp_path, cfg)
    assert validated["datasets"][0]["type"] == kind
    (ds,) = resolve(validated, cli())
    assert ds.kind == kind
    assert all(s.kind == kind for s in ds.subsets)


def test_partly_controlnet_dataset_rejected(tmp_path):
    cfg = {
        "general": {"resolution": 512},
        "datasets": [{"subsets": [{"image_dir": "a", "conditioning_data_dir": "c"}, {"image_dir": "b"}]}],
    }
    msg = config_error(tmp_path, cfg)
    assert "datasets[0].subsets[0]" in msg and "conditioning_data_dir" in msg


def test_dreambooth_and_finetuning_accept_random_crop(tmp_path):
    for kind in (DB, FT):
        (ds,) = resolve_config(tmp_path, one_dataset(kind, {"resolution": 512}, subset={"random_crop": True}))
        assert ds.subsets[0].random_crop is True


@pytest.mark.parametrize("level", ["subset", "dataset", "general", "cli"])
def test_controlnet_random_crop_rejected_at_any_level(tmp_path, level):
    """sd-scripts asserts on the resolved subset, so an inherited random_crop is refused too."""
    general, dataset, subset, argv = {"resolution": 512}, {}, {}, []
    if level == "cli":
        argv = ["--random_crop"]
    else:
        {"general": general, "dataset": dataset, "subset": subset}[level]["random_crop"] = True
    path = write_config(tmp_path, one_dataset(CN, general, dataset, subset))
    with pytest.raises(ConfigError) as exc:
        load_dataset_configs(cli("--dataset_config", str(path), *argv))
    assert "random_crop" in str(exc.value) and "datasets[0].subsets[0]" in str(exc.value)


def test_controlnet_random_crop_false_overrides_inherited_true(tmp_path):
    cfg = one_dataset(CN, {"resolution": 512, "random_crop": True}, subset={"random_crop": False})
    (ds,) = resolve_config(tmp_path, cfg, "--random_crop")
    assert ds.subsets[0].random_crop is False


# ---------------------------------------------------------------------------------------------------------------------
# 5. Legacy folder mode and --in_json.


@pytest.fixture
def legacy_dirs(tmp_path):
    train = tmp_path / "train"
    for name in ("10_sks dog", "3_cat", "1_a_b", "misc"):
        (train / name).mkdir(parents=True)
    (train / "notes.txt").write_text("not a folder")
    reg = tmp_path / "reg"
    (reg / "1_dog").mkdir(parents=True)
    (reg / "no_number").mkdir()
    return train, reg


def test_legacy_folders(legacy_dirs, caplog):
    train, reg = legacy_dirs
    with caplog.at_level(logging.WARNING):
        (ds,) = load_dataset_configs(cli("--train_data_dir", str(train), "--reg_data_dir", str(reg), "--resolution", "512"))
    assert ds.kind == DB
    got = {Path(s.image_dir).name: (s.num_repeats, s.class_tokens, s.is_reg) for s in ds.subsets}
    assert got == {
        "10_sks dog": (10, "sks dog", False),
        "3_cat": (3, "cat", False),
        "1_a_b": (1, "a_b", False),
        "1_dog": (1, "dog", True),
    }
    assert {Path(s.image_dir).parent for s in ds.subsets} == {train, reg}
    assert "misc" in caplog.text and "no_number" in caplog.text
    assert ds.resolution == (512, 512)


def test_legacy_folders_take_command_line_values(legacy_dirs):
    train, _ = legacy_dirs
    args = cli(
        "--train_data_dir",
        str(train),
        "--resolution",
        "512,768",
        "--caption_extension",
        "txt",
        "--train_batch_size",
        "3",
        "--flip_aug",
    )
    (ds,) = load_dataset_configs(args)
    assert (ds.resolution, ds.batch_size) == ((512, 768), 3)
    assert all(s.caption_extension == ".txt" and s.flip_aug for s in ds.subsets)
    assert {s.num_repeats for s in ds.subsets} == {10, 3, 1}  # folder repeats beat --dataset_repeats's default


def test_legacy_subsets_function(legacy_dirs):
    train, reg = legacy_dirs
    subsets = dreambooth_subsets_from_folders(str(train), None)
    assert sorted((Path(s["image_dir"]).name, s["num_repeats"]) for s in subsets) == [
        ("10_sks dog", 10),
        ("1_a_b", 1),
        ("3_cat", 3),
    ]
    assert not any(s["is_reg"] for s in subsets)


def test_legacy_zero_repeats_folder_ignored(tmp_path):
    (tmp_path / "0_x").mkdir()
    (tmp_path / "2_y").mkdir()
    subsets = dreambooth_subsets_from_folders(str(tmp_path), None)
    assert [Path(s["image_dir"]).name for s in subsets] == ["2_y"]


def test_legacy_folder_with_non_ascii_digit_ignored(tmp_path):
    (tmp_path / "²_x").mkdir()
    (tmp_path / "2_y").mkdir()
    subsets = dreambooth_subsets_from_folders(str(tmp_path), None)
    assert [Path(s["image_dir"]).name for s in subsets] == ["2_y"]


def test_legacy_missing_train_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as exc:
        load_dataset_configs(cli("--train_data_dir", str(missing), "--resolution", "512"))
    assert "--train_data_dir" in str(exc.value) and str(missing) in str(exc.value)


def test_legacy_missing_reg_dir(legacy_dirs, tmp_path):
    train, _ = legacy_dirs
    with pytest.raises(ConfigError, match="--reg_data_dir"):
        load_dataset_configs(cli("--train_data_dir", str(train), "--reg_data_dir", str(tmp_path / "nope"), "--resolution", "512"))


def test_legacy_train_dir_without_repeat_folders(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError) as exc:
        load_dataset_configs(cli("--train_data_dir", str(tmp_path), "--resolution", "512"))
    assert "--train_data_dir" in str(exc.value) and "<repeats>_<class tokens>" in str(exc.value)


def test_no_dataset_at_all():
    with pytest.raises(ConfigError) as exc:
        load_dataset_configs(cli("--resolution", "512"))
    assert "--dataset_config" in str(exc.value) and "--train_data_dir" in str(exc.value)


def test_legacy_without_resolution(legacy_dirs):
    train, _ = legacy_dirs
    with pytest.raises(ConfigError, match="resolution"):
        load_dataset_configs(cli("--train_data_dir", str(train)))


def test_in_json_makes_finetuning_dataset(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    (ds,) = load_dataset_configs(
        cli("--in_json", str(meta), "--train_data_dir", str(tmp_path), "--resolution", "512", "--dataset_repeats", "4")
    )
    assert ds.kind == FT
    (sub,) = ds.subsets
    assert (sub.metadata_file, sub.image_dir, sub.num_repeats) == (str(meta), str(tmp_path), 4)


def test_in_json_without_train_data_dir():
    raw, source = user_config_from_args(cli("--in_json", "meta.jsonl"))
    assert "--in_json" in source
    (ds,) = resolve(validate_user_config(raw, build_schema(), source), cli("--in_json", "meta.jsonl", "--resolution", "512"))
    assert ds.kind == FT and ds.subsets[0].metadata_file == "meta.jsonl"


@pytest.mark.parametrize("source", ["toml", "in_json"])
def test_finetuning_subset_without_image_dir_is_none(tmp_path, source):
    if source == "toml":
        (ds,) = resolve_config(tmp_path, one_dataset(FT, {"resolution": 512}))
    else:
        (ds,) = load_dataset_configs(cli("--in_json", "meta.jsonl", "--resolution", "512"))
    assert ds.kind == FT
    assert ds.subsets[0].image_dir is None


def test_dataset_config_wins_over_legacy_flags(tmp_path, legacy_dirs, caplog):
    train, _ = legacy_dirs
    path = write_config(tmp_path, one_dataset(DB, {"resolution": 512}, subset={"image_dir": "from_config"}))
    with caplog.at_level(logging.WARNING):
        (ds,) = load_dataset_configs(cli("--dataset_config", str(path), "--train_data_dir", str(train), "--in_json", "x.json"))
    assert [s.image_dir for s in ds.subsets] == ["from_config"]
    assert "--train_data_dir" in caplog.text and "--in_json" in caplog.text


def test_load_dataset_configs_reports_config_errors(tmp_path):
    path = write_config(tmp_path, one_dataset(DB, {"resolution": 512}, subset={"num_repeat": 2}))
    with pytest.raises(ConfigError) as exc:
        load_dataset_configs(cli("--dataset_config", str(path)))
    assert "'num_repeat'" in str(exc.value) and "datasets[0].subsets[0]" in str(exc.value) and str(path) in str(exc.value)


def test_load_dataset_configs_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset_configs(cli("--dataset_config", str(tmp_path / "missing.toml")))


# ---------------------------------------------------------------------------------------------------------------------
# 7. min/max_bucket_reso rounding and bracketing; resolution required.


def _bucket_dataset(tmp_path, resolution, min_reso, max_reso, steps=64, *argv):
    general = {"resolution": resolution, "enable_bucket": True, "bucket_reso_steps": steps}
    if min_reso is not None:
        general["min_bucket_reso"] = min_reso
    if max_reso is not None:
        general["max_bucket_reso"] = max_reso
    (ds,) = resolve_config(tmp_path, one_dataset(DB, general), *argv)
    return ds


@pytest.mark.parametrize(
    "min_reso,max_reso,steps,expected",
    [
        (300, 1000, 64, (256, 1024)),  # min down, max up
        (256, 1024, 64, (256, 1024)),  # already multiples: unchanged
        (319, 961, 32, (288, 992)),
        (257, 1023, 64, (256, 1024)),
        (100, 700, 100, (100, 700)),
        (150, 650, 100, (100, 700)),
    ],
)
def test_bucket_reso_rounding(tmp_path, min_reso, max_reso, steps, expected):
    ds = _bucket_dataset(tmp_path, 512, min_reso, max_reso, steps)
    assert (ds.min_bucket_reso, ds.max_bucket_reso) == expected


def test_bucket_reso_rounding_from_command_line(tmp_path):
    general = {"resolution": 512, "enable_bucket": True}
    (ds,) = resolve_config(tmp_path, one_dataset(DB, general), "--min_bucket_reso", "300", "--max_bucket_reso", "1000")
    assert (ds.min_bucket_reso, ds.max_bucket_reso) == (256, 1024)


def test_max_bucket_reso_rounded_up_before_bracket_check(tmp_path):
    """449 rounds up to 512, which brackets resolution 512: no error."""
    ds = _bucket_dataset(tmp_path, 512, 256, 449)
    assert ds.max_bucket_reso == 512


def test_min_bucket_reso_rounded_down_before_bracket_check(tmp_path):
    """575 rounds down to 512, which brackets resolution 512: no error."""
    ds = _bucket_dataset(tmp_path, 512, 575, 1024)
    assert ds.min_bucket_reso == 512


@pytest.mark.parametrize(
    "resolution,min_reso,max_reso,bad",
    [
        (512, 640, 1024, "min_bucket_reso"),
        (512, 256, 448, "max_bucket_reso"),
        ([512, 768], 640, 1024, "min_bucket_reso"),  # min must be <= the smaller side
        ([512, 768], 256, 700, "max_bucket_reso"),  # 700 -> 704 < 768
    ],
)
def test_bucket_reso_must_bracket_resolution(tmp_path, resolution, min_reso, max_reso, bad):
    with pytest.raises(ConfigError) as exc:
        _bucket_dataset(tmp_path, resolution, min_reso, max_reso)
    assert bad in str(exc.value) and "datasets[0]" in str(exc.value)


def test_bucket_reso_not_checked_without_bucketing(tmp_path):
    (ds,) = resolve_config(tmp_path, one_dataset(DB, {"resolution": 512, "min_bucket_reso": 640, "max_bucket_reso": 300}))
    assert (ds.min_bucket_reso, ds.max_bucket_reso) == (640, 300)


@pytest.mark.parametrize("use_cli", [True, False])
def test_resolution_required(tmp_path, use_cli):
    cfg = {"general": {}, "datasets": [{"resolution": 512, "subsets": [{"image_dir": "a"}]}, {"subsets": [{"image_dir": "b"}]}]}
    with pytest.raises(ConfigError) as exc:
        resolve_config(tmp_path, cfg, use_cli=use_cli)
    assert "datasets[1]" in str(exc.value) and "resolution" in str(exc.value)


@pytest.mark.parametrize("text", ["512x768", "abc", "0", "512,768,3", "-512"])
def test_bad_resolution_on_command_line(tmp_path, text):
    with pytest.raises(ConfigError, match="resolution"):
        resolve_config(tmp_path, one_dataset(DB), "--resolution", text)


# ---------------------------------------------------------------------------------------------------------------------
# 6. The command line: tools/check_dataset.py with a bad config.

ROOT = Path(__file__).resolve().parents[1]


def test_check_dataset_script_reports_bad_key(tmp_path):
    script = ROOT / "tools" / "check_dataset.py"
    if not script.exists():
        pytest.skip("tools/check_dataset.py is not there")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[general]\nresolution = 512\n\n[[datasets]]\n\n  [[datasets.subsets]]\n  image_dir = "img"\n  num_repeat = 10\n',
        encoding="utf-8",
    )
    res = subprocess.run(
        [sys.executable, str(script), "--dataset_config", str(bad)], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "Traceback" not in out
    assert "'num_repeat'" in out and "'num_repeats'" in out and "datasets[0].subsets[0]" in out
