"""--deepspeed: the adapter's optimizer runs as a DeepSpeed ZeRO engine through accelerate's DeepSpeed support.

ZeRO stage 1 partitions the optimizer state across processes, stage 2 the gradients too; `--offload_optimizer_device
cpu` keeps the optimizer state and step on the CPU. The frozen base model stays outside DeepSpeed, exactly as without
it (block swapping, fp8 and the rest work the same). kiln keeps its own loop: each epoch's accumulation groups (which
end at the epoch's end) set DeepSpeed's accumulation boundary, each batch's loss is divided by its group's size, and
kiln's learning-rate scheduler drives the optimizer that DeepSpeed steps. With float32 weights and no --max_grad_norm a
run equals the run without DeepSpeed bit for bit (tests/test_deepspeed.py); DeepSpeed's clipping computes the norm on
flat buffers, equal up to float32 rounding.

Not supported, refused before anything loads (deepspeed_problems): ZeRO stage 3 and the options that only exist for
it (kiln's adapter modules are called from inside the base model, not through the engine, which stage 3's parameter
gathering needs), stage 0 (plain data parallelism: kiln does it without DeepSpeed), --full_fp16/--full_bf16
(DeepSpeed keeps float32 master weights itself), schedule-free optimizers.
"""

from __future__ import annotations

import os

import torch

STAGE3_ONLY = ("offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path", "zero3_init_flag", "zero3_save_16bit_model")


def add_deepspeed_arguments(parser) -> None:
    """sd-scripts' DeepSpeed options (names, types and defaults as there)."""
    g = parser.add_argument_group("DeepSpeed (ZeRO stages 1 and 2 for the adapter's optimizer; needs the deepspeed package)")
    g.add_argument("--deepspeed", action="store_true", help="run the optimizer as a DeepSpeed ZeRO engine (accelerate's DeepSpeed support)")
    g.add_argument(
        "--zero_stage",
        type=int,
        default=2,
        choices=[0, 1, 2, 3],
        help="ZeRO stage: 1 partitions the optimizer state across processes, 2 the gradients too (default); 0 and 3 "
        "are refused (0 is what kiln does without DeepSpeed; 3 does not fit kiln's adapters)",
    )
    g.add_argument(
        "--offload_optimizer_device",
        type=str,
        default=None,
        choices=["cpu", "nvme"],
        help="cpu: keep the optimizer state and step on the CPU (ZeRO-Offload); nvme needs stage 3 (refused)",
    )
    g.add_argument("--offload_optimizer_nvme_path", type=str, default=None, help="NVMe offload folder (stage 3: refused)")
    g.add_argument(
        "--offload_param_device", type=str, default=None, choices=["cpu", "nvme"], help="parameter offload (stage 3: refused)"
    )
    g.add_argument("--offload_param_nvme_path", type=str, default=None, help="parameter NVMe offload folder (stage 3: refused)")
    g.add_argument("--zero3_init_flag", action="store_true", help="ZeRO-3 model initialisation (stage 3: refused)")
    g.add_argument("--zero3_save_16bit_model", action="store_true", help="gather ZeRO-3 weights on save (stage 3: refused)")
    g.add_argument(
        "--fp16_master_weights_and_gradients",
        action="store_true",
        help="DeepSpeed keeps fp16 master weights and gradients (needs --mixed_precision fp16 and "
        "--offload_optimizer_device cpu)",
    )


def deepspeed_problems(args) -> list[str]:
    """Argument problems of a --deepspeed run (or of DeepSpeed options given without --deepspeed), one line each."""
    if not hasattr(args, "deepspeed"):  # a parser without the DeepSpeed options (e.g. a cache tool's)
        return []
    given = [f"--{name}" for name in (*STAGE3_ONLY, "offload_optimizer_device", "fp16_master_weights_and_gradients") if getattr(args, name)]
    if args.zero_stage != 2:
        given.insert(0, "--zero_stage")
    if not args.deepspeed:
        return [f"{', '.join(given)}: DeepSpeed options need --deepspeed"] if given else []
    problems = []
    if args.zero_stage == 3 or any(getattr(args, name) for name in STAGE3_ONLY):
        problems.append(
            "--deepspeed: kiln runs ZeRO stages 1 and 2 (optimizer state and gradients partitioned, optimizer offload "
            "to the CPU); stage 3 and its options (--offload_param_*, NVMe offload, --zero3_*) are not supported: the "
            "adapter's layers are called from inside the frozen model, not through the engine. Use --zero_stage 2 "
            "with --offload_optimizer_device cpu, and --blocks_to_swap / --fp8_base for the base model's memory"
        )
    elif args.zero_stage == 0:
        problems.append("--zero_stage 0 is plain data parallelism, which kiln does without DeepSpeed: use --zero_stage 1 or 2")
    if args.full_fp16 or args.full_bf16:
        problems.append(
            "--deepspeed keeps float32 master weights itself: drop --full_fp16/--full_bf16 (--mixed_precision trains "
            "half-precision weights under DeepSpeed)"
        )
    if args.fp16_master_weights_and_gradients and (args.mixed_precision != "fp16" or args.offload_optimizer_device != "cpu"):
        problems.append(
            "--fp16_master_weights_and_gradients needs --mixed_precision fp16 and --offload_optimizer_device cpu "
            "(DeepSpeed supports it only there)"
        )
    if "schedulefree" in (args.optimizer_type or "").lower():
        problems.append(f"--optimizer_type {args.optimizer_type}: schedule-free optimizers do not run under --deepspeed")
    return problems


def single_process_rendezvous() -> None:
    """DeepSpeed always starts torch.distributed. A launcher of several processes sets where they meet; a lone
    process (plain `python` or `accelerate launch` of one process) gets a process group of one on a free local port,
    instead of DeepSpeed's search for an MPI launcher."""
    import socket

    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def deepspeed_plugin(args):
    """accelerate's DeepSpeedPlugin for the run's options (sd-scripts' mapping): ZeRO stage, optimizer offload,
    gradient clipping at --max_grad_norm, fp16 master weights."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=args.zero_stage,
        # kiln sets each micro-batch's accumulation boundary itself (its groups end at each epoch's end); with
        # DeepSpeed's own count above 1, ZeRO-2 on several processes no longer matches the run without DeepSpeed
        gradient_accumulation_steps=1,
        gradient_clipping=args.max_grad_norm or 0.0,
        offload_optimizer_device=args.offload_optimizer_device or "none",
        offload_param_device="none",
    )
    # kiln feeds batches itself; DeepSpeed wants sizes for its throughput bookkeeping only (and checks they agree)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    plugin.deepspeed_config["train_batch_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    if args.fp16_master_weights_and_gradients:
        plugin.deepspeed_config.setdefault("fp16", {})["fp16_master_weights_and_grads"] = True
    return plugin


class DeepSpeedSteps:
    """The ZeRO engine around the adapter network: backward with kiln's accumulation groups, the optimizer step, and
    the optimizer state as weights-only data (one entry per process)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that DeepSpeed steps (the learning-rate scheduler drives its param_groups)."""
        return self.engine.optimizer.optimizer

    def backward(self, loss: torch.Tensor, last_of_group: bool) -> None:
        """`loss` is already divided by the group's size; the last batch of a group is DeepSpeed's boundary, where
        ZeRO reduces the accumulated gradients."""
        self.engine.set_gradient_accumulation_boundary(last_of_group)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        """Clip at --max_grad_norm, step, zero the gradients (all inside DeepSpeed)."""
        self.engine.set_gradient_accumulation_boundary(True)
        self.engine.step()

    def state_dicts(self) -> list[dict]:
        """Every process's ZeRO optimizer state (each holds its own partition), gathered on every process."""
        own = self.engine.optimizer.state_dict()
        states = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, own)
        return states

    def load_state_dicts(self, states: list[dict], source: str) -> None:
        """Restore the optimizer from state_dicts() of a run with as many processes, float32 masters included."""
        world = torch.distributed.get_world_size()
        if not isinstance(states, list) or len(states) != world:
            count = len(states) if isinstance(states, list) else "no DeepSpeed"
            raise ValueError(
                f"--resume {source}: the optimizer state is from a run with {count} DeepSpeed processes and this run "
                f"has {world}; resume with the same number of processes and --deepspeed"
            )
        self.engine.optimizer.load_state_dict(states, load_from_fp32_weights=True)


def state_classes() -> list:
    """The plain-data DeepSpeed classes inside a ZeRO optimizer state, allowed when a state folder is read
    (weights-only loading with these three classes, nothing else is unpickled)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
