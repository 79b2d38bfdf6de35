"""The benchmark scripts run (tiny sizes on CPU), so they do not rot between GPU sessions."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch
from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_dataset_benchmark_small():
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_dataset.py"), "--num_images", "300"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "images/s over 300 images" in res.stdout


def test_gpu_train_step_benchmark_code_runs_on_cpu_smoke(tmp_path):
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_train_step.py"), "--smoke", "--profile", tmp_path],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert all(f"smoke LoRA 32/16, checkpointing {c}" in res.stdout for c in (True, False)) and "s/step" in res.stdout
    assert "--- profile of smoke LoRA 32/16, checkpointing True" in res.stdout
    assert len(list(tmp_path.glob("*.json"))) == 2  # one trace per configuration


def test_gpu_train_step_benchmark_flux_configurations_run_on_cpu_smoke():
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_train_step.py"), "--family", "flux", "--smoke"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert all(
        f"smoke LoRA 16/16, checkpointing, {mode}" in res.stdout
        for mode in ("bf16", "fp8_base", "blocks_to_swap", "cpu_offload_checkpointing")
    )


FULL_LABELS = (
    "SDXL full, AdamW8bit, fused backward, full_bf16",
    "SDXL full, Adafactor, fused backward, full_bf16",
    "SDXL full, Adafactor, fused backward, fp32",
    "FLUX.1 dev full, Adafactor, fused backward, full_bf16",
)


def test_gpu_train_step_benchmark_full_fine_tuning_runs_on_cpu_smoke():
    """--method full: the SDXL and FLUX configurations in one process (one start of torch and diffusers), 2 steps
    each, on one thread: the per-weight optimizer steps are thousands of tiny operations, which a second thread only
    slows down (much so on a busy machine)."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_train_step.py"), "--method", "full",
                          "--family", "sdxl", "flux", "--smoke", "--steps", "2"],
                         capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    results = [x for x in lines if "s/step" in x]
    assert len(results) == len(FULL_LABELS) and all(x.startswith(f"smoke {label}") for x, label in zip(results, FULL_LABELS)), (
        res.stdout
    )
    mirrors = [x for x in lines if x.startswith("    mirrors ")]
    assert len(mirrors) == len(FULL_LABELS) and "--fused_backward_pass --full_bf16" in mirrors[0], res.stdout
    # FLUX swaps 2 of the tiny model's 4 blocks where kiln's full fine-tuning takes --blocks_to_swap, else says it is owed
    assert ", blocks_to_swap 2 " in results[-1] or "    --blocks_to_swap 2: figure outstanding" in res.stdout, res.stdout


def test_full_fine_tuning_flux_config_runs_without_block_swap_where_kiln_refuses_it(monkeypatch):
    from benchmarks.gpu_train_step import FLUX_FULL_BLOCKS_TO_SWAP, full_configs
    from library.method_full import FullMethod

    refusal = "--blocks_to_swap streams frozen blocks; kiln does not yet swap blocks that are trained"
    monkeypatch.setattr(FullMethod, "argument_problems", lambda self, args, family: [refusal] if args.blocks_to_swap else [])
    (config,) = full_configs("flux", smoke=False)
    assert config.label.endswith(", no block swap") and "blocks_to_swap" not in config.flags
    assert config.notes == (
        f"--blocks_to_swap {FLUX_FULL_BLOCKS_TO_SWAP}: figure outstanding, kiln's full fine-tuning refuses it so far ({refusal})",
    )


COUNT_LINE = re.compile(
    r"^(\S+), 1024x1024, .*, (networks\.\S+) .*: (\d+) operators per step with the adapter \((\d+) modules\), (\d+) without"
)


def count_step_ops(*flags: str) -> dict[str, tuple[str, int, int, int]]:
    """benchmarks/count_step_ops.py's report: model -> (network module, operators with the adapter, adapter modules,
    operators without)."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "count_step_ops.py"), *flags],
                         capture_output=True, text=True, env=ENV, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    counts = {}
    for line in res.stdout.splitlines():
        m = COUNT_LINE.match(line)
        if m:
            counts[m[1]] = m[2], int(m[3]), int(m[4]), int(m[5])
    assert counts, res.stdout
    return counts


def test_operator_count_of_a_full_size_step_on_the_meta_device():
    (module, with_lora, modules, without), *_ = count_step_ops("--family", "flux", "--no_checkpointing").values()
    # 304 adapters (two matmuls each forward, four backward, plus the adds) cost thousands of operators
    assert module == "networks.lora_flux" and modules == 304, (module, modules)
    assert without > 5000 and 2000 < with_lora - without < 5000, (with_lora, without)


def test_operator_count_of_a_full_size_oft_step_on_the_meta_device():
    """--network_module networks.oft_flux (FLUX: the cheapest full-size count) runs on the meta device (its batched
    linalg.solve and bmm included) and its rotations add operators: the 76 attention modules of the double blocks."""
    counts = count_step_ops(
        "--family", "flux", "--no_checkpointing", "--network_module", "networks.oft_flux", "--network_dim", "4"
    )
    (module, with_oft, modules, without), *_ = counts.values()
    assert module == "networks.oft_flux" and modules == 76, counts
    assert with_oft - without > 20 * modules, counts


def test_gpu_train_step_benchmark_sd3_configurations_run_on_cpu_smoke():
    """The SD3.5 Large and Medium configurations on their tiny layouts, 2 steps each."""
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_train_step.py"), "--family", "sd3", "--smoke", "--steps", "2"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    for model in ("SD3.5 Large", "SD3.5 Medium"):
        assert all(
            f"smoke {model}, LoRA 16/16, checkpointing, {mode}" in res.stdout for mode in ("bf16", "fp8_base", "blocks_to_swap")
        )


def test_full_size_sd35_configs_build_on_the_meta_device():
    from diffusers import SD3Transformer2DModel

    from benchmarks.gpu_train_step import SD35_TRANSFORMERS
    from library.sd3_models import sd3_variant_from_config

    sizes = {}
    for variant, config in SD35_TRANSFORMERS.items():
        with torch.device("meta"):
            model = SD3Transformer2DModel(**config)
        assert sd3_variant_from_config(model.config) == variant and model.config.num_layers == len(model.transformer_blocks)
        sizes[variant] = sum(p.numel() for p in model.parameters()) / 1e9
    # the published sizes: 8.1B parameters; 2.5B with 3.5 Medium's 384x384-position table (a buffer, 0.23B)
    assert 8.0 < sizes["sd3.5-large"] < 8.2 and 2.2 < sizes["sd3.5-medium"] < 2.3, sizes


def test_operator_count_of_full_size_sd35_steps_on_the_meta_device():
    counts = {
        k: (with_lora, without)
        for k, (_, with_lora, _, without) in count_step_ops("--family", "sd3", "--no_checkpointing").items()
    }
    assert set(counts) == {"sd3.5-large", "sd3.5-medium"}, counts
    # 377 adapters on Large's 38 joint blocks, 263 on Medium's 24 (with the attn2 qkv and proj of its first 13 x blocks)
    (large, large_plain), (medium, medium_plain) = counts["sd3.5-large"], counts["sd3.5-medium"]
    assert large_plain > medium_plain > 5000, counts
    assert 3000 < large - large_plain < 5000 and 2000 < medium - medium_plain < large - large_plain, counts
