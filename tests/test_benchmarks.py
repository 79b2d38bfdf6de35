"""The benchmark scripts run (tiny sizes on CPU), so they do not rot between GPU sessions."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_dataset_benchmark_small():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_dataset.py"), "--num_images", "300"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "images/s over 300 images" in res.stdout


def test_gpu_train_step_benchmark_code_runs_on_cpu_smoke(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_train_step.py"), "--smoke", "--profile", tmp_path],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert all(f"smoke LoRA 32/16, checkpointing {c}" in res.stdout for c in (True, False)) and "s/step" in res.stdout
    assert "--- profile of smoke LoRA 32/16, checkpointing True" in res.stdout
    assert len(list(tmp_path.glob("*.json"))) == 2  # one trace per configuration


def test_gpu_train_step_benchmark_flux_configurations_run_on_cpu_smoke():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_train_step.py"), "--family", "flux", "--smoke"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert all(f"smoke LoRA 16/16, checkpointing, {mode}" in res.stdout for mode in ("bf16", "fp8_base", "blocks_to_swap", "cpu_offload_checkpointing"))


def test_operator_count_of_a_full_size_step_on_the_meta_device():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "count_step_ops.py"), "--family", "flux", "--no_checkpointing"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if "operators per step" in x)
    with_lora, without = int(line.split(": ")[1].split()[0]), int(line.split("LoRA, ")[1].split()[0])
    # 304 adapters (two matmuls each forward, four backward, plus the adds) cost thousands of operators
    assert without > 5000 and 2000 < with_lora - without < 5000, line
