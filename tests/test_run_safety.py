"""A run that is never lost or silently wrong: gradient accumulation per epoch, resume of every random generator,
SIGINT/SIGTERM at a step boundary, SIGKILL at random moments, arguments that cannot train."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPT_ENV, launch_script, write_caption, write_image
from safetensors import safe_open
from safetensors.torch import load_file

BASE = ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3",
        "--max_data_loader_n_workers", "0", "--seed", "7"]


def launch(*args, check: bool = True) -> subprocess.CompletedProcess:
    return launch_script("train_network.py", *args, check=check)


def image_folder(root, count: int) -> str:
    """`count` 64 px images with captions and a config with batch size 1; returns the config path."""
    for i in range(count):
        write_caption(write_image(root / "img" / f"{i}.png", (64, 64), (70 * i % 256, 120, 40 + 50 * i)), f"thing {i}")
    config = root / "data.toml"
    config.write_text(f"[general]\ncaption_extension = '.txt'\nresolution = 64\nbatch_size = 1\n"
                      f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{root / 'img'}'\n")
    return str(config)


def losses(out_dir, name) -> dict:
    with open(os.path.join(out_dir, f"{name}_losses.json")) as f:
        return json.load(f)


def same_files(a: str, b: str) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------------------------------------------------------------
# Arguments that cannot train: one error line, before any model weight is read


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--network_dim", "0"], "--network_dim 0"),
        (["--max_train_steps", "0"], "--max_train_steps 0"),
        (["--max_train_epochs", "0"], "--max_train_epochs 0"),
        (["--learning_rate", "-1"], "--learning_rate -1.0"),
        (["--unet_lr", "-0.5"], "--unet_lr -0.5"),
        (["--initial_step", "1600"], "--initial_step 1600 leaves nothing to train"),
        (["--initial_step", "-1"], "--initial_step -1"),
        (["--initial_epoch", "0"], "--initial_epoch 0"),
        (["--skip_until_initial_step"], "give one of them"),
    ],
)
def test_arguments_that_cannot_train_stop_before_the_model_loads(flags, named, tmp_path, capsys):
    from library.family_sd import SdFamily
    from library.train_script import run_network_training

    # the model does not exist: reaching the loader would give another error
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "missing.safetensors"), "--output_dir", str(tmp_path / "o"), *flags]
    with pytest.raises(SystemExit) as e:
        run_network_training(SdFamily(), "test", argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0] and "missing" not in err[0], err


def test_fp16_on_cpu_is_refused_before_the_model_loads(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "train_network.py"), "--pretrained_model_name_or_path",
                          str(tmp_path / "missing.safetensors"), "--output_dir", str(tmp_path / "o"), "--mixed_precision", "fp16"],
                         capture_output=True, text=True, env=SCRIPT_ENV, timeout=300)
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--mixed_precision fp16" in errors[0] and "bf16" in errors[0], res.stderr[-2000:]
    assert "missing" not in res.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Random generators and stop signals (units)


class RecordingCuda:
    """Stands in for torch.cuda: one device whose generator state is a tensor; records what is restored."""

    def __init__(self) -> None:
        self.state = [torch.arange(8, dtype=torch.uint8)]
        self.restored = None

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.state]

    def set_rng_state_all(self, states) -> None:
        self.restored = [s.clone() for s in states]


def test_every_generator_is_saved_and_restored(tmp_path):
    from library.run_control import restore_rng_states, rng_states

    cuda = RecordingCuda()
    states = rng_states(cuda)
    torch.save(states, tmp_path / "rng.pt")  # the state folder's format, read back without unpickling objects
    first = (torch.rand(3), random.random(), np.random.rand())
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True), cuda)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], first[0]) and again[1:] == first[1:]
    assert cuda.restored is not None and torch.equal(cuda.restored[0], cuda.state[0])


def test_first_signal_asks_to_stop_and_the_second_stops_at_once():
    from library.run_control import StopSignals

    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_new_run_cleans_up_saves_that_were_killed(tmp_path):
    from library.saving import remove_unfinished

    folders = ["a-step00000005-state.tmp", "a-000002-state.old", "a-step00000001-state", "a-step00000001-state.old",
               "a-step00000003.diffusers.7.0a1b.tmp", "a-000004.diffusers.8.c0de.old", "a-000005", "a-000005.diffusers.9.beef.old"]
    files = ["a.safetensors.123.abcd1234.tmp", "a_losses.json.55.ff00.tmp", "a.safetensors", "a_v2.safetensors.1.ab.tmp",
             "a-step00000002_clip_l.safetensors.3.ab.tmp", "a-ema.safetensors.4.cd.tmp", "a-000001-ema_t5xxl.ckpt.5.ef.tmp",
             "a.tmp"]
    for name in folders:
        (tmp_path / name).mkdir()
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    remove_unfinished(str(tmp_path), "a")
    # killed between a state's (or a diffusers checkpoint folder's) two renames: the complete previous folder comes
    # back; temporary files of EMA copies and SD3 side files go; another run's files and the user's own stay
    assert sorted(os.listdir(tmp_path)) == ["a-000002-state", "a-000004", "a-000005", "a-step00000001-state", "a.safetensors",
                                            "a.tmp", "a_v2.safetensors.1.ab.tmp"]


# ---------------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_gradient_accumulation_groups_each_epoch_and_resumes_exactly(tiny_sd, tmp_path):
    """3 batches an epoch, 2 per step: steps of 2 and 1 batches in every epoch. Resuming from the epoch-1 state repeats
    the uninterrupted run; a one-batch step trains like a step without accumulation."""
    config = image_folder(tmp_path / "three", 3)
    common = ["--pretrained_model_name_or_path", tiny_sd, "--dataset_config", config, "--output_name", "g",
              "--max_train_steps", 4, "--gradient_accumulation_steps", 2, "--network_dropout", "0.1", *BASE]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(*common, "--output_dir", full, "--save_every_n_epochs", 1, "--save_state")
    state = full / "g-000001-state"
    train_state = json.loads((state / "train_state.json").read_text())
    assert (train_state["current_step"], train_state["current_epoch"], train_state["batches_done"]) == (2, 2, 0)
    with safe_open(str(full / "g-000001.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_epoch"] == "1" and f.metadata()["ss_steps"] == "2"
    with safe_open(str(full / "g.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_epoch"] == "2" and f.metadata()["ss_steps"] == "4"
    launch(*common, "--output_dir", resumed, "--resume", state)
    assert losses(resumed, "g") == losses(full, "g") and len(losses(full, "g")["losses"]) == 4
    assert same_files(str(full / "g.safetensors"), str(resumed / "g.safetensors"))

    # one image: every step is a group of one batch, divided by 1 and not by the accumulation count (plain SGD shows it)
    one = image_folder(tmp_path / "one", 1)
    sgd = ["--pretrained_model_name_or_path", tiny_sd, "--dataset_config", one, "--output_name", "s", "--max_train_steps", 2,
           *BASE, "--optimizer_type", "SGDNesterov", "--learning_rate", "0.5", "--lr_scheduler", "reduce_lr_on_plateau"]
    launch(*sgd, "--output_dir", tmp_path / "acc1")
    launch(*sgd, "--output_dir", tmp_path / "acc3", "--gradient_accumulation_steps", 3)
    assert losses(tmp_path / "acc1", "s") == losses(tmp_path / "acc3", "s")
    assert same_files(str(tmp_path / "acc1" / "s.safetensors"), str(tmp_path / "acc3" / "s.safetensors"))


@pytest.mark.slow
def test_initial_step_continues_a_run_and_initial_epoch_moves_the_epoch(tiny_sd, tmp_path):
    """3 steps an epoch. From the step-4 LoRA, --initial_step 4 --skip_until_initial_step trains steps 5 and 6 on the
    batches the whole run gave them (plain SGD with a constant rate keeps no state), so the LoRA is the same; without
    --skip_until_initial_step, --initial_epoch 2 only starts the epoch counter at 2 (sd-scripts' meaning)."""
    config = image_folder(tmp_path / "three", 3)
    common = ["--pretrained_model_name_or_path", tiny_sd, "--dataset_config", config, "--output_name", "i",
              "--max_train_steps", 6, *BASE, "--optimizer_type", "torch.optim.SGD", "--learning_rate", "0.5"]
    full, cont, moved = tmp_path / "full", tmp_path / "continued", tmp_path / "moved"
    launch(*common, "--output_dir", full, "--save_every_n_steps", 1)
    out = launch(*common, "--output_dir", cont, "--network_weights", full / "i-step00000004.safetensors",
                 "--initial_step", 4, "--skip_until_initial_step").stderr
    assert "starting at step 4 (epoch 2)" in out
    assert losses(cont, "i") == {"first_step": 5, "losses": losses(full, "i")["losses"][4:]}
    assert same_files(str(full / "i.safetensors"), str(cont / "i.safetensors"))
    with safe_open(str(cont / "i.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "6" and f.metadata()["ss_epoch"] == "2"

    # from the step-3 LoRA, epoch 2 alone trains as the whole run's epoch 2, but its steps count from 1
    launch(*common, "--output_dir", moved, "--network_weights", full / "i-step00000003.safetensors", "--initial_epoch", 2)
    assert losses(moved, "i") == {"first_step": 1, "losses": losses(full, "i")["losses"][3:]}
    assert same_files(str(full / "i.safetensors"), str(moved / "i.safetensors"))
    with safe_open(str(moved / "i.safetensors"), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "3" and f.metadata()["ss_epoch"] == "2"


def wait_for(path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {path} appeared"
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.02)


def wait_for_group(pgid: int, timeout: float = 300) -> None:
    """Wait until every process of the group has ended (a launcher's child outlives its launcher)."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError("processes of the run are still alive")


@pytest.mark.slow
def test_ctrl_c_saves_at_a_step_boundary_and_the_run_continues_exactly(tiny_sd, tmp_path):
    config = image_folder(tmp_path / "d", 4)
    common = ["--pretrained_model_name_or_path", tiny_sd, "--dataset_config", config, "--output_name", "c",
              "--max_train_steps", 40, "--network_dropout", "0.1", *BASE, "--max_data_loader_n_workers", "1"]
    stopped, reference = tmp_path / "stopped", tmp_path / "reference"
    # Ctrl-C in a terminal: SIGINT to the whole process group (trainer and data-loader worker)
    cmd = [sys.executable, os.path.join(ROOT, "train_network.py"), *map(str, common), "--output_dir", str(stopped),
           "--save_state", "--save_every_n_steps", "2"]
    proc = subprocess.Popen(cmd, env={**SCRIPT_ENV, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(stopped / "c-step00000002-state", proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    with safe_open(str(stopped / "c.safetensors"), framework="pt") as f:
        step = int(f.metadata()["ss_steps"])
    assert 2 <= step < 40 and f"stopped after step {step}" in err and "--resume" in err
    assert json.loads((stopped / "c-state" / "train_state.json").read_text())["current_step"] == step
    assert not [e for e in os.listdir(stopped) if e.endswith(".tmp")]

    launch(*common, "--output_dir", stopped, "--resume", stopped / "c-state")
    launch(*common, "--output_dir", reference)
    assert losses(stopped, "c") == losses(reference, "c")
    assert same_files(str(stopped / "c.safetensors"), str(reference / "c.safetensors"))


@pytest.mark.slow
def test_trainer_stops_and_saves_when_its_launcher_is_killed(tiny_sd, tmp_path):
    """SIGTERM to `accelerate launch` alone: the launcher dies; its trainer must not go on alone."""
    config = image_folder(tmp_path / "d", 2)
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "train_network.py"),
           "--pretrained_model_name_or_path", tiny_sd, "--dataset_config", config, "--output_dir", str(out), "--output_name", "l",
           "--max_train_steps", "1000", "--save_every_n_steps", "1", *BASE]
    proc = subprocess.Popen(cmd, env={**SCRIPT_ENV, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out / "l-step00000001.safetensors", proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    wait_for_group(proc.pid, timeout=120)
    with safe_open(str(out / "l.safetensors"), framework="pt") as f:
        assert int(f.metadata()["ss_steps"]) < 1000


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    """The soak benchmark, short: SIGKILL at random moments (trainer and workers), resumed from the newest state each
    time, ends bit for bit where the uninterrupted run ends (`benchmarks/kill_resume_soak.py --kills 10` for more)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from kill_resume_soak import soak

    summary = soak(kills=2, steps=10, seed=1, work=str(tmp_path), log=lambda *_: None)
    assert summary["kills"] == 2 and summary["kills_inside_a_save"] >= 1
