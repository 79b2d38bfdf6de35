"""tools/merge_lora.py into SD 1.x and SDXL models: the merged file holds every tensor of its source (untouched ones
bit-identical in their dtype, changed ones = W + ratio * alpha / rank * up @ down), needs no tokenizer, refuses keys it
cannot apply (OFT, LoHa, LoKr) and never replaces a file, not even one that appears while it writes; outputs get the
usual file mode."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_merge_flux_text_encoders import fail, run

RATIO = 0.7
SD_EXTRAS = {  # what real SD 1.5 files hold besides the models' weights (the DDPM schedule buffers, CLIP's position_ids)
    "betas": torch.linspace(0.00085, 0.012, 1000, dtype=torch.float32),
    "alphas_cumprod": torch.linspace(0.999, 0.005, 1000, dtype=torch.float32),
    "alphas_cumprod_prev": torch.linspace(1.0, 0.006, 1000, dtype=torch.float32),
    "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77, dtype=torch.int64)[None],
}


def read_all(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def random_lora(network, path, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    for m in network.loras:
        torch.nn.init.normal_(m.lora_up.weight, std=0.05)
    state = {k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(path))
    return state


def hand_delta(lora: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ratio * alpha / rank * up @ down, by hand (conv: 1x1 up, k x k down)."""
    down, up = lora[name + ".lora_down.weight"].double(), lora[name + ".lora_up.weight"].double()
    scale = lora[name + ".alpha"].item() / down.shape[0]
    return RATIO * scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD 1.x single file with the real vocabulary size (so no built-in tokenizer stands in), the U-Net in fp16,
    the rest fp32, with SD_EXTRAS and metadata; its diffusers folder (config for from_single_file); a LoRA with conv."""
    from transformers import CLIPTextModel

    from library.model_files import save_diffusers_folder
    from library.sd_models import sd_to_ldm_state_dict
    from library.tiny_models import build_tiny_sd, tiny_clip_config
    from networks.lora import create_network

    folder = tmp_path_factory.mktemp("sd1")
    parts = build_tiny_sd()
    config = tiny_clip_config()
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = 49408, 49406, 49407, 49407
    torch.manual_seed(3)
    parts["text_encoder"] = CLIPTextModel(config).eval()
    state = {k: v.detach().clone().contiguous() for k, v in sd_to_ldm_state_dict(parts["text_encoder"], parts["vae"], parts["unet"], False).items()}
    state = {k: v.half() if k.startswith("model.diffusion_model.") else v for k, v in state.items()}
    state.update(SD_EXTRAS)
    src = folder / "sd15.safetensors"
    save_file(state, str(src), {"format": "pt", "origin": "kiln test"})
    # the same model with the tiny 514-token vocabulary, for which kiln has a built-in tokenizer: the tests of other
    # points use it, so that they never depend on a tokenizer
    tiny_te = build_tiny_sd()["text_encoder"]
    tiny = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    tiny.update({k: v.detach().clone().contiguous() for k, v in sd_to_ldm_state_dict(tiny_te, parts["vae"], parts["unet"], False).items()
                 if k.startswith("cond_stage_model.")})
    tiny.update(SD_EXTRAS)
    save_file(tiny, str(folder / "sd15_tiny_vocab.safetensors"))
    save_diffusers_folder(parts, str(folder / "diffusers"))
    network = create_network(1.0, 4, 2, [parts["text_encoder"]], parts["unet"], conv_dim="2", conv_alpha="1")
    lora = random_lora(network, folder / "lora.safetensors", seed=5)
    return {"src": src, "src_tiny": folder / "sd15_tiny_vocab.safetensors", "folder": str(folder / "diffusers"), "lora_path": folder / "lora.safetensors", "lora": lora, "parts": parts}


def test_sd1_single_file_keeps_every_tensor_without_a_tokenizer(sd1, tmp_path, monkeypatch):
    """Every key of the source is in the output; untouched tensors are bit-identical in their dtype; the text-encoder
    weights equal W + ratio * alpha / rank * up @ down; diffusers' single-file loader reads the U-Net merged the same way.
    No tokenizer exists anywhere (none in the Hugging Face cache, no --tokenizer_cache_dir), and none is needed."""
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    out = tmp_path / "merged.safetensors"
    run("--sd_model", sd1["src"], "--models", sd1["lora_path"], "--ratios", RATIO, "--save_to", out)
    src, src_meta = read_all(sd1["src"])
    got, meta = read_all(out)
    assert set(got) == set(src)
    assert meta == src_meta
    for k in SD_EXTRAS:
        assert got[k].dtype == src[k].dtype and torch.equal(got[k], src[k]), k
    lora, changed = sd1["lora"], set()
    names = {k[: -len(".lora_down.weight")] for k in lora if k.endswith(".lora_down.weight")}
    te_prefix = "cond_stage_model.transformer."
    for name in (n for n in names if n.startswith("lora_te_")):
        key = next(k for k in src if k.startswith(te_prefix) and "lora_te_" + k[len(te_prefix) : -len(".weight")].replace(".", "_") == name)
        expected = (src[key].double() + hand_delta(lora, name).reshape(src[key].shape)).float()
        assert got[key].dtype == torch.float32 and torch.allclose(got[key], expected, atol=1e-6), key
        changed.add(key)
    for k in src:
        if k not in changed and not k.startswith("model.diffusion_model."):
            assert got[k].dtype == src[k].dtype and torch.equal(got[k], src[k]), k
    unet_changed = {k for k in src if k.startswith("model.diffusion_model.") and not torch.equal(got[k], src[k])}
    assert all(got[k].dtype == torch.float16 for k in src if k.startswith("model.diffusion_model."))
    assert len(unet_changed) == sum(n.startswith("lora_unet_") for n in names) and all(k.endswith(".weight") for k in unet_changed)

    # the U-Net through diffusers' own converter: each adapted diffusers weight = W (fp16 in the file) + the delta
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_single_file(str(sd1["src"]), config=sd1["folder"], subfolder="unet").state_dict()
    merged = UNet2DConditionModel.from_single_file(str(out), config=sd1["folder"], subfolder="unet").state_dict()
    unet_names = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in merged if k.endswith(".weight")}
    for name in (n for n in names if n.startswith("lora_unet_")):
        key = unet_names[name]
        expected = base[key].double() + hand_delta(lora, name).reshape(base[key].shape)
        assert torch.allclose(merged[key].double(), expected, atol=2e-3, rtol=2e-3), key
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == len(unet_changed)


def test_sdxl_single_file_keeps_every_tensor(tmp_path):
    """SDXL: sgm U-Net names, CLIP-L (lora_te1_) and OpenCLIP bigG (lora_te2_), whose q/k/v are rows of the fused
    in_proj_weight; every other tensor (extras included) bit-identical."""
    from library.sdxl_models import TE1_PREFIX, TE2_PREFIX, sdxl_to_sgm_state_dict, sdxl_unet_lora_name_map
    from library.tiny_models import build_tiny_sdxl
    from networks.lora import create_network

    x = build_tiny_sdxl()
    state = {k: v.detach().contiguous().clone() for k, v in sdxl_to_sgm_state_dict(x["text_encoder"], x["text_encoder_2"], x["vae"], x["unet"]).items()}
    state[TE1_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    state["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000, dtype=torch.float32)
    state = {k: v.to(torch.bfloat16) if k.startswith(TE2_PREFIX) and v.is_floating_point() else v for k, v in state.items()}
    src = tmp_path / "sdxl.safetensors"
    save_file(state, str(src))
    network = create_network(1.0, 4, 2, [x["text_encoder"], x["text_encoder_2"]], x["unet"],
                             unet_name_map=sdxl_unet_lora_name_map(x["unet"]), te_prefixes=["lora_te1", "lora_te2"])
    lora = random_lora(network, tmp_path / "lora.safetensors", seed=9)
    out = tmp_path / "merged.safetensors"
    run("--sd_model", src, "--models", tmp_path / "lora.safetensors", "--ratios", RATIO, "--save_to", out)
    got = load_file(str(out))
    assert set(got) == set(state)
    expected = {k: v.double() for k, v in state.items()}
    hidden = x["text_encoder_2"].config.hidden_size
    names = sorted(k[: -len(".lora_down.weight")] for k in lora if k.endswith(".lora_down.weight"))
    for name in names:
        if name.startswith("lora_te2_"):
            layer, module = name[len("lora_te2_text_model_encoder_layers_") :].split("_", 1)
            if module in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj"):
                i = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj").index(module)
                key = f"{TE2_PREFIX}transformer.resblocks.{layer}.attn.in_proj_weight"
                expected[key][i * hidden : (i + 1) * hidden] += hand_delta(lora, name)
                continue
            ldm = {"self_attn_out_proj": "attn.out_proj", "mlp_fc1": "mlp.c_fc", "mlp_fc2": "mlp.c_proj"}[module]
            key = f"{TE2_PREFIX}transformer.resblocks.{layer}.{ldm}.weight"
        else:
            prefix = TE1_PREFIX if name.startswith("lora_te1_") else "model.diffusion_model."
            lora_prefix = "lora_te1_" if name.startswith("lora_te1_") else "lora_unet_"
            key = next(k for k in state if k.startswith(prefix) and lora_prefix + k[len(prefix) : -len(".weight")].replace(".", "_") == name)
        expected[key] += hand_delta(lora, name).reshape(expected[key].shape)
    for k, v in state.items():
        assert got[k].dtype == v.dtype, k
        if torch.equal(expected[k], v.double()):
            assert torch.equal(got[k], v), k  # untouched: bit-identical
        else:
            tol = 1e-2 if v.dtype == torch.bfloat16 else 1e-6
            assert torch.allclose(got[k].double(), expected[k], atol=tol, rtol=tol), k
            assert not torch.equal(got[k], v), k


@pytest.mark.parametrize("key,kind", [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks", "OFT"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a", "LoHa"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1", "LoKr"),
])
def test_keys_a_merge_cannot_apply_are_an_error(sd1, tmp_path, capsys, key, kind):
    """An OFT, LoHa or LoKr module is an error naming the key (non-zero exit), and nothing is written."""
    lora = dict(sd1["lora"])
    lora[key] = torch.ones(2, 4)
    path = tmp_path / "other.safetensors"
    save_file(lora, str(path))
    out = tmp_path / "merged.safetensors"
    err = fail(capsys, "--sd_model", sd1["src_tiny"], "--models", path, "--save_to", out)
    assert key in err and kind in err
    assert not out.exists() and os.listdir(tmp_path) == ["other.safetensors"]
    err = fail(capsys, "--models", sd1["lora_path"], path, "--save_to", tmp_path / "ab.safetensors", "--concat")
    assert key in err and not (tmp_path / "ab.safetensors").exists()


def test_folder_to_folder_keeps_every_file(sd1, tmp_path):
    """A diffusers folder merged into a folder keeps every file of the source (the scheduler's settings, tokenizer,
    extra files) byte for byte, and changes the adapted weights by the hand-computed delta."""
    import json
    import shutil

    src = tmp_path / "src"
    shutil.copytree(sd1["folder"], src)
    sched = src / "scheduler" / "scheduler_config.json"
    config = json.loads(sched.read_text())
    config["prediction_type"] = "v_prediction"  # an SD 2.x-v style setting a rebuilt default would lose
    sched.write_text(json.dumps(config))
    (src / "README.md").write_text("model card\n")
    out = tmp_path / "merged"
    run("--sd_model", src, "--models", sd1["lora_path"], "--ratios", RATIO, "--save_to", out)
    files = sorted(os.path.relpath(os.path.join(r, f), src) for r, _, fs in os.walk(src) for f in fs)
    assert sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs) == files
    for rel in files:
        if not rel.endswith(".safetensors"):
            assert (out / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (src / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    before = load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(before) == set(after)
    lora = sd1["lora"]
    names = {k[: -len(".lora_down.weight")] for k in lora if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")}
    for k, v in before.items():
        name = "lora_unet_" + k[: -len(".weight")].replace(".", "_")
        if name in names:
            assert torch.allclose(after[k].double(), v.double() + hand_delta(lora, name).reshape(v.shape), atol=1e-6), k
        else:
            assert torch.equal(after[k], v), k


# ---------------------------------------------------------------------------------------------------------------------
# item 7: never replace a file; the usual file mode


@pytest.fixture()
def target_appears(monkeypatch):
    """A seam between the start check and the publish: just before the output is moved into place (os.link, os.rename or
    os.replace onto it), another program creates it."""
    state = {"target": None}

    def wrap(real):
        def call(src, dst, *args, **kwargs):
            if state["target"] is not None and os.path.abspath(dst) == os.path.abspath(state["target"]) and not os.path.exists(dst):
                with open(dst, "wb") as f:
                    f.write(b"precious")
            return real(src, dst, *args, **kwargs)

        return call

    for name in ("link", "rename", "replace"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    return state


@pytest.mark.parametrize("what", ["model", "lora"])
def test_output_created_meanwhile_is_never_replaced(sd1, tmp_path, capsys, target_appears, what):
    out = tmp_path / "merged.safetensors"
    target_appears["target"] = str(out)
    if what == "model":
        args = ["--sd_model", sd1["src_tiny"], "--models", sd1["lora_path"]]
    else:
        args = ["--models", sd1["lora_path"], sd1["lora_path"], "--concat"]
    err = fail(capsys, *args, "--save_to", out)
    assert out.read_bytes() == b"precious"
    assert str(out) in err
    assert os.listdir(tmp_path) == ["merged.safetensors"]  # the temporary file is gone


def test_outputs_get_the_usual_mode(sd1, tmp_path):
    """0666 & ~umask like any file the user creates (not mkstemp's or safetensors' 0600): merged checkpoints, merged
    LoRAs, diffusers folders, and the single files kiln's savers write."""
    from library.sd_models import save_sd_single_file

    old = os.umask(0o022)
    try:
        run("--sd_model", sd1["src_tiny"], "--models", sd1["lora_path"], "--save_to", tmp_path / "merged.safetensors")
        run("--models", sd1["lora_path"], sd1["lora_path"], "--concat", "--save_to", tmp_path / "ab.safetensors")
        run("--sd_model", sd1["src_tiny"], "--models", sd1["lora_path"], "--save_to", tmp_path / "folder")  # converted
        p = sd1["parts"]
        save_sd_single_file(str(tmp_path / "full.safetensors"), (p["text_encoder"], p["vae"], p["unet"]), v2=False)
    finally:
        os.umask(old)
    for name in ("merged.safetensors", "ab.safetensors", "full.safetensors"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name
    files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "folder") for f in fs]
    assert any(f.endswith(".safetensors") for f in files)
    assert all(os.stat(f).st_mode & 0o777 == 0o644 for f in files), {f: oct(os.stat(f).st_mode) for f in files}
