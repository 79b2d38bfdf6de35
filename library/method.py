"""The training-method axis (DESIGN.md section 2): what a run trains and what its checkpoints hold. The trainer's loop
is the same for every method; a method answers a few questions at fixed points of it. Adapter training (LoRA and
friends) is library/method_adapter.py, full-weight training (DreamBooth, fine-tuning) library/method_full.py."""

from __future__ import annotations

import argparse
import contextlib
from abc import ABC, abstractmethod

import torch

from library.family import ModelFamily, TrainModels


@contextlib.contextmanager
def evaluation_weights(optimizer, resync=None):
    """Schedule-free optimizers hold their evaluation weights apart: switch to them for sampling, validation and
    saving, and back afterwards; `resync()` runs after each switch (copies of the weights follow). Nothing happens
    for other optimizers."""
    from library.optimizers import is_schedule_free

    inner = getattr(optimizer, "optimizer", optimizer)
    if not is_schedule_free(inner):
        yield
        return
    inner.eval()
    if resync:
        resync()
    try:
        yield
    finally:
        inner.train()
        if resync:
            resync()


class TrainingMethod(ABC):
    """Per-method hooks of the trainer. A method object lives for one run; `build` is called once the models are
    loaded, everything after it may use what `build` made."""

    tracker_name: str = "network_train"  # default --log_tracker_name
    what: str = "LoRA"  # what a checkpoint is, for messages ("saved the LoRA ...")

    # -- before anything loads ------------------------------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The method's own flags."""

    def argument_problems(self, args, family: ModelFamily) -> list[str]:
        """Problems of the method's flags (one line each), found before any model loads."""
        return []

    @abstractmethod
    def trains_text_encoders(self, args) -> bool:
        """Whether any text encoder (or an adapter in one) may be trained: their outputs cannot be cached then."""

    frozen_text_encoders_hint: str = ""  # how to freeze the text encoders (for --cache_text_encoder_outputs errors)

    # -- set-up ---------------------------------------------------------------------------------------------------

    @abstractmethod
    def build(self, args, family: ModelFamily, models: TrainModels) -> None:
        """Make what is trained, on the loaded models (still on the host, before family.place_models)."""

    def trained_modules(self) -> list[torch.nn.Module]:
        """Model parts trained in place: family.place_models keeps them in `trained_dtype` instead of the working
        dtype."""
        return []

    def trained_dtype(self, args) -> torch.dtype:
        return torch.float32

    def to_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move what `build` made onto the device (after family.place_models)."""

    @abstractmethod
    def param_groups(self, args) -> tuple[list[dict], list[str]]:
        """The optimizer's parameter groups (rate-0 groups left out) and a name for each (the lr/<name> log keys)."""

    def optimizer_groups(self, groups: list[dict]) -> list[dict]:
        """The groups the optimizer updates: `groups`, or copies the method keeps in another precision."""
        return groups

    def make_optimizer(self, args, groups: list[dict]):
        """(name, args string, optimizer) for the optimizer groups."""
        from library.optimizers import make_optimizer

        return make_optimizer(args, groups)

    def prepare(self, accelerator) -> None:
        """After to_device, before the optimizer is built: put the trained modules under the engine that spreads
        them over several processes (DDP, FSDP), where the method does so; nothing by default."""

    # whether gradients come out of backward averaged over the processes (else the trainer averages them)
    averages_gradients: bool = False
    # whether the method shards what it trains when launched for FSDP (library/sharding.py)
    shards: bool = False

    # -- the loop -------------------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def text_encoder_training(self) -> bool:
        """Whether gradients flow through the text encoders at this point of the run."""

    @property
    def trains_denoiser(self) -> bool:
        """Whether the denoiser (or an adapter in it) is trained: it runs in training mode then."""
        return True

    # the optimizer clips each gradient as it steps inside backward (--fused_backward_pass): no global clipping
    clips_in_backward: bool = False

    @property
    def deepspeed_module(self) -> torch.nn.Module:
        """The module DeepSpeed's engine wraps (--deepspeed)."""
        raise NotImplementedError(f"{type(self).__name__} does not train under DeepSpeed")

    def start_at(self, step: int) -> None:
        """The run starts (or resumes) after `step` optimizer steps."""

    def before_batch(self, batch: dict) -> None:
        """Called before each training or validation batch's forward."""

    def before_optimizer_step(self) -> None:
        """After the gradients are complete (and averaged over processes), before clipping and the step."""

    def after_optimizer_step(self, step: int) -> dict[str, float]:
        """After the optimizer step numbered `step` (1-based); returns values to log."""
        return {}

    def evaluation_weights(self, optimizer) -> contextlib.AbstractContextManager:
        """The weights previews, validation and checkpoints see (schedule-free optimizers keep them apart)."""
        return evaluation_weights(optimizer, self.weights_changed)

    def weights_changed(self) -> None:
        """The trained weights were changed outside the optimizer (schedule-free switch, max-norm): resync copies."""

    @contextlib.contextmanager
    def previewing(self):
        """Around sample-image generation."""
        yield

    def train_mode(self) -> None:
        """Put the trained parts in training mode (dropout on) at the start of the loop."""

    # -- checkpoints and states -----------------------------------------------------------------------------------

    @abstractmethod
    def checkpoint_metadata(self, args, family: ModelFamily, run_info: dict) -> dict[str, str]:
        """Metadata written into every checkpoint (run_info: seed, group, num_epochs, batches_per_epoch,
        optimizer_name, optimizer_args)."""

    @abstractmethod
    def save_checkpoint(
        self, args, family: ModelFamily, models: TrainModels, stem: str, metadata: dict[str, str], is_main: bool
    ) -> str:
        """Write the checkpoint `stem` (output path without extension); returns the main path written. Called in
        every process (gathering sharded weights needs them all); the main process (`is_main`) writes."""

    @abstractmethod
    def checkpoint_suffix_pattern(self, args) -> str:
        """A regular expression for what follows a checkpoint's stem in the names it writes (for pruning)."""

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's state for a --save_state folder (called in every process)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer, state: dict, source: str) -> None:
        """Restore optimizer_state() (in every process)."""
        optimizer.load_state_dict(state)

    @abstractmethod
    def state_weights(self) -> dict[str, torch.Tensor]:
        """Everything of the trained weights a --save_state folder needs for an exact resume (called in every
        process; the main process writes what it returns)."""

    @abstractmethod
    def load_state_weights(self, weights: dict[str, torch.Tensor], source: str) -> None:
        """Restore state_weights() of a state folder."""
