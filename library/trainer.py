"""The one training loop of kiln's training scripts: per-family behaviour comes from a ModelFamily, what is trained and
saved from a TrainingMethod (library/method.py: adapters, full weights).

Reproducibility: every random number of a sample (augmentation, latent sample, noise, timestep) comes from a
generator seeded by (seed, batch number, position in the batch shared by all processes). A run resumed from a state
therefore repeats the uninterrupted run exactly, and N processes train like one process with N times the batch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import signal
import time

import torch
from tqdm import tqdm

from library import config_util, saving
from library.checkpointer import Checkpointer, RunState, initial_position, save_point, write_loss_log
from library.data_loader import accumulation_group, make_data_loader
from library.datasets import DatasetGroup, build_datasets, image_paths, raise_on_errors, raise_on_undecodable
from library.family import ModelFamily, TrainModels, place_module, working_dtype
from library.method import TrainingMethod
from library.method_adapter import AdapterMethod
from library.preflight import argument_problems, tracker_settings
from library.run_control import StopSignals, restore_rng_states
from library.transfer import to_device

logger = logging.getLogger("kiln")


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what was kept."""


class TrainingInterrupted(TrainingError):
    """SIGINT/SIGTERM stopped the run at a step boundary; the adapter (and state) were saved."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def sample_seed(seed: int, batch_number: int, position: int, kind: str = "train") -> int:
    digest = hashlib.sha256(f"{seed}:{kind}:{batch_number}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_generators(seed: int, batch: dict, kind: str = "train") -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, batch["batch_number"], int(p), kind)) for p in batch["positions"]]


# ---------------------------------------------------------------------------------------------------------------------
# Set-up


def check_args(args, family: ModelFamily, method: TrainingMethod | None = None) -> None:
    """Refuse contradictory or meaningless flags before anything loads (library/preflight.py lists the checks)."""
    method = method or AdapterMethod()
    problems = argument_problems(args, family) + method.argument_problems(args, family)
    if getattr(args, "cache_text_encoder_outputs", False) and method.trains_text_encoders(args):
        problems.append(
            f"--cache_text_encoder_outputs needs {method.frozen_text_encoders_hint}: a trained text encoder changes its outputs"
        )
    if len(problems) == 1:
        raise TrainingError(problems[0])
    if problems:
        raise TrainingError("invalid arguments:\n  " + "\n  ".join(problems))
    if args.xformers or args.mem_eff_attn:
        logger.warning(
            "--xformers/--mem_eff_attn: kiln always uses PyTorch's scaled-dot-product attention (flash and memory-efficient kernels)"
        )
    if args.cache_latents_to_disk:
        args.cache_latents = True
    if args.wandb_api_key:
        os.environ["WANDB_API_KEY"] = args.wandb_api_key


def tune_backends(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the fastest (the U-Nets are
    convolution-heavy; each bucket resolution is timed on first use)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_repeated_blocks(model: torch.nn.Module, backend: str) -> int:
    """torch.compile the forward of each of the model's repeated blocks (diffusers' `_repeated_blocks` classes:
    transformer blocks), after the adapters are applied. Module hooks (block swap) stay outside the compiled code.
    Returns the number of blocks compiled."""
    names = set(getattr(model, "_repeated_blocks", ()) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise TrainingError(f"--torch_compile: {type(model).__name__} names no repeated blocks to compile")
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend)
    logger.info("--torch_compile: %d blocks compiled with %s", len(blocks), backend)
    return len(blocks)


def load_datasets(args, family: ModelFamily, seed: int, decode_check: bool = True) -> DatasetGroup:
    """The run's datasets, every problem reported before a model loads; with decode_check, the images that training
    will decode (all without --cache_latents, else the conditioning images) are decoded once to find broken files."""
    configs = config_util.load_dataset_configs(args)
    if getattr(args, "masked_loss", False) and not any(s.alpha_mask for cfg in configs for s in cfg.subsets):
        raise config_util.ConfigError("--masked_loss needs subsets with alpha_mask = true (the mask is the images' alpha channel)")
    for cfg in configs:
        if cfg.enable_bucket and cfg.bucket_reso_steps % family.bucket_reso_multiple:
            raise config_util.ConfigError(
                f"{cfg.name}: bucket_reso_steps must be a multiple of {family.bucket_reso_multiple} for this model family"
            )
        if any(side % family.bucket_reso_multiple for side in cfg.resolution):
            raise config_util.ConfigError(
                f"{cfg.name}: resolution sides must be multiples of {family.bucket_reso_multiple} for this model family"
            )
    datasets = build_datasets(configs, seed)
    for ds in datasets:
        for p in ds.problems:
            if p.severity == "warning":
                logger.warning(str(p))
    raise_on_errors(datasets)
    if decode_check:
        raise_on_undecodable(image_paths(datasets, images=not args.cache_latents), min(8, os.cpu_count() or 1))
    return DatasetGroup(datasets, seed)


# ---------------------------------------------------------------------------------------------------------------------
# The run


def train(args, family: ModelFamily, method: TrainingMethod | None = None) -> str | None:
    """Run a whole training (adapter training unless another method is given); returns the path of the final
    checkpoint. With --debug_dataset, show the batches of the first epoch instead and train nothing (None)."""
    method = method or AdapterMethod()
    if args.debug_dataset:
        check_args(args, family, method)
        show_batches(load_datasets(args, family, args.seed if args.seed is not None else 0))
        return None
    return TrainingRun(args, family, method).run()


def show_batches(group: DatasetGroup) -> None:
    """--debug_dataset: print the first epoch's batches as training would draw them (bucket, images, processed
    captions), without loading a model."""
    loader = make_data_loader(group)
    loader.batch_sampler.set_epoch(1)
    for n, batch in enumerate(loader):
        height, width = batch["images"].shape[-2:]
        print(f"batch {n + 1}: bucket {width}x{height}")
        for key, caption in zip(batch["image_keys"], batch["captions"]):
            print(f"  {key}: {caption}")
    print(f"{len(loader.batch_sampler)} batches per epoch; --debug_dataset trains nothing")


class TrainingRun:
    """One run: __init__ sets everything up (data first, so a bad dataset fails before a model loads), run() trains."""

    def __init__(self, args, family: ModelFamily, method: TrainingMethod) -> None:
        from accelerate.utils import set_seed

        check_args(args, family, method)
        self.args, self.family, self.method = args, family, method
        args.output_name = args.output_name or "last"
        resume = saving.load_state(args.resume, deepspeed=args.deepspeed) if args.resume else None
        self._setup_accelerator()
        self.seed = resume["train_state"]["seed"] if resume else (args.seed if args.seed is not None else self._shared_random_seed())
        set_seed(self.seed)  # adapter initialisation and dropout draw from torch's global RNG
        self.group = load_datasets(args, family, self.seed)
        self.prompts = self._load_prompts()
        self._setup_models()
        self._setup_optimizer()
        self.state = RunState()
        if resume:
            self._resume(resume)
        if args.initial_step is not None or args.initial_epoch is not None:
            self._start_at_initial_step()
        method.start_at(self.state.step)
        run_info = {
            "group": self.group,
            "seed": self.seed,
            "num_epochs": self.num_epochs,
            "batches_per_epoch": self.batches_per_epoch,
            "optimizer_name": self.optimizer_name,
            "optimizer_args": self.optimizer_args,
        }
        metadata = method.checkpoint_metadata(args, family, run_info)
        self.ckpt = Checkpointer(
            args, family, method, self.models, self.optimizer, self.lr_scheduler, metadata, self.accelerator, self.deepspeed
        )
        if self.log_with:
            init_kwargs = tracker_settings(args.log_tracker_config) if args.log_tracker_config else {}
            if args.wandb_run_name:
                init_kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
            self.accelerator.init_trackers(
                args.log_tracker_name or self.method.tracker_name,
                config=_loggable_config(args) if args.log_config else {},
                init_kwargs=init_kwargs,
            )
        self.recent: list[float] = []
        self.step_logs: dict[str, float] = {}
        self.last_sampled = self.last_validated = None

    # -- set-up ---------------------------------------------------------------------------------------------------

    def _shared_random_seed(self) -> int:
        """A random seed for a run without --seed, the same in every process (they must draw the same numbers)."""
        from accelerate.utils import broadcast_object_list

        seed = [random.randint(0, 2**31 - 1)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(seed)
        logger.info(f"no --seed given: this run uses seed {seed[0]}")
        return seed[0]

    def _load_prompts(self) -> list:
        from library.sample_prompts import SamplePromptError, load_sample_prompts

        if not self.args.sample_prompts:
            return []
        try:
            return load_sample_prompts(
                self.args.sample_prompts, self.family.sample_defaults, unsupported=self.family.sample_unsupported
            )
        except SamplePromptError as e:
            raise TrainingError(str(e)) from None

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator

        args = self.args
        logging_dir = None
        if args.logging_dir:
            logging_dir = os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))
        self.log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
        trackers = None if self.log_with is None else ("all" if self.log_with == "all" else [self.log_with])
        process_group = {}
        if args.ddp_timeout:
            from datetime import timedelta

            process_group["timeout"] = timedelta(minutes=args.ddp_timeout)
        if args.deepspeed and not torch.cuda.is_available():
            process_group["backend"] = "gloo"  # without a GPU accelerate picks no backend for DeepSpeed's processes
        handlers = []
        if process_group:
            from accelerate.utils import InitProcessGroupKwargs

            handlers.append(InitProcessGroupKwargs(**process_group))
        from library.sharding import take_fsdp_request

        if take_fsdp_request() and not self.method.shards:
            logger.info("launched for FSDP: only whole-model training is sharded; the adapter is replicated in every process")
        plugin = None
        if args.deepspeed:
            from library.deepspeed_run import deepspeed_plugin, single_process_rendezvous

            single_process_rendezvous()
            plugin = deepspeed_plugin(args)
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=trackers,
            project_dir=logging_dir,
            kwargs_handlers=handlers,
            deepspeed_plugin=plugin,
        )
        self.device = self.accelerator.device
        if args.deepspeed and self.accelerator.distributed_type != "DEEPSPEED":
            raise TrainingError(
                f"--deepspeed: accelerate started {self.accelerator.distributed_type.value} instead of DeepSpeed (on a "
                "CPU-only machine, launch without --cpu and without ACCELERATE_USE_CPU=true)"
            )
        if args.mixed_precision == "fp16" and self.device.type == "cpu":
            raise TrainingError("--mixed_precision fp16 does not run on CPU (it would silently train in float32); use bf16")
        tune_backends(self.device)
        logger.info(f"device {self.device}; torch uses {torch.get_num_threads()} CPU threads")
        self.weight_dtype = working_dtype(args.mixed_precision)
        try:
            os.makedirs(args.output_dir, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"--output_dir {args.output_dir} cannot be created: {e.strerror or e}") from None
        if self.accelerator.is_main_process:
            for path in saving.remove_unfinished(args.output_dir, args.output_name):
                logger.info(f"cleaned up after a run that was stopped while saving: {path}")

    def _setup_models(self) -> None:
        args, family, device, dtype = self.args, self.family, self.device, self.weight_dtype
        self.models = models = family.load_models(args)
        for m in [*models.text_encoders, models.vae, models.denoiser]:
            m.requires_grad_(False)
            m.eval()
        models.vae.to(device, family.vae_dtype(args, dtype))
        self.latent_cache = cache_all_latents(args, family, models, self.group, self.accelerator) if args.cache_latents else None
        self.te_cache = None
        if getattr(args, "cache_text_encoder_outputs", False):
            for te in models.text_encoders:
                place_module(te, device, dtype)  # float8 text encoders stay float8
            self.te_cache = cache_all_text_outputs(args, family, models, self.group, self.accelerator)
        try:
            self.method.build(args, family, models)
            family.place_models(args, models, device, dtype, self.method.trained_modules(), self.method.trained_dtype(args))
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if self.te_cache is not None and not self.prompts:
            for te in models.text_encoders:  # every caption is cached and nothing samples: free their device memory
                te.to("cpu")
        self.method.to_device(device, dtype)
        try:
            self.method.prepare(self.accelerator)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        train_te = self.method.text_encoder_training
        if args.gradient_checkpointing:
            models.denoiser.enable_gradient_checkpointing(family.gradient_checkpointing_func(args))
            if train_te:
                for te in models.text_encoders:
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.torch_compile:
            compile_repeated_blocks(models.denoiser, args.dynamo_backend)
        models.denoiser.train(self.method.trains_denoiser)
        for te in models.text_encoders:
            te.train(train_te)

    def _setup_optimizer(self) -> None:
        from library.optimizers import make_lr_scheduler, scheduler_needs_metric

        args, acc = self.args, self.accelerator
        groups, self.group_names = self.method.param_groups(args)
        if not groups:
            raise TrainingError("nothing to train: every parameter group has learning rate 0")
        self.trainable = [p for g in groups for p in g["params"]]
        for p in self.trainable:
            p.requires_grad_(True)
        optimizer_groups = self.method.optimizer_groups(groups)
        self.optimized = [p for g in optimizer_groups for p in g["params"]]
        try:
            self.optimizer_name, self.optimizer_args, optimizer = self.method.make_optimizer(args, optimizer_groups)
        except ValueError as e:
            raise TrainingError(str(e)) from None

        n_proc, rank = acc.num_processes, acc.process_index
        self.loader = make_data_loader(
            self.group,
            num_workers=min(args.max_data_loader_n_workers, os.cpu_count() or 1),
            max_train_steps=args.max_train_steps,
            batches_per_step=args.gradient_accumulation_steps,
            persistent_workers=args.persistent_data_loader_workers,
            latent_cache=self.latent_cache,
            te_cache=self.te_cache,
            num_processes=n_proc,
            process_index=rank,
            pin_memory=self.device.type == "cuda",
        )
        self.val_loader = None
        if any(ds.validation for ds in self.group.datasets):
            self.val_loader = make_data_loader(
                self.group,
                validation=True,
                latent_cache=self.latent_cache,
                te_cache=self.te_cache,
                num_processes=n_proc,
                process_index=rank,
            )
        self.batches_per_epoch = len(self.loader.batch_sampler)
        steps_per_epoch = math.ceil(self.batches_per_epoch / args.gradient_accumulation_steps)
        if args.max_train_epochs:
            args.max_train_steps = args.max_train_epochs * steps_per_epoch
        self.num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
        if args.save_n_epoch_ratio:
            args.save_every_n_epochs = max(1, self.num_epochs // args.save_n_epoch_ratio)
            logger.info(f"--save_n_epoch_ratio {args.save_n_epoch_ratio}: a checkpoint every {args.save_every_n_epochs} epochs")
        self.deepspeed = None
        if args.deepspeed:
            from library.deepspeed_run import DeepSpeedSteps

            engine, self.optimizer = acc.prepare(self.method.deepspeed_module, optimizer)
            self.deepspeed = DeepSpeedSteps(engine)
            # the scheduler drives the optimizer DeepSpeed steps (with CPU offload, DeepSpeed's own CPU Adam)
            lr_scheduler = make_lr_scheduler(args, self.deepspeed.torch_optimizer, args.max_train_steps, n_proc)
            self.lr_scheduler = acc.prepare_scheduler(lr_scheduler)  # steps n_proc times a step, as without DeepSpeed
        else:
            lr_scheduler = make_lr_scheduler(args, optimizer, args.max_train_steps, n_proc)
            self.optimizer, self.lr_scheduler = acc.prepare(optimizer, lr_scheduler)
        self.metric_scheduler = scheduler_needs_metric(lr_scheduler)

    def _resume(self, resume: dict) -> None:
        try:
            self.method.load_state_weights(resume["network"], self.args.resume)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        if self.deepspeed:
            self.deepspeed.load_state_dicts(resume["optimizer"], self.args.resume)
        elif isinstance(resume["optimizer"], list):
            raise TrainingError(f"--resume {self.args.resume}: this state was written by a --deepspeed run; add --deepspeed")
        else:
            try:
                self.method.load_optimizer_state(self.optimizer, resume["optimizer"], self.args.resume)
            except ValueError as e:
                raise TrainingError(str(e)) from None
        self.lr_scheduler.load_state_dict(resume["lr_scheduler"])
        restore_rng_states(resume["rng"])
        ts = resume["train_state"]
        history = ts.get("loss_history", [])
        self.state = RunState(
            epoch=ts["current_epoch"],
            step=ts["current_step"],
            batches_done=ts["batches_done"],
            loss_history=history,
            first_logged_step=ts.get("first_logged_step", ts["current_step"] + 1 - len(history)),
        )
        logger.info(f"resumed from {self.args.resume} at step {self.state.step} (epoch {self.state.epoch})")

    def _start_at_initial_step(self) -> None:
        """--initial_step/--initial_epoch (with or without --skip_until_initial_step), as sd-scripts."""
        args = self.args
        steps_per_epoch = math.ceil(self.batches_per_epoch / args.gradient_accumulation_steps)
        step = args.initial_step if args.initial_step is not None else (args.initial_epoch - 1) * steps_per_epoch
        if args.initial_step is not None and args.initial_epoch is not None:
            logger.info(f"--initial_step {args.initial_step} and --initial_epoch {args.initial_epoch}: --initial_step wins")
        if step >= args.max_train_steps:
            raise TrainingError(
                f"the run would start at step {step} (--initial_step/--initial_epoch) but --max_train_steps is "
                f"{args.max_train_steps}: nothing is left to train; raise --max_train_steps or --max_train_epochs"
            )
        if args.resume:
            logger.info(f"the position of the --resume state (step {self.state.step}) is replaced by step {step}")
        self.state = initial_position(step, steps_per_epoch, args.gradient_accumulation_steps, args.skip_until_initial_step)
        if args.skip_until_initial_step:
            logger.info(f"starting at step {step} (epoch {self.state.epoch}); the batches of the steps before it are skipped")
        else:
            logger.info(
                f"starting at epoch {self.state.epoch} (the epoch of step {step}), counting steps from 0; add "
                f"--skip_until_initial_step to count from step {step}"
            )
        if not args.resume:
            logger.info("the learning-rate schedule starts from its beginning (only a --resume state holds its position)")

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> str:
        args, state = self.args, self.state
        if args.sample_at_first and state.step == 0:
            self.sample(0)
        self.progress = tqdm(
            total=args.max_train_steps, initial=state.step, desc="steps", disable=not self.accelerator.is_local_main_process
        )
        self.method.train_mode()
        with StopSignals() as stop:
            try:
                while state.epoch <= self.num_epochs and state.step < args.max_train_steps and not self.stop_requested(stop):
                    self.train_epoch(stop)
            finally:
                self.progress.close()  # an error message then starts on a line of its own
            return self.finish(stop)

    def train_epoch(self, stop: StopSignals) -> None:
        """The rest of the current epoch, step by step, until its end, --max_train_steps or a stop signal. Gradient
        accumulation groups each epoch's batches on their own (see data_loader.accumulation_group)."""
        args, state = self.args, self.state
        self.loader.batch_sampler.set_epoch(state.epoch, state.batches_done)
        epoch_losses, step_losses = [], []
        for batch in self.loader:
            _, group_size = accumulation_group(state.batches_done, self.batches_per_epoch, args.gradient_accumulation_steps)
            state.batches_done += 1
            step_losses.append(self.backward(batch, group_size, last_of_group=len(step_losses) + 1 == group_size))
            if len(step_losses) < group_size:
                continue
            step_losses = self.global_losses(step_losses)
            self.optimizer_step(step_losses)
            epoch_losses += self.read_losses(step_losses)
            step_losses = []
            self.after_step(sum(epoch_losses[-group_size:]) / group_size)
            if state.step >= args.max_train_steps or self.stop_requested(stop):
                break
        if state.batches_done >= self.batches_per_epoch:
            self.after_epoch(epoch_losses)

    def stop_requested(self, stop: StopSignals) -> bool:
        """Whether a process got SIGINT/SIGTERM; with several processes all of them stop at the same step."""
        if self.accelerator.num_processes == 1:
            return stop.signum is not None
        flag = torch.tensor(float(stop.signum is not None), device=self.device)
        return self.accelerator.reduce(flag, "sum").item() > 0

    def backward(self, batch: dict, group_size: int, last_of_group: bool) -> torch.Tensor:
        """Forward and backward of one batch of a step of `group_size` batches (the step trains on their mean loss),
        queued without waiting for the GPU; returns this process's [loss sum, real sample count] (device)."""
        self.method.before_batch(batch)
        loss, logged = batch_loss(
            self.args,
            self.family,
            self.models,
            batch,
            self.seed,
            self.device,
            self.weight_dtype,
            self.method.text_encoder_training,
            self.accelerator,
        )
        if self.deepspeed:
            self.deepspeed.backward(loss / group_size, last_of_group)
        else:
            self.accelerator.backward(loss / group_size)
        return logged

    def global_losses(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Each batch's mean loss over every process's real samples, from the batches' [loss sum, sample count]
        (a process whose share of a batch is only padding counts nothing); still on the device."""
        totals = torch.stack(parts)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, "sum")
        return totals[:, 0] / totals[:, 1].clamp(min=1)

    def read_losses(self, losses: torch.Tensor) -> list[float]:
        """The step's batch losses as numbers: the one point per step where the host waits for the GPU (after the
        optimizer step is queued). A non-finite loss stops the run before anything is saved."""
        values = losses.tolist()
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            raise TrainingError(
                f"the loss became {bad} at step {self.state.step}; training stopped. The last saved checkpoint "
                "is kept. Lower the learning rate, or try --mixed_precision bf16 instead of fp16."
            )
        return values

    def optimizer_step(self, losses: torch.Tensor) -> None:
        """One optimizer step on the accumulated gradients; `losses`: the step's batch losses over all processes (a
        plateau scheduler reads their mean, the same in every process)."""
        if self.deepspeed:  # DeepSpeed reduces, clips, steps and zeroes the gradients itself
            self.deepspeed.step()
        else:
            if self.accelerator.num_processes > 1 and not self.method.averages_gradients:
                all_reduce_mean([p for p in self.trainable if p.requires_grad], self.accelerator.num_processes)
            self.method.before_optimizer_step()
            if self.args.max_grad_norm and not self.method.clips_in_backward:
                self.accelerator.clip_grad_norm_(self.optimized, self.args.max_grad_norm)
            self.optimizer.step()
        self.lr_scheduler.step(losses.mean().item()) if self.metric_scheduler else self.lr_scheduler.step()
        if not self.deepspeed:
            self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.step_logs = self.method.after_optimizer_step(self.state.step)
        self.progress.update(1)

    def after_step(self, loss: float) -> None:
        """Logs, max-norm, and what is due every N steps: checkpoint, samples, validation."""
        args, state = self.args, self.state
        logs = {"loss/current": loss, **self.step_logs}
        self.recent = (self.recent + [loss])[-self.batches_per_epoch :]
        logs["loss/average"] = sum(self.recent) / len(self.recent)
        for name, lr in zip(self.group_names, self.lr_scheduler.get_last_lr()):
            logs[f"lr/{name}"] = lr
        self.progress.set_postfix(avr_loss=f"{logs['loss/average']:.4f}")
        state.loss_history.append(loss)
        if self.log_with:
            self.accelerator.log(logs, step=state.step)
        if args.save_every_n_steps and state.step % args.save_every_n_steps == 0:
            self.save_point(step=state.step)
        if args.sample_every_n_steps and not args.sample_every_n_epochs and state.step % args.sample_every_n_steps == 0:
            self.sample(state.step)
        if args.validate_every_n_steps and state.step % args.validate_every_n_steps == 0:
            self.validate(state.step, "step")

    def after_epoch(self, epoch_losses: list[float]) -> None:
        args, state = self.args, self.state
        finished = state.epoch
        state.epoch, state.batches_done = finished + 1, 0  # first, so that a state saved below resumes at the next epoch
        if self.log_with and epoch_losses:
            self.accelerator.log({"loss/epoch_average": sum(epoch_losses) / len(epoch_losses)}, step=finished)
        not_last = finished < self.num_epochs and state.step < args.max_train_steps
        if not_last and finished % (args.validate_every_n_epochs or 1) == 0:
            self.validate(finished, "epoch")
        if not_last and args.save_every_n_epochs and finished % args.save_every_n_epochs == 0:
            self.save_point(epoch=finished)
        if not_last and args.sample_every_n_epochs and finished % args.sample_every_n_epochs == 0:
            self.sample(state.step, finished)

    def finish(self, stop: StopSignals) -> str:
        """The final adapter (and state), validation and samples; after a stop signal only the files, then
        TrainingInterrupted."""
        args, state = self.args, self.state
        interrupted = self.stop_requested(stop)
        if not interrupted and self.last_validated != state.step:
            self.validate(state.step, "step")
        with self.method.evaluation_weights(self.optimizer):
            final = self.ckpt.save_model(args.output_name, state)
        saved = [final]
        if args.save_state or args.save_state_on_train_end:
            saved.append(self.ckpt.save_state(args.output_name, state, self.seed))
        if not interrupted and (args.sample_every_n_steps or args.sample_every_n_epochs) and self.last_sampled != state.step:
            # at the end of an epoch, samples by epochs are named by it (<name>_e000003_...), as sd-scripts names them
            at_epoch_end = args.sample_every_n_epochs and state.batches_done == 0 and state.epoch > 1
            self.sample(state.step, state.last_epoch if at_epoch_end else None)
        write_loss_log(args, state, self.accelerator)
        self.accelerator.end_training()
        if interrupted:
            how = f"continue with --resume {saved[1]}" if len(saved) > 1 else "add --save_state to be able to continue"
            raise TrainingInterrupted(
                stop.signum or signal.SIGTERM,
                f"{stop.name or 'a stop signal'}: stopped after step {state.step}; saved {', '.join(saved)}; {how}",
            )
        return final

    # -- what happens every N steps --------------------------------------------------------------------------------

    def save_point(self, step: int | None = None, epoch: int | None = None) -> None:
        with self.method.evaluation_weights(self.optimizer):
            save_point(self.ckpt, self.args, self.state, self.seed, step=step, epoch=epoch)

    def sample(self, step: int, epoch: int | None = None) -> None:
        self.last_sampled = step
        if self.prompts and self.accelerator.is_main_process:
            with self.method.evaluation_weights(self.optimizer), self.method.previewing(), self.accelerator.autocast():
                self.family.sample_images(
                    self.args,
                    self.models,
                    self.prompts,
                    self.args.output_dir,
                    self.args.output_name,
                    step if epoch is None else None,
                    epoch,
                    self.device,
                    self.weight_dtype,
                )
        self.accelerator.wait_for_everyone()

    def validate(self, x: int, kind: str) -> None:
        if self.val_loader is None:
            return
        self.last_validated = self.state.step
        with self.method.evaluation_weights(self.optimizer):
            validate(
                self.args,
                self.family,
                self.models,
                self.val_loader,
                self.seed,
                self.device,
                self.weight_dtype,
                self.accelerator,
                sum(self.recent) / max(len(self.recent), 1),
                x,
                kind,
                self.log_with,
                self.method,
            )


def all_reduce_mean(params: list[torch.Tensor], num_processes: int) -> None:
    """Average the gradients over processes in one collective (missing gradients count as zero)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= num_processes
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g)
        offset += n


def batch_latents(
    family: ModelFamily, models: TrainModels, batch: dict, generators: list[torch.Generator], device, dtype
) -> torch.Tensor:
    """A latent sample per image (from the cached distribution or by encoding the pixels), scaled for the denoiser."""
    if "latents_mean" in batch:
        mean, std = batch["latents_mean"], batch["latents_std"]
    else:
        with torch.no_grad():
            mean, std = family.encode_images(models, to_device(batch["images"], device, models.vae.dtype))
    eps = to_device(torch.cat([torch.randn((1,) + mean.shape[1:], generator=g) for g in generators]), mean.device)
    latents = family.scale_latents(mean.float() + std.float() * eps)  # cached latents: computed on the host
    return to_device(torch.nan_to_num(latents), device, dtype)


def batch_loss(
    args,
    family: ModelFamily,
    models: TrainModels,
    batch: dict,
    seed: int,
    device,
    dtype,
    train_te: bool,
    accelerator,
    timesteps: torch.Tensor | None = None,
    kind: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, this process's [sum of weighted sample losses, real sample count] for logging, on
    the device: Trainer.global_losses turns them into each batch's mean over every process). Nothing in here
    waits for the GPU: host tensors go over with to_device, and the logged value is read once per optimizer step."""
    generators = sample_generators(seed, batch, kind)
    latents = batch_latents(family, models, batch, generators, device, dtype)
    with accelerator.autocast():
        with torch.set_grad_enabled(train_te and kind == "train"):
            conds = family.text_conditioning(args, models, batch)
        losses = family.sample_losses(args, models, batch, latents, conds, generators, timesteps)
    loss = (losses * to_device(batch["loss_weights"] * batch["loss_scales"], device)).sum()
    real = batch["loss_scales"] > 0  # padding samples of an uneven per-process share have scale 0
    weighted = losses.detach() * to_device(batch["loss_weights"], device)
    logged = torch.stack([torch.where(to_device(real, device), weighted, 0.0).sum(), weighted.new_tensor(float(real.sum()))])
    return loss, logged


def validate(
    args, family, models, val_loader, seed, device, dtype, accelerator, train_average, x, kind, log_with, method
) -> float:
    """Mean loss over the validation images at fixed timesteps, with noise fixed by the validation seed (each
    dataset's network_multiplier applied, as in training)."""
    val_seed = args.validation_seed if args.validation_seed is not None else seed
    val_loader.batch_sampler.set_epoch(1)
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    with torch.no_grad():
        for n, batch in enumerate(val_loader):
            if args.max_validation_steps and n >= args.max_validation_steps:
                break
            method.before_batch(batch)
            for t in family.validation_timesteps(args):
                timesteps = torch.full((len(batch["captions"]),), t, dtype=torch.long)
                loss, _ = batch_loss(
                    args, family, models, batch, val_seed, device, dtype, False, accelerator, timesteps, kind=f"val{t}"
                )
                total += loss.detach() / float(accelerator.num_processes)
                count += 1
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum") / accelerator.num_processes
    value = (total / count.clamp(min=1)).item()
    if log_with:
        accelerator.log(
            {f"loss/validation/{kind}_average": value, f"loss/validation/{kind}_divergence": value - train_average}, step=x
        )
    logger.info(f"validation loss ({kind} {x}): {value:.5f}")
    return value


def cache_all_latents(args, family: ModelFamily, models: TrainModels, group: DatasetGroup, accelerator):
    from library.latent_cache import LatentCache, check_cacheable
    from library.strategy_base import LatentsCachingStrategy, module_fingerprint

    try:
        check_cacheable(group)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    strategy = LatentsCachingStrategy(family.arch, args.cache_latents_to_disk, args.vae_batch_size, args.skip_cache_check)
    cache = LatentCache(strategy, module_fingerprint(models.vae))
    cache.fill(
        group,
        lambda images: family.encode_images(models, images),
        accelerator.device,
        models.vae.dtype,
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.is_local_main_process,
    )
    accelerator.wait_for_everyone()
    return cache


def cache_all_text_outputs(args, family: ModelFamily, models: TrainModels, group: DatasetGroup, accelerator):
    """Encode every caption (and caption variant) once; the text encoders are not run during training afterwards."""
    from library.te_cache import TextEncoderOutputCache

    if not family.caches_text_encoder_outputs:
        raise TrainingError(f"{family.script_name} has no text-encoder output cache")
    keys = family.text_output_keys

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad(), accelerator.autocast():
            outputs = family.encode_text(args, models, captions)
        return dict(zip(keys, outputs))

    batch_size = args.text_encoder_batch_size or 8
    cache = TextEncoderOutputCache(
        family.arch,
        encode,
        family.text_cache_identity(args, models),
        args.cache_text_encoder_outputs_to_disk,
        batch_size=batch_size,
        variants=args.text_encoder_cache_variants,
    )
    try:
        cache.fill(group, accelerator.process_index, accelerator.num_processes, accelerator.is_local_main_process)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    accelerator.wait_for_everyone()
    return cache


def _loggable_config(args) -> dict:
    """The arguments for --log_config, without secrets and absolute paths."""
    out = {}
    for k, v in vars(args).items():
        if "api_key" in k or "token" in k:
            continue
        if isinstance(v, str) and os.path.isabs(v):
            v = os.path.basename(v)
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
