"""tools/merge_lora.py for FLUX text encoders: `lora_te1_` into a CLIP-L file, `lora_te3_` into a T5-XXL file (and with
--flux_model, `lora_unet_` into the BFL transformer), checked against the original models with the LoRA applied."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.tiny_models import TINY_FLUX_CLIP_WIDTH, TINY_T5_VOCAB, TINY_VOCAB, tiny_clip_config, tiny_t5_config
from tools.merge_lora import main as merge_main

METADATA = {"format": "pt", "origin": "kiln test"}


@pytest.fixture(scope="module")
def models():
    """Tiny CLIP-L, T5 encoder and FLUX transformer (float32, eval)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from library.tiny_models import tiny_flux_transformer_config

    torch.manual_seed(0)
    clip = CLIPTextModel(tiny_clip_config(hidden_size=TINY_FLUX_CLIP_WIDTH)).eval()
    t5 = T5EncoderModel(tiny_t5_config()).eval()
    transformer = FluxTransformer2DModel(**tiny_flux_transformer_config()).eval()
    return {"clip": clip, "t5": t5, "transformer": transformer}


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    """clip_l.safetensors (`text_model.*`, with int64 position_ids like the real file), t5xxl.safetensors (HF names,
    only shared.weight as real t5xxl files), flux.safetensors (BFL), all float32 with metadata."""
    from library.flux_models import save_flux_transformer_bfl

    folder = tmp_path_factory.mktemp("flux_parts")
    clip = {"text_model." + k: v.clone() for k, v in models["clip"].state_dict().items()}
    clip["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    t5 = {k: v.clone() for k, v in models["t5"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    paths = {"clip_l": str(folder / "clip_l.safetensors"), "t5xxl": str(folder / "t5xxl.safetensors"), "flux": str(folder / "flux.safetensors")}
    save_file(clip, paths["clip_l"], METADATA)
    save_file(t5, paths["t5xxl"], METADATA)
    save_flux_transformer_bfl(paths["flux"], models["transformer"], metadata=METADATA)
    return paths


def make_lora(models, path, seed: int, clip=True, t5=True, transformer=False):
    """A FLUX LoRA (networks.lora_flux) with random non-zero up weights, saved to `path`; returns the network."""
    from networks.lora_flux import create_network

    tes = [models["clip"] if clip else None, models["t5"] if t5 else None]
    net = create_network(1.0, 4, 2.0, tes, models["transformer"] if transformer else None, train_t5xxl=t5)
    torch.manual_seed(seed)
    for m in net.loras:
        torch.nn.init.normal_(m.lora_up.weight, std=0.05)
    save_file({k: v.detach().clone() for k, v in net.state_dict().items()}, str(path))
    return net


def run(*args) -> None:
    assert merge_main([str(a) for a in args]) == 0


def fail(capsys, *args) -> str:
    with pytest.raises(SystemExit) as e:
        merge_main([str(a) for a in args])
    assert e.value.code != 0
    return capsys.readouterr().err


def load_clip(path):
    """Independent oracle: a transformers CLIPTextModel from the merged file (no kiln loader)."""
    from transformers import CLIPTextModel

    sd = {k[len("text_model.") :]: v.float() for k, v in load_file(path).items() if not k.endswith("position_ids")}
    model = CLIPTextModel(tiny_clip_config(hidden_size=TINY_FLUX_CLIP_WIDTH))
    model.load_state_dict(sd)
    return model.eval()


def load_t5(path):
    from transformers import T5EncoderModel

    sd = {k: v.float() for k, v in load_file(path).items()}
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    model = T5EncoderModel(tiny_t5_config())
    model.load_state_dict(sd)
    return model.eval()


def te_outputs(clip, t5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    clip_ids = torch.randint(0, TINY_VOCAB, (2, 9), generator=gen)
    t5_ids = torch.randint(0, TINY_T5_VOCAB, (2, 7), generator=gen)
    with torch.no_grad():
        c = clip(input_ids=clip_ids)
        return [c.last_hidden_state, c.pooler_output, t5(input_ids=t5_ids).last_hidden_state]


def transformer_output(transformer) -> torch.Tensor:
    cfg = transformer.config
    gen = torch.Generator().manual_seed(2)
    inputs = dict(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(1, 6, cfg.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(6, 3),
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )
    with torch.no_grad():
        return transformer(**inputs)[0]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5), (x - y).abs().max()


def changed_keys(src: str, dst: str) -> set[str]:
    """Keys whose tensors differ; asserts same key order, shapes, dtypes, and the source's metadata."""
    with safe_open(src, framework="pt") as a, safe_open(dst, framework="pt") as b:
        assert list(a.keys()) == list(b.keys())
        assert b.metadata() == a.metadata() == METADATA
        out = set()
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert x.dtype == y.dtype and x.shape == y.shape, k
            if not torch.equal(x, y):
                out.add(k)
        return out


def lora_weight_keys(net, prefix: str, file_prefix: str) -> set[str]:
    return {file_prefix + m.lora_name[len(prefix) :] for m in net.loras if m.lora_name.startswith(prefix)}


def test_text_encoders_merge_matches_lora_applied(models, files, tmp_path):
    net = make_lora(models, tmp_path / "te.safetensors", seed=3)
    out = {"clip_l": tmp_path / "clip_merged.safetensors", "t5xxl": tmp_path / "t5_merged.safetensors"}
    run("--models", tmp_path / "te.safetensors", "--ratios", 0.7, "--clip_l", files["clip_l"], "--clip_l_save_to", out["clip_l"],
        "--t5xxl", files["t5xxl"], "--t5xxl_save_to", out["t5xxl"])
    merged = te_outputs(load_clip(str(out["clip_l"])), load_t5(str(out["t5xxl"])))
    original = te_outputs(models["clip"], models["t5"])
    net.set_multiplier(0.7)
    net.apply_to(True, False)
    try:
        with_lora = te_outputs(models["clip"], models["t5"])
    finally:
        for m in net.loras:
            m.restore()
    assert not torch.allclose(with_lora[0], original[0], atol=1e-4)  # the LoRA does change the outputs
    assert_close(merged, with_lora)
    # exactly the adapted weights changed; everything else (embeddings, norms, position_ids, biases) bit-identical
    clip_changed = changed_keys(files["clip_l"], str(out["clip_l"]))
    t5_changed = changed_keys(files["t5xxl"], str(out["t5xxl"]))
    names = {m.lora_name for m in net.loras}
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"} <= names
    assert clip_changed == {k for k in load_file(files["clip_l"]) if "lora_te1_" + k[: -len(".weight")].replace(".", "_") in names}
    assert t5_changed == {k for k in load_file(files["t5xxl"]) if "lora_te3_" + k[: -len(".weight")].replace(".", "_") in names}
    assert len(clip_changed) == sum(n.startswith("lora_te1_") for n in names) and len(t5_changed) == sum(n.startswith("lora_te3_") for n in names)


def test_combined_run_two_loras_and_save_precision(models, files, tmp_path):
    """--flux_model + --clip_l + --t5xxl in one run, two LoRAs (all parts; CLIP-L only) with ratios; then fp8 output."""
    a = make_lora(models, tmp_path / "a.safetensors", seed=4, transformer=True)
    b = make_lora(models, tmp_path / "b.safetensors", seed=5, t5=False)
    out = {p: tmp_path / f"{p}.safetensors" for p in ("flux", "clip_l", "t5xxl")}
    common = ["--models", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--ratios", 0.7, -0.4, "--flux_model", files["flux"]]
    run(*common, "--save_to", out["flux"], "--clip_l", files["clip_l"], "--clip_l_save_to", out["clip_l"],
        "--t5xxl", files["t5xxl"], "--t5xxl_save_to", out["t5xxl"])
    from library.flux_models import transformer_from_bfl

    merged_tes = te_outputs(load_clip(str(out["clip_l"])), load_t5(str(out["t5xxl"])))
    merged_tr = transformer_output(transformer_from_bfl(load_file(str(out["flux"])), dtype=torch.float32))
    a.set_multiplier(0.7)
    b.set_multiplier(-0.4)
    a.apply_to(True, True)
    b.apply_to(True, False)
    try:
        assert_close(merged_tes, te_outputs(models["clip"], models["t5"]))
        assert_close([merged_tr], [transformer_output(models["transformer"])])
    finally:
        for m in b.loras + a.loras:
            m.restore()
    assert changed_keys(files["flux"], str(out["flux"]))

    out8 = {p: tmp_path / f"{p}_fp8.safetensors" for p in ("flux", "clip_l", "t5xxl")}
    run(*common, "--save_to", out8["flux"], "--clip_l", files["clip_l"], "--clip_l_save_to", out8["clip_l"],
        "--t5xxl", files["t5xxl"], "--t5xxl_save_to", out8["t5xxl"], "--save_precision", "fp8")
    for part in out:
        full, fp8 = load_file(str(out[part])), load_file(str(out8[part]))
        assert list(full) == list(fp8)
        for k, v in full.items():
            expected = v.to(torch.float8_e4m3fn) if v.is_floating_point() else v  # int64 position_ids stay int64
            assert fp8[k].dtype == expected.dtype and torch.equal(fp8[k].view(torch.uint8) if v.is_floating_point() else fp8[k],
                                                                  expected.view(torch.uint8) if v.is_floating_point() else expected), k
        with safe_open(str(out8[part]), framework="pt") as f:
            assert f.metadata() == METADATA


def test_flag_errors(models, files, tmp_path, capsys):
    te = tmp_path / "te.safetensors"
    make_lora(models, te, seed=6)
    clip_only = tmp_path / "clip_only.safetensors"
    make_lora(models, clip_only, seed=7, t5=False)
    full = tmp_path / "full.safetensors"
    make_lora(models, full, seed=8, transformer=True)
    o = {p: tmp_path / f"o_{p}.safetensors" for p in ("flux", "clip_l", "t5xxl")}
    clip_args = ["--clip_l", files["clip_l"], "--clip_l_save_to", o["clip_l"]]
    t5_args = ["--t5xxl", files["t5xxl"], "--t5xxl_save_to", o["t5xxl"]]

    err = fail(capsys, "--models", te, *clip_args)  # T5 modules, no T5 file
    assert "T5-XXL" in err and "--t5xxl FILE --t5xxl_save_to OUT" in err
    err = fail(capsys, "--models", full, *clip_args, *t5_args)  # transformer modules, no transformer file
    assert "--flux_model FILE --save_to OUT" in err
    err = fail(capsys, "--models", clip_only, *clip_args, *t5_args)  # a T5 file, no T5 modules
    assert "no LoRA has T5-XXL modules" in err and "--t5xxl --t5xxl_save_to" in err
    err = fail(capsys, "--models", te, "--clip_l", files["clip_l"], *t5_args)
    assert "--clip_l and --clip_l_save_to go together" in err
    err = fail(capsys, "--models", te, *clip_args, *t5_args, "--save_to", o["flux"])
    assert "give --flux_model too" in err
    err = fail(capsys, "--models", full, "--flux_model", files["flux"], *clip_args, *t5_args)
    assert "--flux_model needs --save_to" in err
    err = fail(capsys, "--models", te)
    assert "--save_to is required" in err
    err = fail(capsys, "--models", te, "--clip_l", files["t5xxl"], "--clip_l_save_to", o["clip_l"], *t5_args)  # wrong file
    assert "match nothing" in err and "CLIP-L" in err
    err = fail(capsys, "--models", te, *clip_args, *t5_args, "--concat")
    assert "--concat does not apply" in err
    err = fail(capsys, "--models", te, *clip_args, *t5_args, "--precision", "bf16")  # FLUX merges compute in float32
    assert "--precision does not apply" in err
    err = fail(capsys, "--models", te, *clip_args, "--t5xxl", files["t5xxl"], "--t5xxl_save_to", o["clip_l"])
    assert "must be different files" in err
    assert not any(os.path.exists(p) for p in o.values())


def test_existing_output_is_never_overwritten(models, files, tmp_path, capsys):
    te = tmp_path / "te.safetensors"
    make_lora(models, te, seed=9)
    clip_out, t5_out = tmp_path / "clip.safetensors", tmp_path / "t5.safetensors"
    t5_out.write_bytes(b"keep me")
    err = fail(capsys, "--models", te, "--clip_l", files["clip_l"], "--clip_l_save_to", clip_out, "--t5xxl", files["t5xxl"],
               "--t5xxl_save_to", t5_out)
    assert "already exists" in err and str(t5_out) in err
    assert t5_out.read_bytes() == b"keep me" and not clip_out.exists()  # checked before any work
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_output_created_while_merging_is_never_replaced(models, files, tmp_path, capsys, monkeypatch):
    """A file that appears at the second output's name after the start check (a seam: just before the merged file is
    moved into place) stays as it is; the merge fails naming it and saying what was written; no temporary file is left."""
    te = tmp_path / "te.safetensors"
    make_lora(models, te, seed=9)
    clip_out, t5_out = tmp_path / "clip.safetensors", tmp_path / "t5.safetensors"

    def wrap(real):
        def call(src, dst, *args, **kwargs):
            if os.path.abspath(dst) == str(t5_out) and not os.path.exists(dst):
                t5_out.write_bytes(b"keep me")
            return real(src, dst, *args, **kwargs)

        return call

    for name in ("link", "rename", "replace"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    err = fail(capsys, "--models", te, "--clip_l", files["clip_l"], "--clip_l_save_to", clip_out, "--t5xxl", files["t5xxl"],
               "--t5xxl_save_to", t5_out)
    assert t5_out.read_bytes() == b"keep me"
    assert str(t5_out) in err and f"written before the error: {clip_out}" in err
    assert sorted(os.listdir(tmp_path)) == ["clip.safetensors", "t5.safetensors", "te.safetensors"]


def test_peft_layout_matches_kohya(models, files, tmp_path):
    """A diffusers/PEFT-layout LoRA (transformer.*, text_encoder.*, text_encoder_2.*; fused BFL projections split into
    their diffusers Linears) merges to the same files as the kohya LoRA it was made from."""
    from networks.lora_flux import FusedLoRAModule

    net = make_lora(models, tmp_path / "k.safetensors", seed=10, transformer=True)
    paths = {}
    for prefix, model in (("transformer.", models["transformer"]), ("text_encoder.", models["clip"]), ("text_encoder_2.", models["t5"])):
        paths.update({id(m): prefix + p for p, m in model.named_modules()})
    peft = {}
    for m in net.loras:
        orgs = m.org_modules if isinstance(m, FusedLoRAModule) else [m.org_module]
        ups = torch.split(m.lora_up.weight.detach(), [o.out_features for o in orgs], dim=0)
        for org, up in zip(orgs, ups):
            peft[paths[id(org)] + ".lora_A.weight"] = m.lora_down.weight.detach().clone()
            peft[paths[id(org)] + ".lora_B.weight"] = up.clone()
            peft[paths[id(org)] + ".alpha"] = m.alpha.detach().clone()
    save_file(peft, str(tmp_path / "p.safetensors"))
    for name in ("k", "p"):
        run("--models", tmp_path / f"{name}.safetensors", "--flux_model", files["flux"], "--save_to", tmp_path / f"{name}_flux.safetensors",
            "--clip_l", files["clip_l"], "--clip_l_save_to", tmp_path / f"{name}_clip.safetensors",
            "--t5xxl", files["t5xxl"], "--t5xxl_save_to", tmp_path / f"{name}_t5.safetensors")
    for part in ("flux", "clip", "t5"):
        k, p = load_file(str(tmp_path / f"k_{part}.safetensors")), load_file(str(tmp_path / f"p_{part}.safetensors"))
        assert list(k) == list(p)
        for key in k:
            assert torch.allclose(k[key], p[key], atol=1e-6), key
