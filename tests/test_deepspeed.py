"""--deepspeed: ZeRO stages 1 and 2 through accelerate, checked against the same run without DeepSpeed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import ROOT, SCRIPT_ENV, launch_script
from tests.test_run_safety import BASE, image_folder, launch, losses, same_files


def launch2(*args) -> None:
    """Two processes (each holds half of the ZeRO partitions). On a machine without a GPU, `accelerate launch
    --multi_gpu` makes accelerate choose its CPU data parallelism over DeepSpeed, so --deepspeed runs start with
    torch's own launcher (as a DeepSpeed user's launcher does on a GPU machine)."""
    if "--deepspeed" not in args:
        launch_script("train_network.py", *args, processes=2)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "train_network.py"), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**SCRIPT_ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-6000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--deepspeed", "--zero_stage", "3"], "stage 3 and its options"),
        (["--deepspeed", "--offload_param_device", "cpu"], "stage 3 and its options"),
        (["--deepspeed", "--zero_stage", "0"], "--zero_stage 0 is plain data parallelism"),
        (["--deepspeed", "--mixed_precision", "bf16", "--full_bf16"], "drop --full_fp16/--full_bf16"),
        (["--deepspeed", "--optimizer_type", "AdamWScheduleFree"], "schedule-free"),
        (["--deepspeed", "--fp16_master_weights_and_gradients"], "needs --mixed_precision fp16"),
        (["--zero_stage", "1", "--offload_optimizer_device", "cpu"], "--zero_stage, --offload_optimizer_device: DeepSpeed options need --deepspeed"),
    ],
)
def test_deepspeed_options_kiln_cannot_run_stop_before_the_model_loads(flags, named, tmp_path, capsys):
    from library.family_sd import SdFamily
    from library.train_script import run_network_training

    argv = ["--pretrained_model_name_or_path", str(tmp_path / "missing.safetensors"), "--output_dir", str(tmp_path / "o"), *flags]
    with pytest.raises(SystemExit) as e:
        run_network_training(SdFamily(), "test", argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and named in err[0] and "missing" not in err[0], err


def test_plugin_carries_the_options():
    from types import SimpleNamespace

    from library.deepspeed_run import deepspeed_plugin

    args = SimpleNamespace(zero_stage=1, gradient_accumulation_steps=3, max_grad_norm=0.5, offload_optimizer_device="cpu",
                           fp16_master_weights_and_gradients=True)
    environment = dict(os.environ)
    config = deepspeed_plugin(args).deepspeed_config
    assert dict(os.environ) == environment  # only the trainer sets a lone process's rendezvous
    # kiln marks accumulation boundaries itself: DeepSpeed counts 1 (its own count breaks ZeRO-2 on several processes)
    assert config["zero_optimization"]["stage"] == 1 and config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 0.5 and config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["fp16"]["fp16_master_weights_and_grads"] is True


@pytest.mark.slow
def test_zero2_trains_as_without_deepspeed_and_resumes_exactly(tiny_sd, tmp_path):
    """Two processes, 3 images, 2 batches a step, cosine schedule: ZeRO-2 trains as the run without DeepSpeed; a state
    it saved (each process's optimizer partition) resumes to the same LoRA bit for bit; a plain run cannot resume it.
    (One process without --max_grad_norm gives the plain run bit for bit; DeepSpeed's clipping norm is computed on
    flat buffers.)"""
    config = image_folder(tmp_path / "three", 3)
    common = ["--pretrained_model_name_or_path", tiny_sd, "--dataset_config", config, "--output_name", "d",
              "--max_train_steps", 4, "--gradient_accumulation_steps", 2, *BASE, "--learning_rate", "1e-2",
              "--lr_scheduler", "cosine", "--max_grad_norm", "0"]
    plain, zero2, resumed = tmp_path / "plain", tmp_path / "zero2", tmp_path / "resumed"
    launch2(*common, "--output_dir", plain)
    launch2(*common, "--output_dir", zero2, "--deepspeed", "--zero_stage", 2, "--save_every_n_epochs", 1, "--save_state")
    # ZeRO-2 averages the two processes' gradients in another order than kiln's all-reduce: float32 rounding apart
    # (Adam turns it into up to 1e-4 of a weight where a gradient is near its epsilon)
    assert losses(zero2, "d")["losses"] == pytest.approx(losses(plain, "d")["losses"], rel=1e-6, abs=0)
    a, b = load_file(str(plain / "d.safetensors")), load_file(str(zero2 / "d.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=5e-5) for k in a)
    state = zero2 / "d-000001-state"
    assert json.loads((state / "train_state.json").read_text())["current_step"] == 1  # 2 batches an epoch on 2 processes

    launch2(*common, "--output_dir", resumed, "--deepspeed", "--resume", state)
    assert losses(resumed, "d") == losses(zero2, "d")
    assert same_files(str(zero2 / "d.safetensors"), str(resumed / "d.safetensors"))

    refused = launch(*common, "--output_dir", tmp_path / "no", "--resume", state, check=False)
    assert refused.returncode == 1 and "written by a --deepspeed run; add --deepspeed" in refused.stderr


@pytest.mark.slow
def test_zero1_with_optimizer_offload_trains_under_bf16(tiny_sd, tmp_path):
    config = image_folder(tmp_path / "two", 2)
    out = tmp_path / "o"
    launch("--pretrained_model_name_or_path", tiny_sd, "--dataset_config", config, "--output_name", "z", "--output_dir", out,
           "--max_train_steps", 2, *BASE, "--deepspeed", "--zero_stage", 1, "--offload_optimizer_device", "cpu",
           "--mixed_precision", "bf16", "--save_precision", "float")
    with safe_open(str(out / "z.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "2"
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
    assert any(u.abs().sum() > 0 for u in ups)  # the zero-initialised up weights were trained
