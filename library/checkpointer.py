"""What a run saves and where: checkpoints (adapter files or whole models) and training states under sd-scripts' names (atomically, pruned by
--save_last_n_*), the run's position (RunState) and its loss history."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

from library import saving
from library.run_control import rng_states

logger = logging.getLogger("kiln")


@dataclass
class RunState:
    """Where a run stands (saved in a state's train_state.json)."""

    epoch: int = 1
    step: int = 0
    batches_done: int = 0  # batches of the current epoch already trained
    loss_history: list = field(default_factory=list)  # the loss of every step since step first_logged_step
    first_logged_step: int = 1  # states written before kiln kept the whole history start later

    @property
    def last_epoch(self) -> int:
        """The epoch of the last step taken (once an epoch is over, `epoch` already names the next one)."""
        return self.epoch - 1 if self.batches_done == 0 and self.epoch > 1 else self.epoch


def initial_position(step: int, steps_per_epoch: int, batches_per_step: int, skip: bool) -> RunState:
    """Where a run given --initial_step `step` starts (sd-scripts' meaning). `skip` (--skip_until_initial_step): at
    step `step`, in its epoch, past the batches of that epoch's earlier steps. Otherwise at step 0 at the start of the
    epoch that holds step `step`: only the epoch counter moves."""
    epoch = step // steps_per_epoch + 1
    if not skip:
        return RunState(epoch=epoch)
    return RunState(epoch=epoch, step=step, batches_done=(step % steps_per_epoch) * batches_per_step, first_logged_step=step + 1)


class Checkpointer:
    """Saves checkpoints (what the training method writes) and training states with sd-scripts' names, atomically,
    and prunes old ones."""

    def __init__(
        self, args, family, method, models, optimizer, lr_scheduler, metadata: dict[str, str], accelerator, deepspeed=None
    ) -> None:
        self.args, self.family, self.method, self.models = args, family, method, models
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.deepspeed = deepspeed  # library.deepspeed_run.DeepSpeedSteps: the optimizer state is every process's
        self.metadata = metadata
        self.accelerator = accelerator

    def save_model(self, name: str, state: RunState) -> str:
        """The checkpoint `name` (written by the main process); returns its path."""
        stem = os.path.join(self.args.output_dir, name)
        main = self.accelerator.is_main_process
        md = dict(self.metadata)
        md.update({"ss_training_finished_at": str(time.time()), "ss_steps": str(state.step), "ss_epoch": str(state.last_epoch)})
        path = self.method.save_checkpoint(self.args, self.family, self.models, stem, md, main)
        if main:
            logger.info(f"saved {path}")
        self.accelerator.wait_for_everyone()
        return path

    def save_state(self, name: str, state: RunState, seed: int) -> str:
        folder = os.path.join(self.args.output_dir, name + "-state")
        optimizer_state = self.deepspeed.state_dicts() if self.deepspeed else self.method.optimizer_state(self.optimizer)
        weights = self.method.state_weights()  # every process: sharded weights are gathered
        if self.accelerator.is_main_process:
            train_state = {
                "current_epoch": state.epoch,
                "current_step": state.step,
                "batches_done": state.batches_done,
                "seed": seed,
                "first_logged_step": state.first_logged_step,
                "loss_history": state.loss_history,
            }
            saving.save_state(folder, weights, optimizer_state, self.lr_scheduler.state_dict(), train_state, rng_states())
            logger.info(f"saved state {folder}")
        self.accelerator.wait_for_everyone()
        return folder

    def prune(self, kind: str, keep_from: int, state: bool) -> None:
        if self.accelerator.is_main_process:
            suffix = self.method.checkpoint_suffix_pattern(self.args)
            saving.prune_checkpoints(self.args.output_dir, self.args.output_name, suffix, kind, keep_from, state)


def save_point(ckpt: Checkpointer, args, state: RunState, seed: int, step: int | None = None, epoch: int | None = None) -> None:
    """A checkpoint (and its state with --save_state) at a step or epoch, then pruning by --save_last_n_*."""
    name = saving.checkpoint_name(args.output_name, epoch=epoch, step=step)
    ckpt.save_model(name, state)
    if args.save_state:
        ckpt.save_state(name, state, seed)
    if step is not None:
        if args.save_last_n_steps:
            ckpt.prune("step", step - args.save_last_n_steps, False)
        if args.save_last_n_steps_state:
            ckpt.prune("step", step - args.save_last_n_steps_state, True)
    else:
        every = args.save_every_n_epochs or 1
        if args.save_last_n_epochs:
            ckpt.prune("epoch", epoch - (args.save_last_n_epochs - 1) * every, False)
        if args.save_last_n_epochs_state:
            ckpt.prune("epoch", epoch - (args.save_last_n_epochs_state - 1) * every, True)


def write_loss_log(args, state: RunState, accelerator) -> None:
    """`{output_name}_losses.json`: the loss of every step, across resumes (states keep the history)."""
    if accelerator.is_main_process:
        path = os.path.join(args.output_dir, f"{args.output_name}_losses.json")
        saving.atomic_write_bytes(path, json.dumps({"first_step": state.first_logged_step, "losses": state.loss_history}).encode())
