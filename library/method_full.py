"""Full-weight training (DreamBooth and fine-tuning: train_db.py, fine_tune.py, sdxl_train.py, sd3_train.py,
flux_train.py): the denoiser's own weights, and optionally each text encoder's, are trained; checkpoints are whole
models in the family's original single-file layout or a diffusers folder (ModelFamily.save_checkpoint).

Memory options: --fused_backward_pass and --blockwise_fused_optimizers step the optimizer inside backward
(library/full_optim.py ChunkedOptimizer), --full_bf16 keeps bf16 weights without float32 masters and rounds their
updates stochastically, --ema_decay keeps an exponential moving average (library/ema.py). --blocks_to_swap (FLUX, SD3)
keeps the trained weights of the transformer's last blocks in host memory with their optimizer state: it needs
--fused_backward_pass or --blockwise_fused_optimizers, so that each swapped block is stepped inside its own backward
while it is on the device (library/custom_offloading_utils.py BlockSwapper, ChunkedOptimizer.stream_with); whatever
reads or writes all the weights (EMA, checkpoints, states) does it inside the swapper's own_weights()."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
from dataclasses import dataclass

import torch

from library import saving
from library.family import ModelFamily, TrainModels
from library.method import TrainingMethod

logger = logging.getLogger("kiln")

# What follows a checkpoint's stem in the names a full checkpoint writes: the EMA copy, SD3's text-encoder side files,
# the extension (none for a diffusers folder).
CHECKPOINT_SUFFIXES = r"(?:-ema)?(?:_clip_l|_clip_g|_t5xxl)?(?:\.safetensors|\.ckpt)?"

SAVE_FORMATS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors")


def default_save_format(model: str | None) -> str:
    """--save_model_as when not given: the format of the user's model (a diffusers folder or a single file)."""
    return "diffusers" if os.path.isdir(model or "") else "safetensors"


@dataclass(frozen=True)
class TextEncoderOption:
    """How a script lets the user train one text encoder (in the family's order of models.text_encoders)."""

    lr_flag: str  # its learning-rate flag, e.g. "learning_rate_te1" (None/unset: --learning_rate)
    train_flag: str | None  # the switch that trains it, e.g. "train_text_encoder"; None: trained unless a negative
    #                         --stop_text_encoder_training says otherwise (DreamBooth)
    label: str  # the lr/<label> log key and messages


@dataclass(frozen=True)
class FullScript:
    """The full-training flags a script has (sd-scripts' command line of that script)."""

    text_encoders: tuple[TextEncoderOption, ...] = ()
    stop_text_encoder_training: bool = False  # --stop_text_encoder_training
    no_token_padding: bool = False  # --no_token_padding (train_db.py)
    block_lr: int = 0  # --block_lr with this many entries (SDXL: 23)
    blockwise: bool = False  # --blockwise_fused_optimizers (FLUX, SD3)
    last_blocks_to_freeze: bool = False  # --num_last_block_to_freeze (SD3)


def _lr_or_default(args, flag: str) -> float:
    value = getattr(args, flag, None)
    return args.learning_rate if value is None else value


# SDXL's --block_lr entries by original (sgm) U-Net module: 0 time and label embeddings, 1-9 input_blocks.0-8,
# 10-12 middle_block.0-2, 13-21 output_blocks.0-8, 22 the output layers.
def unet_block_index(sgm_name: str) -> int:
    """The --block_lr entry of an SDXL U-Net parameter from its sgm name (e.g. input_blocks.4.1.proj_in.weight)."""
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.", sgm_name)
    if m is None:
        return 22 if sgm_name.startswith("out.") else 0
    base = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m.group(1)]
    return base + int(m.group(2))


class FullMethod(TrainingMethod):
    """Train the model's own weights: the denoiser when --learning_rate is not 0, and the text encoders the script's
    options name."""

    tracker_name = "finetuning"
    what = "model"
    shards = True
    script_kind = "full"
    frozen_text_encoders_hint = "frozen text encoders (leave out --train_text_encoder)"

    def __init__(self, script: FullScript) -> None:
        self.script = script
        self.ema = None
        self.fused = False
        self.averages_gradients = False  # under DDP/FSDP the engines average the gradients in backward
        self.sharded = False

    # -- flags ----------------------------------------------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        s = self.script
        parser.set_defaults(learning_rate=2e-6)  # sd-scripts' default for whole-model training
        for action in parser._actions:  # shared flags that mean more for whole models
            if action.dest == "full_bf16":
                action.help = (
                    "store the trained weights in bf16 without float32 copies: each update is computed in float32 and "
                    "rounded to bf16 stochastically (unbiased, so updates below bf16's spacing are not lost); the "
                    "optimizer state stays float32 (needs --mixed_precision bf16)"
                )
            if action.dest == "save_model_as":
                action.choices, action.default = list(SAVE_FORMATS), None
                action.help = (
                    "checkpoint format: safetensors (the family's original single file), ckpt (the same as a "
                    "weights-only pickle), diffusers or diffusers_safetensors (a diffusers folder; both write "
                    "safetensors weights). Default: diffusers for a diffusers-folder model, else safetensors"
                )
        g = parser.add_argument_group("full fine-tuning")
        g.add_argument(
            "--use_safetensors", action="store_true", help="without --save_model_as: write safetensors (kiln always does)"
        )
        g.add_argument(
            "--diffusers_xformers", action="store_true", help="accepted for sd-scripts command lines; kiln uses PyTorch SDPA"
        )
        switches = sorted({te.train_flag for te in s.text_encoders if te.train_flag})
        for flag in switches:
            names = ", ".join(te.label for te in s.text_encoders if te.train_flag == flag)
            g.add_argument(f"--{flag}", action="store_true", help=f"train the text encoder weights too ({names})")
        for te in s.text_encoders:
            g.add_argument(
                f"--{te.lr_flag}", type=float, default=None, help=f"learning rate of {te.label} (default --learning_rate; 0 freezes it)"
            )
        if s.stop_text_encoder_training:
            g.add_argument(
                "--stop_text_encoder_training",
                type=int,
                default=None,
                help="stop training the text encoder after this many steps (it stays as trained then); negative: never "
                "train it",
            )
        if s.no_token_padding:
            g.add_argument(
                "--no_token_padding",
                action="store_true",
                help="no effect in sd-scripts either: captions are always padded to the maximum length (kiln says so when given)",
            )
        if s.block_lr:
            g.add_argument(
                "--block_lr",
                type=str,
                default=None,
                help=f"{s.block_lr} comma-separated learning rates of the U-Net's blocks: time/label embeddings, "
                "input_blocks 0-8, middle_block 0-2, output_blocks 0-8, output layers; 0 leaves a block untrained",
            )
        if s.last_blocks_to_freeze:
            g.add_argument(
                "--num_last_block_to_freeze",
                type=int,
                default=None,
                help="do not train the transformer's last N blocks (whole blocks; sd-scripts freezes N weight tensors)",
            )
        g.add_argument(
            "--fused_backward_pass",
            action="store_true",
            help="step each weight inside backward as soon as its gradient is ready and free the gradient at once "
            "(much less memory; any optimizer: Adafactor as sd-scripts, also AdamW, AdamW8bit...). --max_grad_norm "
            "then clips each weight tensor's gradient on its own (no global norm exists yet); not with gradient "
            "accumulation or several processes",
        )
        if s.blockwise:
            g.add_argument(
                "--blockwise_fused_optimizers",
                action="store_true",
                help="step each transformer block inside backward once all its gradients are ready (one optimizer per "
                "block, plus one for the rest): less memory than a whole-model step; --max_grad_norm clips per block",
            )
        g.add_argument(
            "--fused_optimizer_groups",
            type=int,
            default=None,
            help="split the trained weights in order into about N groups, each stepped inside backward once its "
            "gradients are ready; --max_grad_norm clips per group",
        )
        g.add_argument(
            "--ema_decay",
            type=float,
            default=None,
            help="keep an exponential moving average of the trained weights: ema = D * ema + (1 - D) * weights after "
            "every --ema_update_every steps, in float32, from the weights before training (e.g. 0.999); saved next "
            "to each checkpoint as <name>-ema",
        )
        if s.blockwise:  # the scripts of the transformer families
            g.add_argument(
                "--skip_latents_validity_check",
                action="store_true",
                help="deprecated name of --skip_cache_check (sd-scripts): trust existing cache files",
            )
        g.add_argument("--ema_update_every", type=int, default=1, help="update the EMA every N optimizer steps")
        g.add_argument("--ema_on_cpu", action="store_true", help="keep the EMA in host memory (less GPU memory)")
        g.add_argument("--sample_with_ema", action="store_true", help="sample images with the EMA weights")

    def argument_problems(self, args, family: ModelFamily) -> list[str]:
        problems = []
        for te in self.script.text_encoders:
            lr = getattr(args, te.lr_flag, None)
            if lr is not None and lr < 0:
                problems.append(f"--{te.lr_flag} {lr}: a learning rate cannot be negative")
        if not self._denoiser_lr(args) and not self._trained_text_encoders(args):
            problems.append("nothing to train: --learning_rate is 0 and no text encoder is trained; give --learning_rate a value above 0")
        if args.full_fp16:
            problems.append(
                "--full_fp16: whole-model training keeps float32 weights (mixed precision computes in fp16), or bf16 "
                "weights with stochastic rounding: use --full_bf16 with --mixed_precision bf16"
            )
        if getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False):
            problems.append(
                "--fp8_base stores the model's weights in float8, and full fine-tuning trains them: leave it out "
                "(--fused_backward_pass, --full_bf16 and --gradient_checkpointing save memory instead)"
            )
        if getattr(args, "blocks_to_swap", None) and self._denoiser_lr(args):
            if getattr(args, "fused_optimizer_groups", None):
                problems.append(
                    "--blocks_to_swap with --fused_optimizer_groups: a group spans several blocks, whose gradients "
                    "would wait on the device for the rest of the group; use --fused_backward_pass or "
                    "--blockwise_fused_optimizers instead"
                )
            elif not (args.fused_backward_pass or getattr(args, "blockwise_fused_optimizers", False)):
                problems.append(
                    "--blocks_to_swap trains each swapped block while it is on the device: add --fused_backward_pass "
                    "(or --blockwise_fused_optimizers)"
                )
        fused = [f for f in ("fused_backward_pass", "blockwise_fused_optimizers") if getattr(args, f, False)]
        if getattr(args, "fused_optimizer_groups", None):
            fused.append("fused_optimizer_groups")
            if args.fused_optimizer_groups < 1:
                problems.append(f"--fused_optimizer_groups {args.fused_optimizer_groups}: give at least 1 group")
        if len(fused) > 1:
            problems.append(f"--{' and --'.join(fused)} exclude each other: choose one way to step inside backward")
        if fused and args.gradient_accumulation_steps > 1:
            problems.append(f"--{fused[0]} steps inside backward: it cannot accumulate gradients over batches (leave out --gradient_accumulation_steps)")
        if fused and args.mixed_precision == "fp16":
            problems.append(f"--{fused[0]} cannot scale fp16 gradients: use --mixed_precision bf16")
        if fused and args.deepspeed:
            problems.append(f"--{fused[0]} and --deepspeed exclude each other")
        if args.deepspeed:
            problems.append("--deepspeed trains adapters only in kiln so far; whole-model training runs without it")
        if args.ema_decay is not None and not 0 < args.ema_decay < 1:
            problems.append(f"--ema_decay {args.ema_decay}: give a value between 0 and 1 (e.g. 0.999)")
        if args.ema_update_every < 1:
            problems.append(f"--ema_update_every {args.ema_update_every}: give a number of steps, 1 or more")
        for flag in ("ema_on_cpu", "sample_with_ema"):
            if getattr(args, flag) and args.ema_decay is None:
                problems.append(f"--{flag} needs --ema_decay")
        if self.script.block_lr and args.block_lr:
            try:
                self._block_lrs(args)
            except ValueError as e:
                problems.append(str(e))
        if getattr(args, "num_last_block_to_freeze", None) is not None and args.num_last_block_to_freeze < 0:
            problems.append(f"--num_last_block_to_freeze {args.num_last_block_to_freeze}: give a number of blocks, 0 or more")
        if getattr(args, "skip_latents_validity_check", False):
            logger.info("--skip_latents_validity_check is the old name of --skip_cache_check: existing caches are trusted")
            args.skip_cache_check = True
        if getattr(args, "no_token_padding", False):
            logger.info("--no_token_padding: no effect (as in sd-scripts): captions are padded to the maximum length")
        if getattr(args, "diffusers_xformers", False):
            logger.info("--diffusers_xformers: kiln always uses PyTorch's scaled-dot-product attention")
        return problems

    def _block_lrs(self, args) -> list[float]:
        values = [v.strip() for v in args.block_lr.split(",")]
        try:
            lrs = [float(v) for v in values]
        except ValueError:
            raise ValueError(f"--block_lr {args.block_lr}: give {self.script.block_lr} comma-separated numbers") from None
        if len(lrs) != self.script.block_lr:
            raise ValueError(f"--block_lr has {len(lrs)} values; it needs {self.script.block_lr}, one per U-Net block")
        if any(lr < 0 for lr in lrs):
            raise ValueError("--block_lr: a learning rate cannot be negative")
        return lrs

    def _denoiser_lr(self, args) -> bool:
        if self.script.block_lr and args.block_lr:
            try:
                return any(self._block_lrs(args))
            except ValueError:  # reported by argument_problems
                return True
        return args.learning_rate != 0

    def _trained_text_encoders(self, args) -> list[int]:
        """Indices of the text encoders this run trains (at its start)."""
        stop = getattr(args, "stop_text_encoder_training", None)
        if stop is not None and stop <= 0:  # sd-scripts: a negative value means the text encoder is never trained
            return []
        out = []
        for i, te in enumerate(self.script.text_encoders):
            on = getattr(args, te.train_flag, False) if te.train_flag else True
            if on and _lr_or_default(args, te.lr_flag) != 0:
                out.append(i)
        return out

    def trains_text_encoders(self, args) -> bool:
        return bool(self._trained_text_encoders(args))

    # -- set-up ---------------------------------------------------------------------------------------------------

    def build(self, args, family: ModelFamily, models: TrainModels) -> None:
        self.args, self.family, self.models = args, family, models
        self.train_unet = self._denoiser_lr(args)
        self.te_indices = self._trained_text_encoders(args)
        self.te_training = bool(self.te_indices)
        if args.save_model_as is None:
            args.save_model_as = default_save_format(args.pretrained_model_name_or_path)
        self.frozen_blocks = self._frozen_blocks(args, family, models)

    def _frozen_blocks(self, args, family: ModelFamily, models: TrainModels) -> set[str]:
        """Names (in the denoiser) of the parameters --num_last_block_to_freeze leaves untrained."""
        n = getattr(args, "num_last_block_to_freeze", None) or 0
        if not n:
            return set()
        blocks = [(f"{name}.{i}.", b) for name in family.swap_block_lists for i, b in enumerate(getattr(models.denoiser, name))]
        if n >= len(blocks):
            raise ValueError(f"--num_last_block_to_freeze {n}: the transformer has {len(blocks)} blocks; freeze fewer")
        logger.info(f"--num_last_block_to_freeze {n}: the last {n} of {len(blocks)} transformer blocks are not trained")
        return {prefix + p for prefix, b in blocks[len(blocks) - n :] for p, _ in b.named_parameters()}

    def trained_parts(self) -> dict[str, torch.nn.Module]:
        """The trained modules by the names ModelFamily.save_checkpoint uses ("denoiser", "text_encoder_<i>")."""
        parts = {"denoiser": self.models.denoiser} if self.train_unet else {}
        parts.update({f"text_encoder_{i}": self.models.text_encoders[i] for i in self.te_indices})
        return parts

    def trained_modules(self) -> list[torch.nn.Module]:
        return list(self.trained_parts().values())

    def trained_dtype(self, args) -> torch.dtype:
        return torch.bfloat16 if args.full_bf16 else torch.float32

    def param_groups(self, args) -> tuple[list[dict], list[str]]:
        groups, names = [], []
        if self.train_unet:
            params = [(n, p) for n, p in self.models.denoiser.named_parameters() if n not in self.frozen_blocks]
            if self.script.block_lr and args.block_lr:
                groups_by_block = self._block_groups(args, params)
                groups += groups_by_block
                names += [g.pop("label") for g in groups_by_block]
            else:
                groups.append({"params": [p for _, p in params], "lr": args.learning_rate})
                names.append("unet")
        for i in self.te_indices:
            te = self.script.text_encoders[i]
            groups.append({"params": list(self.models.text_encoders[i].parameters()), "lr": _lr_or_default(args, te.lr_flag)})
            names.append(te.label)
        return groups, names

    def _block_groups(self, args, named: list[tuple[str, torch.Tensor]]) -> list[dict]:
        from library.ldm_names import unet_ldm_param_names

        sgm = unet_ldm_param_names(self.models.denoiser)
        lrs = self._block_lrs(args)
        by_block: dict[int, list[torch.Tensor]] = {}
        for name, p in named:
            by_block.setdefault(unet_block_index(sgm[name]), []).append(p)
        return [
            {"params": by_block[b], "lr": lrs[b], "label": f"block_{b}"}
            for b in sorted(by_block)
            if lrs[b] != 0  # sd-scripts: a block with rate 0 is left out of the optimizer
        ]

    def make_optimizer(self, args, groups: list[dict]):
        from library.full_optim import ChunkedOptimizer
        from library.optimizers import make_optimizer

        name, arg_text, whole = make_optimizer(args, groups)
        chunks = self._chunking(args, groups)
        if chunks is None and not args.full_bf16:
            return name, arg_text, whole
        if str(args.lr_scheduler).startswith("adafactor"):
            raise ValueError(
                "Adafactor with relative_step=True computes its own learning rate over all weights at once; with "
                "--fused_backward_pass, --blockwise_fused_optimizers, --fused_optimizer_groups or --full_bf16 give "
                '--optimizer_args "relative_step=False" "scale_parameter=False" "warmup_init=False" and a --learning_rate'
            )
        del whole  # states are created on the first step: nothing was allocated
        optimizers_log = logging.getLogger("library.optimizers")
        level = optimizers_log.level
        optimizers_log.setLevel(logging.WARNING)  # the chunks' optimizers repeat the whole one's notes
        try:
            optimizer = ChunkedOptimizer(
                groups,
                lambda chunk_groups: make_optimizer(args, chunk_groups)[2],
                chunks or "parameter",
                stochastic_bf16=args.full_bf16,
                seed=args.seed or 0,
            )
        finally:
            optimizers_log.setLevel(level)
        if chunks is not None:
            optimizer.fuse_into_backward(args.max_grad_norm)
            self.fused = True
        swapper = getattr(self.family, "swapper", None)
        if swapper is not None and swapper.blocks_to_swap:
            optimizer.stream_with(swapper)  # swapped blocks are stepped in their slots, their state kept in host memory
        return name, arg_text, optimizer

    def _own_weights(self, read_only: bool = False) -> contextlib.AbstractContextManager:
        """With --blocks_to_swap: inside, every swapped block's parameters hold its own values (BlockSwapper.own_weights;
        they share device slots otherwise). For whatever reads or writes all the trained weights outside the steps."""
        swapper = getattr(self.family, "swapper", None)
        return swapper.own_weights(read_only) if swapper is not None else contextlib.nullcontext()

    def _chunking(self, args, groups: list[dict]):
        """None (one optimizer step after backward), "parameter" or a list of parameter lists: how the optimizer
        step is split and fused into backward."""
        params = [p for g in groups for p in g["params"]]
        if args.fused_backward_pass:
            return "parameter"
        if getattr(args, "blockwise_fused_optimizers", False):
            block_of = {}
            blocks = [b for name in self.family.swap_block_lists for b in getattr(self.models.denoiser, name)]
            for n, block in enumerate(blocks):
                for p in block.parameters():
                    block_of[id(p)] = n
            chunks: dict[int, list[torch.Tensor]] = {}
            for p in params:
                chunks.setdefault(block_of.get(id(p), -1), []).append(p)
            return [chunks[k] for k in sorted(chunks)]
        n = getattr(args, "fused_optimizer_groups", None)
        if n:
            size = -(-sum(p.numel() for p in params) // n)
            out, current, filled = [], [], 0
            for p in params:
                current.append(p)
                filled += p.numel()
                if filled >= size:
                    out.append(current)
                    current, filled = [], 0
            return out + ([current] if current else [])
        return None

    @property
    def clips_in_backward(self) -> bool:
        return self.fused

    def prepare(self, accelerator) -> None:
        """With several processes, the trained modules go under DDP or FSDP2 (library/sharding.py); then the EMA
        starts from the weights before training (the shards of them under FSDP)."""
        from library.sharding import distribute, sharding_requested

        args = self.args
        if accelerator.num_processes > 1:
            fused = [f for f in ("fused_backward_pass", "blockwise_fused_optimizers", "fused_optimizer_groups") if getattr(args, f, None)]
            if fused:
                raise ValueError(
                    f"--{fused[0]} steps before the processes' gradients are averaged: train on one process, or leave "
                    "the option out"
                )
            self.sharded = sharding_requested(accelerator)
            local, whole = distribute(self.trained_modules(), self.sharded)
            self.averages_gradients = True
            engine = "FSDP2 (fully_shard per block)" if self.sharded else "DDP"
            logger.info(
                f"{engine} over {accelerator.num_processes} processes: process {accelerator.process_index} holds "
                f"{local} of the {whole} trained weights"
            )
        self._start_ema()

    def _start_ema(self) -> None:
        from library.ema import EmaWeights

        if self.args.ema_decay is None or self.ema is not None:
            return
        with self._own_weights(read_only=True):  # swapped blocks' averages start (and stay) in host memory
            self.ema = EmaWeights(self._named_trained(), self.args.ema_decay, self.args.ema_update_every, self.args.ema_on_cpu)

    def _named_trained(self) -> dict[str, torch.Tensor]:
        return {
            f"{part}.{n}": p
            for part, module in self.trained_parts().items()
            for n, p in module.named_parameters()
            if not (part == "denoiser" and n in self.frozen_blocks)
        }

    # -- the loop -------------------------------------------------------------------------------------------------

    @property
    def text_encoder_training(self) -> bool:
        return self.te_training

    @property
    def trains_denoiser(self) -> bool:
        return self.train_unet

    def start_at(self, step: int) -> None:
        self._stop_text_encoders_if_due(step)

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        self._stop_text_encoders_if_due(step)
        if self.ema is not None and step % self.ema.update_every == 0:
            with self._own_weights(read_only=True):
                self.ema.after_step(step)
        return {}

    def _stop_text_encoders_if_due(self, step: int) -> None:
        stop = getattr(self.args, "stop_text_encoder_training", None)
        if not self.te_training or stop is None or step < stop:
            return
        for i in self.te_indices:
            te = self.models.text_encoders[i]
            te.requires_grad_(False)
            te.eval()
            for p in te.parameters():
                p.grad = None
        self.te_training = False
        logger.info(f"--stop_text_encoder_training {stop}: the text encoder is not trained after step {step}")

    @contextlib.contextmanager
    def previewing(self):
        modules = self.trained_modules()
        for m in modules:
            m.eval()
        try:
            with self._ema_applied() if (self.ema is not None and self.args.sample_with_ema) else contextlib.nullcontext():
                yield
        finally:
            self.train_mode()

    @contextlib.contextmanager
    def _ema_applied(self):
        """The EMA weights in the model for sampling. With --blocks_to_swap they are written into the swapped blocks'
        host buffers, from which sampling streams them, and the trained weights are put back the same way."""
        applied = self.ema.applied()
        with self._own_weights():
            applied.__enter__()
        try:
            yield
        finally:
            with self._own_weights():
                applied.__exit__(None, None, None)

    def train_mode(self) -> None:
        if self.train_unet:
            self.models.denoiser.train()
        for i in self.te_indices:
            self.models.text_encoders[i].train(self.te_training)

    # -- checkpoints and states -----------------------------------------------------------------------------------

    def checkpoint_metadata(self, args, family: ModelFamily, run_info: dict) -> dict[str, str]:
        from library.lora_metadata import modelspec_metadata

        return modelspec_metadata(args, family, run_info["group"])

    def save_checkpoint(
        self, args, family: ModelFamily, models: TrainModels, stem: str, metadata: dict[str, str], is_main: bool
    ) -> str:
        from library.sharding import whole_parameters

        dtype = saving.SAVE_DTYPES.get(args.save_precision) if args.save_precision else None
        form = "diffusers" if args.save_model_as.startswith("diffusers") else args.save_model_as
        trained = frozenset(self.trained_parts())
        modules = self.trained_modules()
        with self._own_weights(read_only=True), whole_parameters(modules, is_main):
            paths = family.save_checkpoint(args, models, stem, form, dtype, metadata, trained) if is_main else [stem]
        if self.ema is not None:
            with self._own_weights(), self.ema.applied(), whole_parameters(modules, is_main):
                if is_main:
                    family.save_checkpoint(args, models, stem + "-ema", form, dtype, metadata, trained)
        return paths[0]

    def checkpoint_suffix_pattern(self, args) -> str:
        return CHECKPOINT_SUFFIXES

    def state_weights(self) -> dict[str, torch.Tensor]:
        from library.sharding import gather_whole

        with self._own_weights(read_only=True):  # swapped blocks: their host buffers, unchanged until the next step
            weights = {n: p.detach() for n, p in self._named_trained().items()}
        if self.ema is not None:
            weights.update({"ema." + n: t for n, t in self.ema.state_dict().items()})
        return gather_whole(weights)  # FSDP shards gathered whole: a state resumes on any number of processes

    def optimizer_state(self, optimizer) -> dict:
        from library.sharding import whole_optimizer_state

        if not self.sharded:
            return optimizer.state_dict()
        return {"fsdp_whole_state": whole_optimizer_state(self.trained_parts(), getattr(optimizer, "optimizer", optimizer))}

    def load_optimizer_state(self, optimizer, state: dict, source: str) -> None:
        from library.sharding import load_whole_optimizer_state

        whole = isinstance(state, dict) and "fsdp_whole_state" in state
        if whole != self.sharded:
            how = "without --use_fsdp" if whole else "with --use_fsdp (accelerate launch --use_fsdp)"
            raise ValueError(f"--resume {source}: this state's optimizer was {'sharded' if whole else 'not sharded'}; resume {how}")
        if whole:
            load_whole_optimizer_state(self.trained_parts(), getattr(optimizer, "optimizer", optimizer), state["fsdp_whole_state"])
        else:
            optimizer.load_state_dict(state)

    def load_state_weights(self, weights: dict[str, torch.Tensor], source: str) -> None:
        named = self._named_trained()
        missing = [n for n in named if n not in weights]
        if missing:
            raise ValueError(
                f"--resume {source}: the state has no {missing[0]} ({len(missing)} trained weights missing); it was "
                "written by a run that trained other parts"
            )
        from library.sharding import shard_like

        with torch.no_grad(), self._own_weights():
            for n, p in named.items():
                p.copy_(shard_like(weights[n], p))
        if self.ema is not None:
            shadow = self.ema.state_dict()
            ema = {n[4:]: shard_like(t, shadow[n[4:]]) if n[4:] in shadow else t for n, t in weights.items() if n.startswith("ema.")}
            if not ema:
                raise ValueError(f"--resume {source}: the state holds no EMA weights; leave out --ema_decay or start anew")
            self.ema.load_state_dict(ema)


# The scripts' options (sd-scripts' command lines). The log keys follow sd-scripts: lr/unet, lr/textencoder, lr/te1...
TE = TextEncoderOption
DREAMBOOTH = FullScript(text_encoders=(TE("learning_rate_te", None, "textencoder"),), stop_text_encoder_training=True, no_token_padding=True)
FINE_TUNE = FullScript(text_encoders=(TE("learning_rate_te", "train_text_encoder", "textencoder"),))
SDXL = FullScript(
    text_encoders=(TE("learning_rate_te1", "train_text_encoder", "te1"), TE("learning_rate_te2", "train_text_encoder", "te2")),
    block_lr=23,
)
SD3 = FullScript(
    text_encoders=(
        TE("learning_rate_te1", "train_text_encoder", "te1"),
        TE("learning_rate_te2", "train_text_encoder", "te2"),
        TE("learning_rate_te3", "train_t5xxl", "te3"),
    ),
    blockwise=True,
    last_blocks_to_freeze=True,
)
FLUX = FullScript(blockwise=True)
