"""Sample-prompt files for preview images during training (`--sample_prompts`), and the names of the images.

Three formats, as sd-scripts reads them:

- `.txt`: one prompt per line; blank lines and lines starting with `#` are skipped. Options follow the prompt, each
  introduced by " --" (space, two dashes): `--n negative prompt`, `--w width`, `--h height`, `--d seed`,
  `--s steps` (1..1000), `--l cfg scale`, `--g embedded guidance` (FLUX), `--ss sampler`, `--cn controlnet image`,
  `--fs flow shift` (flow-matching models). Option names are case-insensitive. A prompt therefore cannot contain
  " --" itself.
- `.toml`: a `[prompt]` table whose keys are defaults for every entry, and `[[prompt.subset]]` entries, one per
  image. Keys: prompt, negative_prompt, width, height, seed, sample_steps, scale, guidance_scale, sample_sampler,
  controlnet_image, flow_shift. An entry's key wins over the table's.
- `.json`: a list whose items are dicts with the TOML keys, or strings in the `.txt` line syntax.

Loading is a pure parse with full validation, meant to run when the trainer starts: every problem is a
`SamplePromptError` that names the file and line (or entry) and says what to do, so a typo does not surface hours into
a run. Nothing is silently ignored: an unknown option or key, an option given twice, and the Lumina-only `--ctr` /
`--rcfg` options are errors, and a trainer passes `unsupported` to reject options its model family cannot honour
(`SD_UNSUPPORTED_OPTIONS` for SD1/2 and SDXL).

Width and height are rounded down to multiples of 8 (the VAE's downscale factor); a value below 8 is an error.

Precedence of a value: the prompt's own option or entry key -> the TOML `[prompt]` table -> the family's `defaults`
(e.g. `FLUX_DEFAULTS`) -> the `SamplePrompt` field default (512x512, 30 steps, cfg 7.5).

This module does not import torch.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import toml

# The sampler names of sd-scripts' --sample_sampler / --ss; library.sampling maps each to a diffusers scheduler.
SAMPLER_NAMES = (
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
    "k_lms",
    "k_euler",
    "k_euler_a",
    "k_dpm_2",
    "k_dpm_2_a",
)

MAX_STEPS = 1000
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts

# Per-family defaults for load_sample_prompts(defaults=...). SD1/2, SDXL and SD3 use the SamplePrompt defaults.
SD_DEFAULTS: dict[str, Any] = {}
FLUX_DEFAULTS: dict[str, Any] = {"steps": 20, "guidance": 3.5, "scale": 1.0}

# Options an SD1/2 or SDXL sampler cannot honour, for load_sample_prompts(unsupported=...): field -> reason.
SD_UNSUPPORTED_OPTIONS: dict[str, str] = {
    "guidance": "embedded guidance (--g / guidance_scale) exists only in FLUX; SD models use the cfg scale --l / scale",
    "flow_shift": "flow shift (--fs / flow_shift) applies to flow-matching models (SD3, FLUX) only",
    "controlnet_image": "a ControlNet image (--cn / controlnet_image) is used only when training a ControlNet",
}


class SamplePromptError(Exception):
    """A sample-prompt file that cannot be used. The message names the file, the line or entry, and the fix."""


@dataclass
class SamplePrompt:
    """One preview image to generate. `index` is its position in the prompt file (used in the image's name)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None  # None: a fresh random seed for every image
    steps: int = 30
    scale: float = 7.5  # classifier-free guidance scale
    guidance: float | None = None  # FLUX embedded guidance
    sampler: str | None = None  # None: the trainer's --sample_sampler
    controlnet_image: str | None = None
    flow_shift: float | None = None  # flow-matching sigma shift (SD3/FLUX), overriding the model's
    index: int = 0
    source: str = field(default="", compare=False)  # "file:line N" or "file: entry N", for messages


# ---------------------------------------------------------------------------------------------------------------------
# Options: the .txt letter, the TOML/JSON key and the SamplePrompt field of each.


@dataclass(frozen=True)
class _Option:
    field: str
    letter: str  # in .txt lines, after " --"
    key: str  # in TOML / JSON entries (sd-scripts' prompt-dict key)
    kind: str  # "str", "int", "float", "sampler", "path"


_OPTIONS = (
    _Option("prompt", "", "prompt", "str"),
    _Option("negative_prompt", "n", "negative_prompt", "str"),
    _Option("width", "w", "width", "int"),
    _Option("height", "h", "height", "int"),
    _Option("seed", "d", "seed", "int"),
    _Option("steps", "s", "sample_steps", "int"),
    _Option("scale", "l", "scale", "float"),
    _Option("guidance", "g", "guidance_scale", "float"),
    _Option("sampler", "ss", "sample_sampler", "sampler"),
    _Option("controlnet_image", "cn", "controlnet_image", "path"),
    _Option("flow_shift", "fs", "flow_shift", "float"),
)
_BY_LETTER = {o.letter: o for o in _OPTIONS if o.letter}
_BY_KEY = {o.key: o for o in _OPTIONS}
_BY_FIELD = {o.field: o for o in _OPTIONS}
_OPTIONAL_FIELDS = {"seed", "guidance", "sampler", "controlnet_image", "flow_shift"}  # may be None

# sd-scripts options for Lumina Image 2.0, which kiln does not train: rejected rather than ignored.
_LUMINA_ONLY = {
    "ctr": "cfg_trunc_ratio",
    "rcfg": "renorm_cfg",
}


def _option_help() -> str:
    return ", ".join(f"--{o.letter}" for o in _OPTIONS if o.letter)


def _nearest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _as_written(opt: _Option, from_line: bool) -> str:
    return f"--{opt.letter}" if from_line else f"'{opt.key}'"


def _check_value(opt: _Option, value: Any, from_line: bool) -> Any:
    """Convert (text from a .txt line) or type-check (a TOML/JSON value) one option value; return it normalised.

    Raises ValueError with a message for people (without the location, which the caller adds).
    """
    name = _as_written(opt, from_line)
    if opt.kind in ("str", "sampler", "path"):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, not {type(value).__name__} {value!r}")
        if opt.kind == "sampler":
            sampler = value.strip().lower()
            if sampler not in SAMPLER_NAMES:
                raise ValueError(
                    f"unknown sampler {value!r}{_nearest(sampler, SAMPLER_NAMES)}; valid samplers: {', '.join(SAMPLER_NAMES)}"
                )
            return sampler
        if opt.kind == "path":
            path = value.strip()
            if not path:
                raise ValueError(f"{name} needs an image path")
            if not os.path.isfile(path):
                raise ValueError(
                    f"{name}: image {path!r} does not exist (relative paths are resolved from the current directory)"
                )
            return path
        return value

    if opt.kind == "int":
        if from_line:
            if not re.fullmatch(r"[+-]?\d+", value):
                raise ValueError(f"{name} needs a whole number, got {value!r}")
            number = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, not {type(value).__name__} {value!r}")
            number = value
        if opt.field in ("width", "height"):
            if number < 8:
                raise ValueError(f"{name} must be at least 8 pixels, got {number}")
            return number - number % 8
        if opt.field == "steps" and not 1 <= number <= MAX_STEPS:
            raise ValueError(f"{name} (steps) must be between 1 and {MAX_STEPS}, got {number}")
        if opt.field == "seed" and not 0 <= number <= MAX_SEED:
            raise ValueError(f"{name} (seed) must be between 0 and 2**64-1, got {number}")
        return number

    # float
    if from_line:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name} needs a number, got {value!r}") from None
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, not {type(value).__name__} {value!r}")
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if opt.field == "guidance" and number < 0:
        raise ValueError(f"{name} (guidance) must not be negative, got {number}")
    if opt.field == "flow_shift" and number <= 0:
        raise ValueError(f"{name} (flow shift) must be positive, got {number}")
    return number


# ---------------------------------------------------------------------------------------------------------------------
# Parsers. Each returns (values, sources) where values maps field -> value as given in the file.


def parse_prompt_line(line: str) -> dict[str, Any]:
    """Parse one prompt in the .txt syntax into {field: value}. Raises ValueError (no location) on any problem."""
    # A leading space makes a line that starts with an option ("--n ugly") an empty prompt with options.
    parts = (" " + line.strip()).split(" --")
    values: dict[str, Any] = {"prompt": parts[0].strip()}
    for token in parts[1:]:
        m = re.match(r"([A-Za-z_]+)(.*)$", token, re.S)
        if not m:
            raise ValueError(
                f"'--' must be followed by an option name, found '--{token}'; options: {_option_help()} "
                "(a prompt cannot contain ' --')"
            )
        letter, rest = m.group(1).lower(), m.group(2)
        if letter in _LUMINA_ONLY:
            raise ValueError(
                f"--{letter} ({_LUMINA_ONLY[letter]}) is a Lumina Image 2.0 option of sd-scripts; kiln does not train "
                "Lumina models, remove it"
            )
        opt = _BY_LETTER.get(letter)
        if opt is None:
            raise ValueError(f"unknown option --{m.group(1)}{_nearest(letter, _BY_LETTER)}; options: {_option_help()}")
        if rest and not rest[0].isspace():
            raise ValueError(f"write a space between --{letter} and its value ('--{letter} {rest.strip()}')")
        value = rest.strip()
        if opt.field in values:
            raise ValueError(f"--{letter} is given twice; keep one")
        if value == "" and opt.field != "negative_prompt":
            raise ValueError(f"--{letter} needs a value")
        values[opt.field] = _check_value(opt, value, from_line=True)
    return values


def _parse_entry(entry: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Check a TOML table / JSON dict of sd-scripts keys; return {field: value}. `what` names it in messages."""
    values: dict[str, Any] = {}
    for key, value in entry.items():
        if key in _LUMINA_ONLY.values():
            raise ValueError(f"'{key}' is a Lumina Image 2.0 option of sd-scripts; kiln does not train Lumina models, remove it")
        opt = _BY_KEY.get(key)
        if opt is None:
            raise ValueError(f"unknown key '{key}' in {what}{_nearest(key, _BY_KEY)}; valid keys: {', '.join(_BY_KEY)}")
        if value is None and opt.field in _OPTIONAL_FIELDS:
            continue  # JSON null: not set
        values[opt.field] = _check_value(opt, value, from_line=False)
    return values


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise SamplePromptError(f"{path}: not UTF-8 text ({e}); save the prompt file as UTF-8") from None
    except OSError as e:
        raise SamplePromptError(f"{path}: cannot read the sample prompt file ({e.strerror})") from None


def _entries_txt(path: str, text: str):
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        yield f"{path}:{number}", lambda s=stripped: parse_prompt_line(s), {}


def _entries_toml(path: str, text: str):
    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as e:
        raise SamplePromptError(f"{path}: not valid TOML: {e}") from None
    extra = sorted(set(data) - {"prompt"})
    if extra:
        raise SamplePromptError(
            f"{path}: unknown top-level table or key {', '.join(repr(k) for k in extra)}; a sample prompt TOML has one "
            "[prompt] table with [[prompt.subset]] entries"
        )
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise SamplePromptError(
            f"{path}: no [[prompt.subset]] entries; write a [prompt] table of defaults and one [[prompt.subset]] "
            'table per image, each with prompt = "..."'
        )
    header_lines = [
        n for n, line in enumerate(text.splitlines(), start=1) if re.match(r"\s*\[\[\s*prompt\s*\.\s*subset\s*\]\]", line)
    ]
    subsets = table["subset"]
    try:
        table_values = _parse_entry({k: v for k, v in table.items() if k != "subset"}, "the [prompt] table")
    except ValueError as e:
        raise SamplePromptError(f"{path}: [prompt] table: {e}") from None
    for i, subset in enumerate(subsets):
        where = f"{path}: [[prompt.subset]] entry {i + 1}"
        if len(header_lines) == len(subsets):
            where += f" (line {header_lines[i]})"
        if not isinstance(subset, dict):
            raise SamplePromptError(f"{where}: must be a table of keys, not {type(subset).__name__}")
        yield where, lambda s=subset: _parse_entry(s, "[[prompt.subset]]"), table_values


def _entries_json(path: str, text: str):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SamplePromptError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise SamplePromptError(
            f"{path}: the top level must be a list of prompts (strings in the .txt syntax, or objects with keys "
            f"{', '.join(_BY_KEY)}), not a JSON {type(data).__name__}"
        )
    for i, item in enumerate(data):
        where = f"{path}: entry {i + 1}"
        if isinstance(item, str):
            yield where, lambda s=item: parse_prompt_line(s), {}
        elif isinstance(item, dict):
            yield where, lambda d=item: _parse_entry(d, "the entry"), {}
        else:
            raise SamplePromptError(f"{where}: must be a string or an object, not {type(item).__name__}")


_FORMATS = {".txt": _entries_txt, ".toml": _entries_toml, ".json": _entries_json}


def _check_defaults(defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate the trainer's per-family defaults (field names of SamplePrompt); a mistake here is a bug: ValueError."""
    checked: dict[str, Any] = {}
    for name, value in (defaults or {}).items():
        opt = _BY_FIELD.get(name)
        if opt is None or name == "prompt":
            valid = [f.name for f in fields(SamplePrompt) if f.name not in ("prompt", "index", "source")]
            raise ValueError(f"unknown sample prompt default {name!r}; valid: {', '.join(valid)}")
        checked[name] = None if value is None and name in _OPTIONAL_FIELDS else _check_value(opt, value, from_line=False)
    return checked


def load_sample_prompts(
    path: str,
    defaults: Mapping[str, Any] | None = None,
    *,
    unsupported: Mapping[str, str] | None = None,
) -> list[SamplePrompt]:
    """Read and validate a sample prompt file (.txt, .toml or .json); see the module docstring for the syntax.

    `defaults` maps SamplePrompt field names to the model family's defaults (`FLUX_DEFAULTS`: 20 steps, guidance 3.5,
    cfg 1.0). `unsupported` maps field names to the reason the family cannot honour them (`SD_UNSUPPORTED_OPTIONS`);
    a prompt that sets one is an error. Width and height are rounded down to multiples of 8.

    Raises SamplePromptError naming the file and line/entry for a missing or unreadable file, an unknown extension,
    option or key, a bad number, a width/height below 8, steps outside 1..1000, an unknown sampler, a missing
    ControlNet image, an unsupported option, or a file without prompts.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise SamplePromptError(f"{path}: unknown sample prompt file type {ext or '(none)'!r}; use a .txt, .toml or .json file")
    if not os.path.isfile(path):
        raise SamplePromptError(f"{path}: sample prompt file not found; check the --sample_prompts path")
    base = _check_defaults(defaults)
    unsupported = dict(unsupported or {})
    for name in unsupported:
        if name not in _BY_FIELD or name == "prompt":
            raise ValueError(f"unknown field {name!r} in unsupported")

    prompts: list[SamplePrompt] = []
    for where, parse, inherited in _FORMATS[ext](path, _read_text(path)):
        try:
            given = parse()
        except ValueError as e:
            raise SamplePromptError(f"{where}: {e}") from None
        values = {**base, **inherited, **given}
        if "prompt" not in values:
            raise SamplePromptError(f"{where}: no 'prompt' key; add prompt = \"...\"")
        for name, reason in unsupported.items():
            if given.get(name) is not None:
                raise SamplePromptError(f"{where}: {reason}; remove it for this model")
            if inherited.get(name) is not None:
                raise SamplePromptError(f"{path}: [prompt] table: {reason}; remove it for this model")
        prompts.append(SamplePrompt(**values, index=len(prompts), source=where))
    if not prompts:
        raise SamplePromptError(f"{path}: contains no prompts; add at least one, or leave out --sample_prompts")
    return prompts


# ---------------------------------------------------------------------------------------------------------------------


def sample_image_path(
    output_dir: str,
    output_name: str | None,
    step: int | None = None,
    epoch: int | None = None,
    *,
    index: int,
    seed: int | None = None,
    now: datetime | None = None,
) -> str:
    """Where a preview image goes, named as sd-scripts names it.

    `{output_dir}/sample/{output_name}_{num}_{index:02d}_{YYYYmmddHHMMSS}[_{seed}].png`, where num is `e{epoch:06d}`
    for images made at the end of an epoch (epoch given; it wins over step) and `{step:06d}` otherwise. Without an
    output name the name starts at num. `now` defaults to the current local time.
    """
    if epoch is not None:
        num = f"e{epoch:06d}"
    elif step is not None:
        num = f"{step:06d}"
    else:
        raise ValueError("sample_image_path needs the step or the epoch")
    stamp = (now or datetime.now()).strftime("%Y%m%d%H%M%S")
    prefix = f"{output_name}_" if output_name else ""
    suffix = "" if seed is None else f"_{seed}"
    return os.path.join(output_dir, "sample", f"{prefix}{num}_{index:02d}_{stamp}{suffix}.png")
