"""Dataset configuration: the sd-scripts dataset TOML/JSON schema, parameter inheritance and the legacy folder mode.

A config has a `[general]` table and `[[datasets]]` tables, each with `[[datasets.subsets]]`. Every parameter is
resolved subset -> dataset -> general -> command line -> default (first value that is set wins). A dataset's type
follows from its subsets: all with `conditioning_data_dir` -> ControlNet, all with `metadata_file` -> fine-tuning,
none with `metadata_file` -> DreamBooth; mixing is an error.

Nothing here imports torch: a bad config is reported before anything heavy loads.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import toml
import voluptuous as vol

from library.bucketing import adjust_min_max_bucket_reso
from library.captions import CaptionOptions
from library.image_util import RESIZE_FILTERS

DREAMBOOTH, FINETUNING, CONTROLNET = "dreambooth", "finetuning", "controlnet"
logger = logging.getLogger(__name__)


class ConfigError(Exception):
    """A dataset configuration that cannot be used. The message names the file, table and key."""


# ---------------------------------------------------------------------------------------------------------------------
# Value validators. Each returns the normalised value or raises vol.Invalid with a message for people.


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise vol.Invalid(f"must be an integer, got {value!r} ({_type_name(value)})")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise vol.Invalid(f"must be a number, got {value!r} ({_type_name(value)})")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise vol.Invalid(f"must be true or false, got {value!r} ({_type_name(value)})")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise vol.Invalid(f"must be a string, got {value!r} ({_type_name(value)})")
    return value


def _table(value: Any) -> dict:
    if not isinstance(value, dict):
        raise vol.Invalid(f"must be a table, got {value!r} ({_type_name(value)})")
    return value


def _float_pair(value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise vol.Invalid(f"must be a list of two numbers, got {value!r}")
    return (_float(value[0]), _float(value[1]))


def _resolution(value: Any) -> tuple[int, int]:
    """An int N (N x N) or [width, height]."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise vol.Invalid(f"must be an integer or [width, height], got {value!r}")
        w, h = _int(value[0]), _int(value[1])
    else:
        try:
            w = h = _int(value)
        except vol.Invalid:
            raise vol.Invalid(f"must be an integer or [width, height], got {value!r}") from None
    if w <= 0 or h <= 0:
        raise vol.Invalid(f"must be positive, got {value!r}")
    return (w, h)


def _interpolation(value: Any) -> str:
    _str(value)
    if value not in RESIZE_FILTERS:
        raise vol.Invalid(f"must be one of {', '.join(RESIZE_FILTERS)}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# The schema: which keys exist at which level (reference §3).

SUBSET_ASCENDABLE = {
    "color_aug": _bool,
    "face_crop_aug_range": _float_pair,
    "flip_aug": _bool,
    "num_repeats": _int,
    "random_crop": _bool,
    "shuffle_caption": _bool,
    "keep_tokens": _int,
    "keep_tokens_separator": _str,
    "secondary_separator": _str,
    "caption_separator": _str,
    "enable_wildcard": _bool,
    "token_warmup_min": _int,
    "token_warmup_step": _float,
    "caption_prefix": _str,
    "caption_suffix": _str,
    "custom_attributes": _table,
    "resize_interpolation": _interpolation,
}
DROPOUT_ASCENDABLE = {
    "caption_dropout_every_n_epochs": _int,
    "caption_dropout_rate": _float,
    "caption_tag_dropout_rate": _float,
}
DREAMBOOTH_ASCENDABLE = {"caption_extension": _str, "class_tokens": _str, "cache_info": _bool}
DREAMBOOTH_DISTINCT = {vol.Required("image_dir"): _str, "is_reg": _bool, "alpha_mask": _bool}
FINETUNING_DISTINCT = {vol.Required("metadata_file"): _str, "image_dir": _str, "alpha_mask": _bool}
CONTROLNET_ASCENDABLE = {"caption_extension": _str, "cache_info": _bool}
CONTROLNET_DISTINCT = {vol.Required("image_dir"): _str, vol.Required("conditioning_data_dir"): _str}
DATASET_ASCENDABLE = {
    "batch_size": _int,
    "bucket_no_upscale": _bool,
    "bucket_reso_steps": _int,
    "enable_bucket": _bool,
    "max_bucket_reso": _int,
    "min_bucket_reso": _int,
    "validation_seed": _int,
    "validation_split": _float,
    "resolution": _resolution,
    "network_multiplier": _float,
    "resize_interpolation": _interpolation,
}
# command-line names that differ from config names
ARGPARSE_TO_CONFIG = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}


def _merge(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        out.update(d)
    return out


def _key_name(key: Any) -> str:
    return str(key.schema) if isinstance(key, vol.Marker) else str(key)


@dataclass(frozen=True)
class SchemaLevels:
    """The tables of one script's schema (which dataset types and caption dropout it supports)."""

    general: dict
    datasets: dict  # type -> dataset table (without "subsets")
    subsets: dict  # type -> subset table


def build_schema(
    support_dreambooth: bool = True,
    support_finetuning: bool = True,
    support_controlnet: bool = True,
    support_dropout: bool = True,
) -> SchemaLevels:
    dropout = DROPOUT_ASCENDABLE if support_dropout else {}
    subsets, datasets = {}, {}
    if support_dreambooth:
        subsets[DREAMBOOTH] = _merge(SUBSET_ASCENDABLE, DREAMBOOTH_DISTINCT, DREAMBOOTH_ASCENDABLE, dropout)
        datasets[DREAMBOOTH] = _merge(DATASET_ASCENDABLE, SUBSET_ASCENDABLE, DREAMBOOTH_ASCENDABLE, dropout)
    if support_finetuning:
        subsets[FINETUNING] = _merge(SUBSET_ASCENDABLE, FINETUNING_DISTINCT, dropout)
        datasets[FINETUNING] = _merge(DATASET_ASCENDABLE, SUBSET_ASCENDABLE, dropout)
    if support_controlnet:
        subsets[CONTROLNET] = _merge(SUBSET_ASCENDABLE, CONTROLNET_DISTINCT, CONTROLNET_ASCENDABLE, dropout)
        datasets[CONTROLNET] = _merge(DATASET_ASCENDABLE, SUBSET_ASCENDABLE, CONTROLNET_ASCENDABLE, dropout)
    general = _merge(
        DATASET_ASCENDABLE,
        SUBSET_ASCENDABLE,
        DREAMBOOTH_ASCENDABLE if support_dreambooth else {},
        CONTROLNET_ASCENDABLE if support_controlnet else {},
        dropout,
    )
    return SchemaLevels(general, datasets, subsets)


_TYPE_LABEL = {DREAMBOOTH: "DreamBooth", FINETUNING: "fine-tuning", CONTROLNET: "ControlNet"}


def _where_key_belongs(key: str, schema: SchemaLevels) -> str | None:
    """Describe the tables where `key` is valid, e.g. "[general] or [[datasets]]"."""
    places = []
    if key in schema.general:
        places.append("[general]")
    kinds = [k for k, table in schema.datasets.items() if key in table]
    if kinds:
        places.append(
            "[[datasets]]"
            + ("" if len(kinds) == len(schema.datasets) else f" of {'/'.join(_TYPE_LABEL[k] for k in kinds)} datasets")
        )
    kinds = [k for k, table in schema.subsets.items() if key in {_key_name(x) for x in table}]
    if kinds:
        places.append(
            "[[datasets.subsets]]"
            + ("" if len(kinds) == len(schema.subsets) else f" of {'/'.join(_TYPE_LABEL[k] for k in kinds)} datasets")
        )
    return " or ".join(places) if places else None


def _check_table(table: Any, spec: dict, where: str, schema: SchemaLevels, errors: list[str]) -> dict:
    """Validate one table against `spec`; append readable messages to `errors`; return the normalised table."""
    if not isinstance(table, dict):
        errors.append(f"{where}: must be a table, got {table!r}")
        return {}
    valid_names = sorted(_key_name(k) for k in spec)
    try:
        return vol.Schema(spec)(table)
    except vol.MultipleInvalid as exc:
        for err in exc.errors:
            key = str(err.path[0]) if err.path else "?"
            if err.error_message == "extra keys not allowed":
                msg = f"{where}: unknown key '{key}'"
                elsewhere = _where_key_belongs(key, schema)
                if elsewhere:
                    msg += f": it is not allowed here; it belongs in {elsewhere}"
                # a key that belongs elsewhere gets a suggestion here only when it is nearly the same word
                near = difflib.get_close_matches(key, valid_names, n=1, cutoff=0.85 if elsewhere else 0.5)
                if near and near[0] != key:
                    msg += f"; did you mean '{near[0]}'?"
                elif not elsewhere:
                    msg += f"; valid keys here: {', '.join(valid_names)}"
            elif err.error_message.startswith("required key not provided"):
                msg = f"{where}: required key '{key}' is missing"
            else:
                msg = f"{where}: key '{key}' {err.error_message}"
            errors.append(msg)
        return {}


def infer_dataset_type(subsets: list, schema: SchemaLevels) -> str | None:
    """DreamBooth, fine-tuning or ControlNet from the subsets' keys; None when they mix."""
    tables = [s for s in subsets if isinstance(s, dict)]
    if CONTROLNET in schema.subsets and tables and all("conditioning_data_dir" in s for s in tables):
        return CONTROLNET
    if all("metadata_file" in s for s in tables) and tables:
        return FINETUNING if FINETUNING in schema.subsets else None
    if not any("metadata_file" in s for s in tables):
        return DREAMBOOTH if DREAMBOOTH in schema.subsets else None
    return None


def validate_user_config(config: Any, schema: SchemaLevels, source: str = "dataset config") -> dict:
    """Check a loaded config against the schema; raise ConfigError listing every problem.

    Returns {"general": {...}, "datasets": [{"type": ..., **keys, "subsets": [...]}]} with normalised values.
    """
    errors: list[str] = []
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: the top level must be a table with [general] and [[datasets]]")
    for key in config:
        if key not in ("general", "datasets"):
            msg = f"(top level): unknown key '{key}'"
            elsewhere = _where_key_belongs(key, schema)
            if elsewhere:
                msg += f": it belongs in {elsewhere}"
            near = difflib.get_close_matches(key, ["general", "datasets"], n=1, cutoff=0.5)
            if near:
                msg += f"; did you mean '{near[0]}'?"
            errors.append(msg)
    general = _check_table(config.get("general", {}), schema.general, "general", schema, errors)

    datasets_raw = config.get("datasets", [])
    if not isinstance(datasets_raw, list):
        errors.append("datasets: must be a list of [[datasets]] tables")
        datasets_raw = []
    if not datasets_raw and not errors:
        errors.append("no [[datasets]] table: add at least one dataset with [[datasets.subsets]]")
    datasets = []
    for i, ds in enumerate(datasets_raw):
        where = f"datasets[{i}]"
        if not isinstance(ds, dict):
            errors.append(f"{where}: must be a table")
            continue
        subsets_raw = ds.get("subsets", [])
        if not isinstance(subsets_raw, list) or not subsets_raw:
            errors.append(f"{where}: needs at least one [[datasets.subsets]] table")
            continue
        kind = infer_dataset_type(subsets_raw, schema)
        if kind is None:
            supported = ", ".join(_TYPE_LABEL[k] for k in schema.subsets)
            errors.append(
                f"{where}: cannot tell the dataset type: DreamBooth subsets (no metadata_file) and fine-tuning subsets "
                f"(with metadata_file) cannot be mixed in one dataset, and this script supports {supported} datasets"
            )
            continue
        table = _check_table({k: v for k, v in ds.items() if k != "subsets"}, schema.datasets[kind], where, schema, errors)
        subsets = [
            _check_table(s, schema.subsets[kind], f"{where}.subsets[{j}]", schema, errors) for j, s in enumerate(subsets_raw)
        ]
        datasets.append({"type": kind, **table, "subsets": subsets})
    if errors:
        raise ConfigError(f"{source} has {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return {"general": general, "datasets": datasets}


def load_config_file(path: str) -> dict:
    """Read a dataset config (.toml or .json); ConfigError names the file and the parse problem."""
    if not os.path.isfile(path):
        raise ConfigError(f"dataset config {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8") as f:
            if ext == ".toml":
                return toml.load(f)
            if ext == ".json":
                return json.load(f)
    except (toml.TomlDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"dataset config {path} cannot be parsed: {e}") from e
    raise ConfigError(f"dataset config {path}: use a .toml or .json file")


# ---------------------------------------------------------------------------------------------------------------------
# Resolved configuration, as the datasets use it.


@dataclass
class SubsetConfig:
    kind: str
    image_dir: str | None
    caption: CaptionOptions
    num_repeats: int = 1
    is_reg: bool = False
    alpha_mask: bool = False
    metadata_file: str | None = None
    conditioning_data_dir: str | None = None
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    cache_info: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    resize_interpolation: str | None = None
    custom_attributes: dict = field(default_factory=dict)


@dataclass
class DatasetConfig:
    kind: str
    name: str  # "datasets[0]", for messages
    resolution: tuple[int, int]
    subsets: list[SubsetConfig]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_seed: int | None = None
    validation_split: float = 0.0
    network_multiplier: float = 1.0
    resize_interpolation: str | None = None
    prior_loss_weight: float = 1.0
    max_token_length: int | None = None


def _default(f) -> Any:
    """A dataclass field's default; None for fields without one (those are required, checked in resolve())."""
    return None if f.default is MISSING else f.default


# Parameters taken from the subset table alone (no inheritance, no command-line fallback).
SUBSET_ONLY = ("image_dir", "metadata_file", "conditioning_data_dir", "is_reg")

_SUBSET_DEFAULTS = {f.name: _default(f) for f in fields(SubsetConfig) if f.name not in ("kind", "caption", "custom_attributes")}
_CAPTION_DEFAULTS = {f.name: _default(f) for f in fields(CaptionOptions)}
_DATASET_DEFAULTS = {f.name: _default(f) for f in fields(DatasetConfig) if f.name not in ("kind", "name", "subsets")}


def _argparse_values(args: argparse.Namespace | None) -> dict:
    """Command-line values under config names; strings like --resolution "512,768" parsed."""
    if args is None:
        return {}
    out = {}
    for name, value in vars(args).items():
        out[ARGPARSE_TO_CONFIG.get(name, name)] = value
    if isinstance(out.get("resolution"), str):
        out["resolution"] = parse_resolution_arg(out["resolution"])
    if isinstance(out.get("face_crop_aug_range"), str):
        out["face_crop_aug_range"] = tuple(float(x) for x in out["face_crop_aug_range"].split(","))
    return out


def parse_resolution_arg(text: str) -> tuple[int, int]:
    """--resolution "512" or "512,768" -> (w, h)."""
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--resolution must be N or W,H, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ConfigError(f"--resolution must be N or W,H with positive numbers, got {text!r}")
    return (parts[0], parts[1])


def resolve(user_config: dict, args: argparse.Namespace | None = None) -> list[DatasetConfig]:
    """Resolve every parameter subset -> dataset -> general -> command line -> default."""
    cli = _argparse_values(args)
    general = user_config.get("general", {})
    result = []
    for i, ds in enumerate(user_config["datasets"]):
        name = f"datasets[{i}]"

        def pick(key: str, *tables: dict, default: Any = None, ds: dict = ds) -> Any:
            for table in (*tables, ds, general, cli):
                if table.get(key) is not None:
                    return table[key]
            return default

        subsets = []
        seen_sources = set()
        for j, sub in enumerate(ds["subsets"]):
            source = sub.get("metadata_file") if ds["type"] == FINETUNING else sub.get("image_dir")
            if source in seen_sources:
                logger.warning(f"{name}.subsets[{j}] repeats {source}, which this dataset already has; it is ignored")
                continue
            seen_sources.add(source)
            values = {key: pick(key, sub, default=default) for key, default in _SUBSET_DEFAULTS.items()}
            for key in SUBSET_ONLY:
                values[key] = sub.get(key, _SUBSET_DEFAULTS[key])
            caption = CaptionOptions(**{key: pick(key, sub, default=d) for key, d in _CAPTION_DEFAULTS.items()})
            values["custom_attributes"] = dict(pick("custom_attributes", sub, default={}) or {})
            ext = values["caption_extension"]
            if ext and not ext.startswith("."):
                values["caption_extension"] = "." + ext
            if values["num_repeats"] < 1:
                raise ConfigError(f"{name}.subsets[{j}]: num_repeats must be at least 1, got {values['num_repeats']}")
            if ds["type"] == CONTROLNET and values["random_crop"]:
                raise ConfigError(
                    f"{name}.subsets[{j}]: random_crop is not supported for ControlNet datasets (set in the subset, "
                    "the dataset, [general] or --random_crop)"
                )
            if values["face_crop_aug_range"] is not None:
                values["face_crop_aug_range"] = tuple(values["face_crop_aug_range"])
            subsets.append(SubsetConfig(kind=ds["type"], caption=caption, **values))

        dvalues = {key: pick(key, default=default) for key, default in _DATASET_DEFAULTS.items()}
        if dvalues["resolution"] is None:
            raise ConfigError(
                f"{name}: resolution is not set: add resolution = 512 (or [width, height]) to [general] or this dataset, or pass --resolution"
            )
        dvalues["resolution"] = tuple(dvalues["resolution"])
        if dvalues["batch_size"] < 1:
            raise ConfigError(f"{name}: batch_size must be at least 1, got {dvalues['batch_size']}")
        if not 0.0 <= dvalues["validation_split"] < 1.0:
            raise ConfigError(f"{name}: validation_split must be in [0, 1), got {dvalues['validation_split']}")
        if dvalues["bucket_reso_steps"] < 1:
            raise ConfigError(f"{name}: bucket_reso_steps must be positive, got {dvalues['bucket_reso_steps']}")
        if dvalues["enable_bucket"] and not dvalues["bucket_no_upscale"]:
            try:
                dvalues["min_bucket_reso"], dvalues["max_bucket_reso"] = adjust_min_max_bucket_reso(
                    dvalues["resolution"], dvalues["min_bucket_reso"], dvalues["max_bucket_reso"], dvalues["bucket_reso_steps"]
                )
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
        result.append(DatasetConfig(kind=ds["type"], name=name, subsets=subsets, **dvalues))
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Legacy mode: --train_data_dir with "<repeats>_<class tokens>" folders, --reg_data_dir, --in_json.


def dreambooth_subsets_from_folders(train_data_dir: str | None, reg_data_dir: str | None) -> list[dict]:
    """One subset per "<repeats>_<class tokens>" subfolder (e.g. "10_sks dog"), sorted by folder name."""
    subsets = []
    for base, is_reg, flag in ((train_data_dir, False, "--train_data_dir"), (reg_data_dir, True, "--reg_data_dir")):
        if base is None:
            continue
        if not os.path.isdir(base):
            raise ConfigError(f"{flag} {base} is not a folder")
        for entry in sorted(os.scandir(base), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            repeats, _, class_tokens = entry.name.partition("_")
            if not re.fullmatch(r"[0-9]+", repeats) or int(repeats) < 1:
                logger.warning(f"{entry.path} is ignored: folder names must look like <repeats>_<class tokens>, e.g. 10_sks dog")
                continue
            subsets.append({"image_dir": entry.path, "num_repeats": int(repeats), "is_reg": is_reg, "class_tokens": class_tokens})
        if not is_reg and not any(not s["is_reg"] for s in subsets):
            raise ConfigError(
                f"{flag} {base} has no image folders named <repeats>_<class tokens> (e.g. 10_sks dog); put the images in such a folder"
            )
    return subsets


def user_config_from_args(args: argparse.Namespace) -> tuple[dict, str]:
    """The raw user config for the command line: the --dataset_config file, or one built from the legacy flags."""
    path = getattr(args, "dataset_config", None)
    if path:
        ignored = [f"--{n}" for n in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, n, None)]
        if ignored:
            logger.warning(f"{', '.join(ignored)} ignored because --dataset_config is given")
        return load_config_file(path), path
    in_json = getattr(args, "in_json", None)
    train_dir = getattr(args, "train_data_dir", None)
    if in_json:
        return {
            "datasets": [
                {"subsets": [{"image_dir": train_dir, "metadata_file": in_json} if train_dir else {"metadata_file": in_json}]}
            ]
        }, "--in_json"
    if not train_dir:
        raise ConfigError(
            "no dataset: pass --dataset_config FILE, or --train_data_dir DIR (with <repeats>_<class tokens> subfolders)"
        )
    return {
        "datasets": [{"subsets": dreambooth_subsets_from_folders(train_dir, getattr(args, "reg_data_dir", None))}]
    }, "--train_data_dir"


def load_dataset_configs(args: argparse.Namespace, schema: SchemaLevels | None = None) -> list[DatasetConfig]:
    """Everything from the command line to resolved dataset configs; raises ConfigError on any problem."""
    schema = schema or build_schema()
    raw, source = user_config_from_args(args)
    return resolve(validate_user_config(raw, schema, source), args)


def run_or_exit(fn: Callable, *a, **kw):
    """Call fn; on ConfigError print the message and exit with status 2 (for scripts)."""
    try:
        return fn(*a, **kw)
    except ConfigError as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
