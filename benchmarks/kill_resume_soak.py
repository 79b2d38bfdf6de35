"""Never lose a run: kill a training with SIGKILL at random moments, resume each time from the newest complete state,
and compare the end with an uninterrupted run.

    python benchmarks/kill_resume_soak.py --kills 10 --steps 40

Trains a LoRA on the built-in tiny SD (`kiln-tiny-sd`) with `--save_every_n_steps 1 --save_state`, network dropout
and gradient accumulation over a few generated images. First an uninterrupted reference run; then the same run is
started, killed with SIGKILL (the whole process group: trainer and data-loader workers) after it has made progress,
at a random moment or (every other kill) as soon as a save has begun, and resumed from the newest `-state` folder,
until it has been killed --kills times; then it runs to the end. After every kill, every file under a final name must be complete (safetensors files and state folders
load). At the end the final LoRA and `<output_name>_losses.json` (the whole run's losses, across resumes) must equal
the reference's bit for bit, and no temporary file of a killed save may be left (a run removes them when it
starts). A kill that leaves a temporary file behind happened inside a save.

Exits 0 and prints a summary when everything holds; exits 1 naming the first difference otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NAME = "soak"
STATE = re.compile(re.escape(NAME) + r"-step(\d{8})-state$")


def make_dataset(folder: str, images: int = 5) -> str:
    """A few 64 px images with captions and a dataset config (batch size 1); returns the config path."""
    from PIL import Image

    image_dir = os.path.join(folder, "img")
    os.makedirs(image_dir, exist_ok=True)
    for i in range(images):
        Image.new("RGB", (64, 64), (50 * i % 256, 120, 200 - 30 * i)).save(os.path.join(image_dir, f"{i}.png"))
        with open(os.path.join(image_dir, f"{i}.txt"), "w") as f:
            f.write(f"thing {i}, tiny")
    config = os.path.join(folder, "data.toml")
    with open(config, "w") as f:
        f.write(f"[general]\ncaption_extension = '.txt'\nresolution = 64\nbatch_size = 1\nshuffle_caption = true\n"
                f"[[datasets]]\n  [[datasets.subsets]]\n  image_dir = '{image_dir}'\n")
    return config


def train_command(config: str, output_dir: str, steps: int, resume: str | None = None) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "train_network.py"), "--pretrained_model_name_or_path", "kiln-tiny-sd",
           "--dataset_config", config, "--output_dir", output_dir, "--output_name", NAME, "--max_train_steps", str(steps),
           "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "2", "--network_dropout", "0.1",
           "--learning_rate", "1e-3", "--gradient_accumulation_steps", "2", "--seed", "11",
           "--max_data_loader_n_workers", "1", "--save_every_n_steps", "1", "--save_state"]
    return cmd + (["--resume", resume] if resume else [])


def run_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def newest_state(output_dir: str) -> tuple[int, str | None]:
    """(step, folder) of the newest state folder under a final name; (0, None) when there is none."""
    found = [(int(m.group(1)), os.path.join(output_dir, e)) for e in os.listdir(output_dir) if (m := STATE.match(e))]
    return max(found) if found else (0, None)


def check_final_names(output_dir: str) -> int:
    """Every file and state folder under a final name must be complete; returns the number of leftover temporary
    files and folders (a kill inside a save leaves one)."""
    from safetensors import safe_open

    from library.saving import load_state

    leftovers = 0
    for entry in os.listdir(output_dir):
        path = os.path.join(output_dir, entry)
        if entry.endswith((".tmp", ".old")):
            leftovers += 1
        elif entry.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        elif entry.endswith("-state"):
            load_state(path)
        elif entry.endswith(".json"):
            with open(path) as f:
                json.load(f)
    return leftovers


def wait_for_progress(proc: subprocess.Popen, output_dir: str, after_step: int, timeout: float = 300) -> bool:
    """Wait until a state newer than `after_step` exists (True) or the process has ended (False)."""
    end = time.time() + timeout
    while time.time() < end:
        if newest_state(output_dir)[0] > after_step:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(f"no progress past step {after_step} in {timeout} s")


def wait_for_temporary_file(proc: subprocess.Popen, output_dir: str, timeout: float = 300) -> None:
    """Wait until a save is under way (a temporary file or folder exists) or the process has ended."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if any(e.endswith(".tmp") for e in os.listdir(output_dir)):
            return
        time.sleep(0.001)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def soak(kills: int, steps: int, seed: int, work: str, log=print) -> dict:
    """Run the soak in `work`; returns the summary. Raises AssertionError on the first difference."""
    from safetensors.torch import load_file

    rng = random.Random(seed)
    config = make_dataset(os.path.join(work, "data"))
    reference, soaked = os.path.join(work, "reference"), os.path.join(work, "soaked")
    os.makedirs(soaked, exist_ok=True)
    start = time.time()
    subprocess.run(train_command(config, reference, steps), env=run_env(), check=True, capture_output=True)
    reference_s = time.time() - start
    log(f"reference run: {steps} steps in {reference_s:.1f} s")

    done, in_save = 0, 0
    killed_at = []
    while done < kills:
        step, state = newest_state(soaked)
        proc = subprocess.Popen(train_command(config, soaked, steps, state), env=run_env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for_progress(proc, soaked, step):
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be killed; use more --steps")
        if done % 2:  # every other kill lands inside a save: as soon as a temporary file appears
            wait_for_temporary_file(proc, soaked)
        else:  # a random moment: inside a step or inside a save
            time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be killed; use more --steps")
        kill_group(proc)
        done += 1
        leftovers = check_final_names(soaked)
        in_save += leftovers > 0
        newest = newest_state(soaked)[0]
        killed_at.append(newest)
        log(f"kill {done}: newest complete state at step {newest}" + (" (killed inside a save)" if leftovers else ""))
    step, state = newest_state(soaked)  # and on to the end
    res = subprocess.run(train_command(config, soaked, steps, state), env=run_env(), capture_output=True, text=True)
    if res.returncode != 0:
        raise AssertionError(f"the final resume from {state} failed:\n{res.stderr[-3000:]}")
    if check_final_names(soaked):
        raise AssertionError(f"temporary files of killed saves are left in {soaked} (a run cleans them up when it starts)")

    a, b = load_file(os.path.join(reference, f"{NAME}.safetensors")), load_file(os.path.join(soaked, f"{NAME}.safetensors"))
    if a.keys() != b.keys() or any(not a[k].equal(b[k]) for k in a):
        raise AssertionError("the final LoRA differs from the uninterrupted run's")
    with open(os.path.join(reference, f"{NAME}_losses.json")) as f:
        ref_losses = json.load(f)
    with open(os.path.join(soaked, f"{NAME}_losses.json")) as f:
        soaked_losses = json.load(f)
    if soaked_losses != ref_losses or len(ref_losses["losses"]) != steps:
        raise AssertionError(f"the loss history differs:\n{ref_losses}\n{soaked_losses}")
    summary = {"kills": done, "kills_inside_a_save": in_save, "steps": steps, "reference_s": round(reference_s, 1),
               "soak_s": round(time.time() - start - reference_s, 1), "state_steps_at_kills": killed_at}
    log("identical to the uninterrupted run: final LoRA bit for bit, every step's loss: " + json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="how many times to kill the run (default 10)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of the run (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--work_dir", default=None, help="folder for the runs (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="kiln_soak_")
    try:
        soak(args.kills, args.steps, args.seed, work)
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
