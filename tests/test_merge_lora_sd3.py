"""tools/merge_lora.py for SD3 / SD3.5 (issue 11 items 7 and 10b): LoRAs of networks.lora_sd3 (sd-scripts' layout) and
diffusers/PEFT SD3 LoRAs merged into Stability AI's single file (its bundled text encoders in place) and into separate
--clip_l / --clip_g / --t5xxl files.

The oracle is outside kiln's loaders: the merged SAI file read by diffusers' `SD3Transformer2DModel.from_single_file`
(local config folder, offline) and the merged encoders by transformers (`load_state_dict`, strict) give the outputs of
kiln's in-memory models with the LoRA applied (network.apply_to), or of diffusers' own model with the PEFT adapter
loaded, on the same inputs. Every tensor the LoRA does not adapt is written bit-identical, in the source's order."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SCRIPT_ENV
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_merge_flux_text_encoders import fail, run

from library.checkpoint_files import UNET_PREFIX
from library.sd3_models import CLIP_G_PREFIX, CLIP_L_PREFIX, PART_PREFIXES, T5XXL_PREFIX, save_sd3_single_file

ENCODERS = ("clip_l", "clip_g", "t5xxl")
PREFIX = {"clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te3_"}
METADATA = {"modelspec.title": "tiny sd3", "origin": "kiln test"}
# per variant: which encoders the SAI file bundles (the others are --clip_l/--clip_g/--t5xxl files), how the LoRA is
# made, the ratios of its LoRAs (a second one adapts the MMDiT only), and bundled encoders also given as a file
CASES = {
    "sd3-medium": dict(bundled=ENCODERS, split_qkv=False, emb_dims=None, ratios=(0.7,), also_file=("clip_l",)),
    "sd3.5-medium": dict(bundled=(), split_qkv=True, emb_dims="[2,3,4,5,6,7]", ratios=(0.7,), also_file=()),
    "sd3.5-large": dict(
        bundled=("clip_l", "clip_g"), split_qkv=False, emb_dims="[2,0,3,0,4,5]", ratios=(0.7, -0.4), also_file=()
    ),
}


def _perturb(model, seed: int):
    """Every parameter moved off its initial value (zero-initialised modulations would hide a misplaced row)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _models(variant: str) -> dict:
    from library.tiny_models import build_tiny_sd3

    c = build_tiny_sd3(variant, seed=1)
    parts = {"transformer": c["transformer"], "vae": c["vae"], "clip_l": c["text_encoder"], "clip_g": c["text_encoder_2"],
             "t5xxl": c["text_encoder_3"]}  # fmt: skip
    for i, name in enumerate(("transformer", "clip_l", "clip_g", "t5xxl")):
        _perturb(parts[name], 10 + i)
    return parts


def _lora(models: dict, path, seed: int, split_qkv: bool = False, emb_dims: str | None = None, encoders: bool = True):
    """An SD3 LoRA of networks.lora_sd3 with random non-zero weights, saved as its state dict (kohya keys); the
    MMDiT-only one without metadata."""
    from networks.lora_sd3 import create_network

    tes = [models[p] for p in ENCODERS] if encoders else []
    args = {"split_qkv": split_qkv, "train_t5xxl": True, **({"emb_dims": emb_dims} if emb_dims else {})}
    net = create_network(1.0, 4, 2.0, tes, models["transformer"], **args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.loras:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    save_file(
        {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
        str(path),
        {"ss_network_module": "networks.lora_sd3"} if encoders else None,
    )
    return net


def _config_folder(folder, transformer) -> str:
    transformer.save_config(os.path.join(folder, "transformer"))
    return str(folder)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """Per variant (built on first use): the models, the SAI file (metadata, VAE, the bundled encoders), separate
    encoder files for the others (float32, transformers' names; T5 with both embedding names, as SAI's bundles), the
    LoRA files and networks, and a diffusers config folder."""
    made = {}

    def get(variant: str) -> dict:
        if variant in made:
            return made[variant]
        case = CASES[variant]
        folder = tmp_path_factory.mktemp(variant.replace(".", "_"))
        models = _models(variant)
        sai = folder / "model.safetensors"
        save_sd3_single_file(str(sai), models["transformer"], vae=models["vae"], **{p: models[p] for p in case["bundled"]},
                             metadata=METADATA)  # fmt: skip
        files = {}
        for part in ENCODERS:
            if part not in case["bundled"] or part in case["also_file"]:
                files[part] = folder / f"{part}.safetensors"
                save_file({k: v.detach().clone().contiguous() for k, v in models[part].state_dict().items()}, str(files[part]))
        loras = [folder / f"lora{i}.safetensors" for i in range(len(case["ratios"]))]
        nets = [_lora(models, loras[0], seed=5, split_qkv=case["split_qkv"], emb_dims=case["emb_dims"])]
        nets += [_lora(models, path, seed=6 + i, encoders=False) for i, path in enumerate(loras[1:])]
        made[variant] = dict(
            models=models,
            sai=sai,
            files=files,
            loras=loras,
            nets=nets,
            config=_config_folder(folder / "config", models["transformer"]),
        )
        return made[variant]

    return get


# ------------------------------------------------------------------------------------------------ outputs and oracles


def _transformer_inputs(config) -> dict:
    g = torch.Generator().manual_seed(3)
    return dict(
        hidden_states=torch.randn(2, config.in_channels, 8, 12, generator=g),  # not square: crops the pos_embed table
        encoder_hidden_states=torch.randn(2, 7, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([120.0, 870.0]),
        return_dict=False,
    )


def _outputs(transformer, encoders: dict) -> dict[str, torch.Tensor]:
    """The transformer's output and each encoder's penultimate and last hidden states (CLIPs: and pooled projection)."""
    g = torch.Generator().manual_seed(4)
    out = {}
    with torch.no_grad():
        if transformer is not None:
            out["transformer"] = transformer(**_transformer_inputs(transformer.config))[0]
        for part, model in encoders.items():
            ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
            res = model(input_ids=ids, output_hidden_states=True)
            out[part + ".penultimate"], out[part + ".last"] = res.hidden_states[-2], res.last_hidden_state
            if part != "t5xxl":
                out[part + ".pooled"] = res.text_embeds
    return out


def _diffusers_transformer(path, config: str):
    """Independent: diffusers' own single-file loader (SAI -> diffusers conversion), offline with a config folder."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_single_file(
        str(path), config=config, subfolder="transformer", local_files_only=True, torch_dtype=torch.float32
    ).eval()


def _transformers_encoder(state: dict[str, torch.Tensor], like):
    """Independent: a transformers model of `like`'s config with the file's tensors (strict)."""
    model = type(like)(like.config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def _encoder_state(path, part: str, bundled: bool) -> dict[str, torch.Tensor]:
    sd = load_file(str(path))
    if not bundled:
        return sd
    prefix = PART_PREFIXES[part]
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _assert_close(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=atol, rtol=0), (k, (got[k] - want[k]).abs().max())


SAI_SECTIONS = (
    (UNET_PREFIX, "lora_unet_"),
    (CLIP_L_PREFIX, "lora_te1_"),
    (CLIP_G_PREFIX, "lora_te2_"),
    (T5XXL_PREFIX, "lora_te3_"),
)


def _comfy_keys(lora: dict[str, torch.Tensor], keys: list[str], sections=SAI_SECTIONS) -> set[str]:
    """The keys a kohya SD3 LoRA adapts by ComfyUI's rule: `lora_unet_` + the MMDiT name with "." -> "_", `lora_te1_`
    / `lora_te2_` / `lora_te3_` + the encoder's transformers name, under the SAI prefixes (or, `sections`, in a file of
    its own)."""
    modules = {k.split(".")[0] for k in lora}
    out = set()
    for k in keys:
        if not k.endswith(".weight"):
            continue
        for prefix, lora_prefix in sections:
            if k.startswith(prefix):
                if lora_prefix + k[len(prefix) : -len(".weight")].replace(".", "_") in modules:
                    out.add(k)
                break
    return out


def _changed(src, dst) -> set[str]:
    """Keys whose tensors differ; asserts the same keys in the same order, shapes, dtypes and metadata."""
    with safe_open(str(src), framework="pt") as a, safe_open(str(dst), framework="pt") as b:
        assert list(a.keys()) == list(b.keys())
        assert b.metadata() == a.metadata()
        out = set()
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and x.shape == y.shape, k
            if not torch.equal(x, y):
                out.add(k)
        return out


def _tool(*args) -> subprocess.CompletedProcess:
    """The real tool, in a process of its own."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "merge_lora.py"), *map(str, args)], capture_output=True,
                         text=True, env=SCRIPT_ENV, cwd=ROOT, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res


# ------------------------------------------------------------------------------------------------------------- merges


@pytest.mark.parametrize("variant", list(CASES))
def test_merged_files_give_the_outputs_of_the_applied_lora(setups, tmp_path, variant):
    """sd3-medium: every encoder bundled in the SAI file (CLIP-L also as a file: both copies get the LoRA);
    sd3.5-medium: a transformer-only file with --clip_l/--clip_g/--t5xxl files, split_qkv and every embedder adapted;
    sd3.5-large: CLIP-L and CLIP-G bundled, --t5xxl as a file, two LoRAs with ratios (the second MMDiT-only)."""
    case, s = CASES[variant], setups(variant)
    models = s["models"]
    out = tmp_path / "merged.safetensors"
    outs = {part: tmp_path / f"{part}_merged.safetensors" for part in s["files"]}
    args = ["--sd3_model", s["sai"], "--models", *s["loras"], "--ratios", *case["ratios"], "--save_to", out]
    for part, path in s["files"].items():
        args += [f"--{part}", path, f"--{part}_save_to", outs[part]]
    res = _tool(*args)
    assert f"wrote {out}" in res.stdout

    merged_tes = {p: _transformers_encoder(_encoder_state(out, p, True), models[p]) for p in case["bundled"]}
    merged_tes.update(
        {p: _transformers_encoder(_encoder_state(outs[p], p, False), models[p]) for p in s["files"] if p not in merged_tes}
    )
    got = _outputs(_diffusers_transformer(out, s["config"]), merged_tes)
    if case["also_file"]:  # the bundled copy and the file given are the same merged encoder
        part = case["also_file"][0]
        again = _outputs(None, {part: _transformers_encoder(_encoder_state(outs[part], part, False), models[part])})
        _assert_close(again, {k: v for k, v in got.items() if k.startswith(part)}, atol=0)

    encoders = {p: models[p] for p in ENCODERS}
    original = _outputs(models["transformer"], encoders)
    for net, ratio in zip(s["nets"], case["ratios"]):
        net.set_multiplier(ratio)
        net.apply_to(True, True)
    try:
        want = _outputs(models["transformer"], encoders)
    finally:
        for net in reversed(s["nets"]):
            net.restore()
    for k in want:  # the LoRA does change every output
        assert not torch.allclose(want[k], original[k], atol=1e-4), k
    _assert_close(got, want)

    # exactly the adapted weights changed (ComfyUI's name rule); the VAE, norms, biases, pos_embed bit-identical
    loras = [load_file(str(p)) for p in s["loras"]]
    adapted = set().union(*(_comfy_keys(lora, list(load_file(str(s["sai"])))) for lora in loras))
    assert _changed(s["sai"], out) == adapted
    assert any(k.startswith(UNET_PREFIX) for k in adapted) and {
        p for p in case["bundled"] if any(k.startswith(PART_PREFIXES[p]) for k in adapted)
    } == set(case["bundled"])
    for part, path in s["files"].items():
        changed = _changed(path, outs[part])
        assert changed and changed == _comfy_keys(loras[0], list(load_file(str(path))), [("", PREFIX[part])])
    if case["emb_dims"] == "[2,3,4,5,6,7]":  # the patch conv and the final layer's (shift, scale) modulation
        assert {UNET_PREFIX + "x_embedder.proj.weight", UNET_PREFIX + "final_layer.adaLN_modulation.1.weight"} <= adapted


def test_peft_lora_gives_diffusers_output(setups, tmp_path):
    """A diffusers/PEFT SD3 LoRA (every Linear and Conv2d of the transformer, saved as diffusers' SD3 pipeline names it)
    merged into the SAI file: diffusers reads it back into the output of its own model with the adapter loaded."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    s = setups("sd3.5-large")
    peft_model = _diffusers_transformer(s["sai"], s["config"])
    targets = [n for n, m in peft_model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    peft_model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    want = _outputs(peft_model, {})
    lora = {"transformer." + k: v.clone().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert "transformer.norm_out.linear.lora_B.weight" in lora and "transformer.pos_embed.proj.lora_A.weight" in lora
    save_file(lora, str(tmp_path / "peft.safetensors"))
    out = tmp_path / "merged.safetensors"
    run("--sd3_model", s["sai"], "--models", tmp_path / "peft.safetensors", "--save_to", out)
    _assert_close(_outputs(_diffusers_transformer(out, s["config"]), {}), want)
    assert not any(k.startswith(("text_encoders.", "first_stage_model.")) for k in _changed(s["sai"], out))


def test_options_lora_into_lora_and_sd_model_detection(setups, tmp_path):
    """An SD3 file given as --sd_model is merged as --sd3_model; --save_precision casts every floating tensor of the
    merged result; --precision bf16 computes in bf16; LoRA-into-LoRA (--concat, and SVD at a rank that holds the sum)
    gives a LoRA that merges into the same file as its inputs, with SD3's ss_network_module."""
    s = setups("sd3.5-large")
    ratios = CASES["sd3.5-large"]["ratios"]
    common = ["--models", *s["loras"], "--ratios", *ratios]
    ref, detected = tmp_path / "ref.safetensors", tmp_path / "detected.safetensors"
    run("--sd3_model", s["sai"], *common, "--save_to", ref, "--t5xxl", s["files"]["t5xxl"], "--t5xxl_save_to",
        tmp_path / "t5.safetensors")  # fmt: skip
    run("--sd_model", s["sai"], *common, "--save_to", detected, "--t5xxl", s["files"]["t5xxl"], "--t5xxl_save_to",
        tmp_path / "t5b.safetensors")  # fmt: skip
    full = load_file(str(ref))
    assert all(torch.equal(v, full[k]) for k, v in load_file(str(detected)).items())

    half = tmp_path / "fp16.safetensors"
    run("--sd3_model", s["sai"], *common, "--save_to", half, "--save_precision", "fp16", "--t5xxl", s["files"]["t5xxl"],
        "--t5xxl_save_to", tmp_path / "t5_fp16.safetensors")  # fmt: skip
    for k, v in load_file(str(half)).items():
        assert torch.equal(v, full[k].half() if full[k].is_floating_point() else full[k]), k
    bf16 = tmp_path / "bf16.safetensors"
    run("--sd3_model", s["sai"], *common, "--save_to", bf16, "--precision", "bf16", "--t5xxl", s["files"]["t5xxl"],
        "--t5xxl_save_to", tmp_path / "t5_bf16.safetensors")  # fmt: skip
    computed_bf16 = load_file(str(bf16))
    changed = _changed(s["sai"], ref)
    for k in changed:
        assert computed_bf16[k].dtype == torch.float32 and torch.allclose(computed_bf16[k], full[k], atol=2e-2), k
    assert any(not torch.equal(computed_bf16[k], full[k]) for k in changed)

    for mode in (["--concat"], ["--new_rank", "16"]):
        joined = tmp_path / f"joined{len(mode)}.safetensors"
        run("--models", *s["loras"], "--ratios", *ratios, *mode, "--save_to", joined)
        with safe_open(str(joined), framework="pt") as f:
            assert f.metadata()["ss_network_module"] == "networks.lora_sd3"
        merged = tmp_path / f"via_lora{len(mode)}.safetensors"
        run("--sd3_model", s["sai"], "--models", joined, "--save_to", merged, "--t5xxl", s["files"]["t5xxl"],
            "--t5xxl_save_to", tmp_path / f"t5_{len(mode)}.safetensors")  # fmt: skip
        via = load_file(str(merged))
        for k in changed:
            assert torch.allclose(via[k], full[k], atol=1e-5), k


# ------------------------------------------------------------------------------------------------------------- errors


def test_errors_name_the_file_and_write_nothing(setups, tmp_path, capsys):
    s = setups("sd3.5-large")
    lora = s["loras"][0]  # has CLIP-L, CLIP-G and T5 modules; the SAI file bundles both CLIPs
    t5 = ["--t5xxl", s["files"]["t5xxl"], "--t5xxl_save_to", tmp_path / "t5.safetensors"]
    out = tmp_path / "merged.safetensors"

    # a LoRA of another family (FLUX, SDXL names): a one-line error naming the LoRA file
    for name, key, shape in (("flux", "lora_unet_double_blocks_0_img_attn_qkv", (384, 128)),
                             ("sdxl", "lora_unet_input_blocks_4_1_proj_in", (640, 640))):  # fmt: skip
        other = tmp_path / f"{name}_lora.safetensors"
        save_file({key + ".lora_down.weight": torch.ones(4, shape[1]), key + ".lora_up.weight": torch.ones(shape[0], 4),
                   key + ".alpha": torch.tensor(4.0)}, str(other))  # fmt: skip
        err = fail(capsys, "--sd3_model", s["sai"], "--models", other, "--save_to", out)
        line = err.strip().splitlines()[-1]  # argparse's usage lines, then the error on one line
        assert "error: " + str(other) in line and key in line and "match nothing" in line
    # an OFT module: check_lora_keys' error, naming the key
    oft = tmp_path / "oft.safetensors"
    save_file({**load_file(str(lora)), "lora_unet_joint_blocks_0_x_block_attn_qkv.oft_blocks": torch.ones(4, 2, 2)}, str(oft))
    err = fail(capsys, "--sd3_model", s["sai"], "--models", oft, "--save_to", out, *t5)
    assert str(oft) in err and "oft_blocks" in err and "OFT" in err
    # a 3.5 Medium LoRA (MMDiT-X attn2 modules) into a 3.5 Large file
    err = fail(capsys, "--sd3_model", s["sai"], "--models", setups("sd3.5-medium")["loras"][0], "--save_to", out, *t5)
    assert "match nothing" in err and "attn2" in err and str(setups("sd3.5-medium")["loras"][0]) in err
    # T5 modules without a T5: the flags to add; a --clip_g file no module needs
    err = fail(capsys, "--sd3_model", s["sai"], "--models", lora, "--save_to", out)
    assert "T5-XXL modules" in err and "holds no T5-XXL" in err and "--t5xxl FILE --t5xxl_save_to OUT" in err
    mmdit_only = s["loras"][1]
    clip_g = tmp_path / "clip_g.safetensors"
    save_file({k: v.contiguous() for k, v in s["models"]["clip_g"].state_dict().items()}, str(clip_g))
    err = fail(capsys, "--sd3_model", s["sai"], "--models", mmdit_only, "--save_to", out, "--clip_g", clip_g,
               "--clip_g_save_to", tmp_path / "g.safetensors")  # fmt: skip
    assert "no LoRA has CLIP-G modules" in err and "--clip_g --clip_g_save_to" in err
    # a model file of another family given as --sd3_model; fp8
    flux = tmp_path / "flux.safetensors"
    save_file({UNET_PREFIX + "double_blocks.0.img_attn.qkv.weight": torch.ones(2, 2)}, str(flux))
    err = fail(capsys, "--sd3_model", flux, "--models", mmdit_only, "--save_to", out)
    assert str(flux) in err and "FLUX.1" in err and "--flux_model" in err
    err = fail(capsys, "--sd3_model", s["sai"], "--models", mmdit_only, "--save_to", out, "--save_precision", "fp8")
    assert "fp8 is for FLUX" in err
    assert not out.exists() and not (tmp_path / "t5.safetensors").exists() and not (tmp_path / "g.safetensors").exists()


def test_existing_output_is_kept_and_the_write_is_atomic(setups, tmp_path, capsys, monkeypatch):
    """An existing --save_to is refused before any work; one that appears just before the merged file is moved into
    place stays as it is, the merge fails naming it and no temporary file is left."""
    s = setups("sd3.5-large")
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"keep me")
    err = fail(capsys, "--sd3_model", s["sai"], "--models", s["loras"][1], "--save_to", out)
    assert "already exists" in err and str(out) in err and out.read_bytes() == b"keep me"
    out.unlink()

    def wrap(real):
        def call(src, dst, *args, **kwargs):
            if os.path.abspath(dst) == str(out) and not os.path.exists(dst):
                out.write_bytes(b"precious")
            return real(src, dst, *args, **kwargs)

        return call

    for name in ("link", "rename", "replace"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    err = fail(capsys, "--sd3_model", s["sai"], "--models", s["loras"][1], "--save_to", out)
    assert out.read_bytes() == b"precious" and str(out) in err
    assert os.listdir(tmp_path) == ["merged.safetensors"]


def test_text_encoder_files_alone(setups, tmp_path, capsys):
    """Without --sd3_model: a LoRA's text-encoder modules go into --clip_l/--clip_g/--t5xxl files alone (the same files
    as with the SAI file merged too); MMDiT modules then need --sd3_model, named in the error."""
    s = setups("sd3.5-medium")
    lora = load_file(str(s["loras"][0]))
    te_only = tmp_path / "te_only.safetensors"
    save_file({k: v for k, v in lora.items() if not k.startswith("lora_unet_")}, str(te_only))

    def enc(tag: str) -> list:
        return [a for p in ENCODERS for a in (f"--{p}", s["files"][p], f"--{p}_save_to", tmp_path / f"{p}_{tag}.safetensors")]

    run("--models", te_only, "--ratios", 0.7, *enc("alone"))
    run("--sd3_model", s["sai"], "--save_to", tmp_path / "full.safetensors", "--models", s["loras"][0], "--ratios", 0.7,
        *enc("full"))  # fmt: skip
    for p in ENCODERS:
        alone, full = load_file(str(tmp_path / f"{p}_alone.safetensors")), load_file(str(tmp_path / f"{p}_full.safetensors"))
        assert list(alone) == list(full) and all(torch.equal(alone[k], full[k]) for k in full), p
        assert _changed(s["files"][p], tmp_path / f"{p}_alone.safetensors")
    err = fail(capsys, "--models", s["loras"][0], *enc("no_model"))
    assert "SD3 MMDiT modules" in err and "--sd3_model FILE --save_to OUT" in err
