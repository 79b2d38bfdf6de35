"""Sample prompts (.txt/.toml/.json parsing and validation), image names, sampler schedulers, SD preview sampling."""

from __future__ import annotations

import json
import os
import random
import re
from datetime import datetime

import pytest
import torch
from conftest import write_image

from library.sample_prompts import (
    FLUX_DEFAULTS,
    SAMPLER_NAMES,
    SD_UNSUPPORTED_OPTIONS,
    SamplePrompt,
    SamplePromptError,
    load_sample_prompts,
    sample_image_path,
)

# diffusers' k-diffusion schedulers mix NumPy and torch; NumPy 2 warns thousands of times per sampling run.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def cn_image(tmp_path, monkeypatch):
    """A ControlNet image at a path relative to the current directory (as sd-scripts resolves --cn)."""
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "cond" / "edge.png", (64, 64))
    return os.path.join("cond", "edge.png")


# ---------------------------------------------------------------------------------------------------------------------
# .txt


def test_txt_every_option(tmp_path, cn_image):
    path = write(
        tmp_path / "p.txt",
        f"a cat, sitting --n ugly, blurry --w 100 --h 64 --d 42 --s 20 --l 5.5 --g 3 --ss K_Euler_A --cn {cn_image} --fs 3.1\n",
    )
    (p,) = load_sample_prompts(path)
    assert p == SamplePrompt(
        prompt="a cat, sitting",
        negative_prompt="ugly, blurry",
        width=96,  # rounded down to a multiple of 8
        height=64,
        seed=42,
        steps=20,
        scale=5.5,
        guidance=3.0,
        sampler="k_euler_a",
        controlnet_image=cn_image,
        flow_shift=3.1,
        index=0,
    )
    assert p.source == f"{path}:1"


def test_txt_defaults_comments_blank_lines_and_indices(tmp_path):
    path = write(tmp_path / "p.txt", "# a comment\n\n  first prompt  \n   # indented comment\nsecond --N no --D 7\n\n")
    a, b = load_sample_prompts(path)
    assert a == SamplePrompt("first prompt", index=0)
    assert (a.negative_prompt, a.width, a.height, a.seed, a.steps, a.scale, a.guidance, a.sampler) == (
        "",
        512,
        512,
        None,
        30,
        7.5,
        None,
        None,
    )
    assert b == SamplePrompt("second", negative_prompt="no", seed=7, index=1)
    assert b.source == f"{path}:5"


def test_txt_options_only_line_and_empty_negative(tmp_path):
    path = write(tmp_path / "p.txt", "--n lowres --w 64\nx --n\n")
    a, b = load_sample_prompts(path)
    assert (a.prompt, a.negative_prompt, a.width) == ("", "lowres", 64)
    assert (b.prompt, b.negative_prompt) == ("x", "")


@pytest.mark.parametrize(
    "line, message",
    [
        ("a --x 1", "unknown option --x"),
        ("a --width 512", "unknown option --width"),
        ("a --w abc", "--w needs a whole number"),
        ("a --w 5", "at least 8"),
        ("a --h 0", "at least 8"),
        ("a --h -64", "at least 8"),
        ("a --w 1.5", "whole number"),
        ("a --s 0", "between 1 and 1000"),
        ("a --s 1001", "between 1 and 1000"),
        ("a --d -1", "seed"),
        ("a --l high", "--l needs a number"),
        ("a --l nan", "finite"),
        ("a --g -1", "must not be negative"),
        ("a --fs 0", "must be positive"),
        ("a --ss foo", "unknown sampler 'foo'"),
        ("a --cn missing.png", "does not exist"),
        ("a --ctr 0.25", "Lumina"),
        ("a --rcfg 1.0", "Lumina"),
        ("a --w512", "write a space"),
        ("a --w 512 --w 768", "given twice"),
        ("a --w", "--w needs a value"),
        ("a -- b", "option name"),
    ],
)
def test_txt_errors_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "p.txt", f"# header\n\nfine prompt --w 64\n{line}\n")
    with pytest.raises(SamplePromptError) as e:
        load_sample_prompts(path)
    assert f"{path}:4:" in str(e.value)
    assert message in str(e.value)


def test_unknown_sampler_lists_valid_ones(tmp_path):
    with pytest.raises(SamplePromptError, match=r"did you mean 'euler_a'\?.*valid samplers: ddim, pndm"):
        load_sample_prompts(write(tmp_path / "p.txt", "a --ss eulera\n"))


# ---------------------------------------------------------------------------------------------------------------------
# .toml


TOML_ALL = """
[prompt]
negative_prompt = "bad"
width = 256
height = 130
sample_steps = 12
scale = 4
sample_sampler = "euler"
seed = 5

[[prompt.subset]]
prompt = "first"

[[prompt.subset]]
prompt = "second"
negative_prompt = "worse"
width = 64
height = 72
seed = 9
sample_steps = 3
scale = 2.5
guidance_scale = 1.5
sample_sampler = "DPMSolver++"
controlnet_image = "{cn}"
flow_shift = 2
"""


def test_toml_every_key_and_table_defaults(tmp_path, cn_image):
    path = write(tmp_path / "p.toml", TOML_ALL.format(cn=cn_image))
    a, b = load_sample_prompts(path)
    assert a == SamplePrompt(
        "first", negative_prompt="bad", width=256, height=128, seed=5, steps=12, scale=4.0, sampler="euler", index=0
    )
    assert b == SamplePrompt(
        "second",
        negative_prompt="worse",
        width=64,
        height=72,
        seed=9,
        steps=3,
        scale=2.5,
        guidance=1.5,
        sampler="dpmsolver++",
        controlnet_image=cn_image,
        flow_shift=2.0,
        index=1,
    )
    assert b.source == f"{path}: [[prompt.subset]] entry 2 (line 14)"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[prompt]\n[[prompt.subset]]\nprompt = "a"\n\n[[prompt.subset]]\nprompt = "b"\nwidht = 64\n',
            "entry 2 (line 5): unknown key 'widht' in [[prompt.subset]] (did you mean 'width'?)",
        ),
        (
            '[prompt]\n[[prompt.subset]]\nprompt = "a"\nwidth = "64"\n',
            "entry 1 (line 2): 'width' must be a whole number, not str",
        ),
        (
            '[prompt]\n[[prompt.subset]]\nprompt = "a"\nsample_steps = 2000\n',
            "entry 1 (line 2): 'sample_steps' (steps) must be between 1 and 1000",
        ),
        ('[prompt]\n[[prompt.subset]]\nprompt = "a"\nscale = true\n', "'scale' must be a number, not bool"),
        ('[prompt]\n[[prompt.subset]]\nprompt = "a"\ncfg_trunc_ratio = 0.5\n', "Lumina"),
        ('[prompt]\n[[prompt.subset]]\nnegative_prompt = "a"\n', "entry 1 (line 2): no 'prompt' key"),
        ('[prompt]\nwidth = 0\n[[prompt.subset]]\nprompt = "a"\n', "[prompt] table: 'width' must be at least 8"),
        ('[prompt]\nsteps = 4\n[[prompt.subset]]\nprompt = "a"\n', "[prompt] table: unknown key 'steps'"),
        ('[prompt]\nprompt = "a"\n', "no [[prompt.subset]] entries"),
        ('[general]\n[prompt]\n[[prompt.subset]]\nprompt = "a"\n', "unknown top-level table or key 'general'"),
        ("[prompt\n", "not valid TOML"),
    ],
)
def test_toml_errors(tmp_path, text, message):
    path = write(tmp_path / "p.toml", text)
    with pytest.raises(SamplePromptError) as e:
        load_sample_prompts(path)
    assert str(e.value).startswith(f"{path}:")
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------------------------------
# .json


def test_json_dicts_and_strings(tmp_path, cn_image):
    entries = [
        "a line --n neg --w 64 --h 80 --d 3 --s 4 --l 6 --ss pndm",
        {
            "prompt": "a dict",
            "negative_prompt": "n",
            "width": 128,
            "height": 64,
            "seed": 11,
            "sample_steps": 8,
            "scale": 3,
            "guidance_scale": 2.0,
            "sample_sampler": "heun",
            "controlnet_image": cn_image,
            "flow_shift": 1.5,
        },
        {"prompt": "nulls", "seed": None, "sample_sampler": None},
    ]
    path = write(tmp_path / "p.json", json.dumps(entries))
    a, b, c = load_sample_prompts(path)
    assert a == SamplePrompt(
        "a line", negative_prompt="neg", width=64, height=80, seed=3, steps=4, scale=6.0, sampler="pndm", index=0
    )
    assert b == SamplePrompt("a dict", "n", 128, 64, 11, 8, 3.0, 2.0, "heun", cn_image, 1.5, index=1)
    assert c == SamplePrompt("nulls", index=2)
    assert b.source == f"{path}: entry 2"


@pytest.mark.parametrize(
    "data, message",
    [
        (["ok", "bad --s 0"], "entry 2: --s (steps) must be between 1 and 1000"),
        (["ok", {"prompt": "x", "height": -8}], "entry 2: 'height' must be at least 8"),
        ([{"prompt": "x", "sampler": "ddim"}], "entry 1: unknown key 'sampler' in the entry"),
        ([{"prompt": "x", "seed": 1.5}], "entry 1: 'seed' must be a whole number, not float"),
        ([{"prompt": "x", "sample_sampler": "plms"}], "entry 1: unknown sampler 'plms'"),
        (["ok", 3], "entry 2: must be a string or an object"),
        ({"prompt": "x"}, "the top level must be a list"),
    ],
)
def test_json_errors(tmp_path, data, message):
    path = write(tmp_path / "p.json", json.dumps(data))
    with pytest.raises(SamplePromptError) as e:
        load_sample_prompts(path)
    assert f"{path}: {message}" in str(e.value)


def test_json_syntax_error_names_line(tmp_path):
    path = write(tmp_path / "p.json", '[\n"a",\n"b"\n"c"]')
    with pytest.raises(SamplePromptError, match=r"not valid JSON at line 4"):
        load_sample_prompts(path)


# ---------------------------------------------------------------------------------------------------------------------
# Files, defaults, unsupported options


def test_file_level_errors(tmp_path):
    with pytest.raises(SamplePromptError, match=r"missing\.txt: sample prompt file not found"):
        load_sample_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(SamplePromptError, match=r"use a \.txt, \.toml or \.json file"):
        load_sample_prompts(write(tmp_path / "p.yaml", "a"))
    with pytest.raises(SamplePromptError, match="contains no prompts"):
        load_sample_prompts(write(tmp_path / "empty.txt", "# only a comment\n\n"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SamplePromptError, match="not UTF-8"):
        load_sample_prompts(str(tmp_path / "latin1.txt"))


def test_utf8_bom_and_uppercase_extension(tmp_path):
    (tmp_path / "P.TXT").write_bytes("\ufeffcafé --w 64\n".encode())
    (p,) = load_sample_prompts(str(tmp_path / "P.TXT"))
    assert (p.prompt, p.width) == ("café", 64)


def test_family_defaults_and_precedence(tmp_path):
    txt = write(tmp_path / "p.txt", "plain\nown --s 8 --g 2 --l 3\n")
    plain, own = load_sample_prompts(txt, defaults=FLUX_DEFAULTS)
    assert (plain.steps, plain.guidance, plain.scale, plain.width) == (20, 3.5, 1.0, 512)
    assert (own.steps, own.guidance, own.scale) == (8, 2.0, 3.0)
    toml_path = write(
        tmp_path / "p.toml",
        '[prompt]\nsample_steps = 10\n[[prompt.subset]]\nprompt = "a"\n[[prompt.subset]]\nprompt = "b"\nsample_steps = 4\n',
    )
    a, b = load_sample_prompts(toml_path, defaults=FLUX_DEFAULTS)
    assert (a.steps, b.steps, a.guidance) == (10, 4, 3.5)  # entry -> [prompt] table -> family defaults
    assert load_sample_prompts(txt)[0].steps == 30
    with pytest.raises(ValueError, match="unknown sample prompt default 'sample_steps'"):
        load_sample_prompts(txt, defaults={"sample_steps": 3})


def test_unsupported_options_are_rejected_not_ignored(tmp_path):
    txt = write(tmp_path / "p.txt", "fine --l 5\nflux style --g 3.5\n")
    with pytest.raises(SamplePromptError, match=r"p\.txt:2: embedded guidance .* exists only in FLUX"):
        load_sample_prompts(txt, unsupported=SD_UNSUPPORTED_OPTIONS)
    toml_path = write(tmp_path / "p.toml", '[prompt]\nflow_shift = 3.0\n[[prompt.subset]]\nprompt = "a"\n')
    with pytest.raises(SamplePromptError, match=r"p\.toml: \[prompt\] table: flow shift"):
        load_sample_prompts(toml_path, unsupported=SD_UNSUPPORTED_OPTIONS)
    # family defaults are not the file's doing
    (p,) = load_sample_prompts(write(tmp_path / "q.txt", "a\n"), defaults={"guidance": 1.0}, unsupported={"guidance": "no"})
    assert p.guidance == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Image names


def test_sample_image_path_names(tmp_path):
    now = datetime(2026, 1, 2, 3, 4, 5)
    out = str(tmp_path)
    assert sample_image_path(out, "mylora", step=500, index=0, now=now) == f"{out}/sample/mylora_000500_00_20260102030405.png"
    assert sample_image_path(out, "mylora", epoch=1, index=3, now=now) == f"{out}/sample/mylora_e000001_03_20260102030405.png"
    assert (
        sample_image_path(out, "mylora", 1200, 2, index=12, seed=42, now=now)
        == f"{out}/sample/mylora_e000002_12_20260102030405_42.png"
    )
    assert sample_image_path(out, None, step=0, index=1, seed=0, now=now) == f"{out}/sample/000000_01_20260102030405_0.png"
    assert sample_image_path(out, "", step=1234567, index=0, now=now) == f"{out}/sample/1234567_00_20260102030405.png"
    with pytest.raises(ValueError, match="step or the epoch"):
        sample_image_path(out, "x", index=0)
    stamp = os.path.basename(sample_image_path(out, "x", step=1, index=0)).split("_")[3][:14]
    assert re.fullmatch(r"\d{14}", stamp)


# ---------------------------------------------------------------------------------------------------------------------
# Schedulers

EXPECTED_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
}


def test_every_sd_scripts_sampler_is_known():
    assert set(SAMPLER_NAMES) == set(EXPECTED_SCHEDULERS)


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEDULERS))
@pytest.mark.parametrize("v_prediction", [False, True])
def test_make_scheduler(name, v_prediction):
    from library.sampling import make_scheduler
    from library.sd_models import sd_scheduler_config

    sched = make_scheduler(name, sd_scheduler_config(), v_prediction)
    assert type(sched).__name__ == EXPECTED_SCHEDULERS[name]
    assert sched.config.prediction_type == ("v_prediction" if v_prediction else "epsilon")
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "scaled_linear"
    sched.set_timesteps(3)
    assert len(sched.timesteps) >= 3
    if name.startswith("dpmsolver"):
        assert sched.config.algorithm_type == name
    assert make_scheduler(name, sd_scheduler_config(), v_prediction) is not sched  # fresh state each time


def test_make_scheduler_names_are_case_insensitive_and_unknown_is_an_error():
    from library.sampling import make_scheduler

    assert type(make_scheduler("DDIM", {}, False)).__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match=r"unknown sampler 'plms'; valid samplers: ddim, pndm, lms, euler, euler_a"):
        make_scheduler("plms", {}, False)


# ---------------------------------------------------------------------------------------------------------------------
# SD sampling on the tiny model


@pytest.fixture(scope="module")
def tiny_sd():
    from library.tiny_models import build_tiny_sd

    return build_tiny_sd()


def make_encoder(sd, calls=None):
    tokenizer, text_encoder = sd["tokenizer"], sd["text_encoder"]

    def encode(texts):
        if calls is not None:
            calls.append(list(texts))
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return text_encoder(ids).last_hidden_state

    return encode


def sample(sd, prompts, out, calls=None, **kw):
    from library.family_sd import sample_sd_images

    kw.setdefault("step", 10)
    return sample_sd_images(
        sd["unet"],
        sd["vae"],
        sd["text_encoder"],
        sd["tokenizer"],
        sd["scheduler"].config,
        prompts,
        make_encoder(sd, calls),
        str(out),
        "run",
        device="cpu",
        dtype=torch.float32,
        **kw,
    )


def pixels(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size, im.mode, im.tobytes()


def test_sample_sd_images_writes_pngs_of_the_prompt_size(tiny_sd, tmp_path):
    prompts = [
        SamplePrompt("a red cube", negative_prompt="blurry", width=64, height=64, steps=2, seed=1, index=0),
        SamplePrompt("a blue ball", width=64, height=96, steps=2, seed=2, sampler="euler_a", index=1),
    ]
    calls = []
    paths = sample(tiny_sd, prompts, tmp_path, calls, epoch=3)
    assert calls == [["a red cube", "blurry"], ["a blue ball", ""]]  # the trainer's encoder, prompt and negative
    assert [os.path.dirname(p) for p in paths] == [str(tmp_path / "sample")] * 2
    assert re.fullmatch(r"run_e000003_00_\d{14}_1\.png", os.path.basename(paths[0]))
    assert re.fullmatch(r"run_e000003_01_\d{14}_2\.png", os.path.basename(paths[1]))
    assert pixels(paths[0])[:2] == ((64, 64), "RGB")
    assert pixels(paths[1])[:2] == ((64, 96), "RGB")
    assert sorted(os.listdir(tmp_path / "sample")) == sorted(os.path.basename(p) for p in paths)  # no temp files left


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_same_seed_same_image(tiny_sd, tmp_path, sampler):
    prompt = SamplePrompt("a cat", width=64, height=64, steps=2, seed=123, sampler=sampler, scale=3.0)
    (a,) = sample(tiny_sd, [prompt], tmp_path / "a")
    (b,) = sample(tiny_sd, [prompt], tmp_path / "b")
    (c,) = sample(
        tiny_sd, [SamplePrompt("a cat", width=64, height=64, steps=2, seed=124, sampler=sampler, scale=3.0)], tmp_path / "c"
    )
    assert pixels(a) == pixels(b)
    assert pixels(a) != pixels(c)


def test_random_seed_goes_into_the_name_and_reproduces(tiny_sd, tmp_path):
    (a,) = sample(tiny_sd, [SamplePrompt("a dog", width=64, height=64, steps=2)], tmp_path / "a")
    seed = int(re.fullmatch(r"run_000010_00_\d{14}_(\d+)\.png", os.path.basename(a)).group(1))
    (b,) = sample(tiny_sd, [SamplePrompt("a dog", width=64, height=64, steps=2, seed=seed)], tmp_path / "b")
    assert pixels(a) == pixels(b)


def test_sampling_leaves_rng_and_train_modes_unchanged(tiny_sd, tmp_path):
    unet, vae, te = tiny_sd["unet"], tiny_sd["vae"], tiny_sd["text_encoder"]
    unet.train()
    unet.conv_in.eval()  # a frozen part kept in eval mode by the trainer
    te.train()
    vae.eval()
    modes = {name: [m.training for m in model.modules()] for name, model in (("unet", unet), ("vae", vae), ("te", te))}
    torch.manual_seed(1234)
    random.seed(99)
    rng_before, py_before = torch.get_rng_state(), random.getstate()
    try:
        sample(
            tiny_sd,
            [
                SamplePrompt("a", width=64, height=64, steps=2),
                SamplePrompt("b", width=64, height=64, steps=2, sampler="k_dpm_2_a"),
            ],
            tmp_path,
        )
        assert torch.equal(torch.get_rng_state(), rng_before)
        assert random.getstate() == py_before
        assert modes == {
            name: [m.training for m in model.modules()] for name, model in (("unet", unet), ("vae", vae), ("te", te))
        }
    finally:
        unet.eval()
        te.eval()


def test_sd_sampling_refuses_options_it_cannot_honour(tiny_sd, tmp_path):
    with pytest.raises(ValueError, match="sets --g"):
        sample(tiny_sd, [SamplePrompt("a", width=64, height=64, steps=2, guidance=3.5)], tmp_path)
    with pytest.raises(ValueError, match="unknown sampler 'foo'"):
        sample(tiny_sd, [SamplePrompt("a", width=64, height=64, steps=2)], tmp_path, default_sampler="foo")
    assert not os.path.exists(tmp_path / "sample")
