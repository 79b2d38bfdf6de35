"""Shared test setup: no hub access, and small helpers that write real image files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SCRIPT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def launch_script(
    script: str, *args, processes: int = 1, check: bool = True, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a training script of the repository through `accelerate launch` on CPU (two processes with processes=2);
    with check, a failure raises with the end of its output. `env`: variables to set on top of SCRIPT_ENV."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**SCRIPT_ENV, **(env or {})}
    if processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(processes)]
        env.update({"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    else:
        cmd += ["--num_processes", "1"]
    cmd += [os.path.join(ROOT, script), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{script} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def write_image(path, size, color=(200, 100, 50), mode="RGB", fmt=None, **save_kwargs):
    """Write a solid image of `size` (w, h) to `path` and return the path."""
    from PIL import Image

    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img = Image.new(mode, size, color)
    img.save(str(path), fmt, **save_kwargs)
    return str(path)


def write_caption(image_path, text, ext=".txt"):
    stem = os.path.splitext(str(image_path))[0]
    with open(stem + ext, "w", encoding="utf-8") as f:
        f.write(text)
    return stem + ext


@pytest.fixture(autouse=True)
def restore_root_logging():
    """In-process script runs configure the root logger (handlers, level); put it back after each test."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """The built-in tiny SD 1.x saved as a diffusers folder (built once per test run)."""
    from library.model_files import save_diffusers_folder
    from library.tiny_models import build_tiny_sd

    folder = tmp_path_factory.mktemp("models") / "tiny_sd1"
    save_diffusers_folder(build_tiny_sd(), str(folder))
    return str(folder)
