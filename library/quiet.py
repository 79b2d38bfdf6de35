"""Silence the third-party messages that every normal run prints and that say nothing about the run.

Each filter names the emitting logger (or warning category and module) and the start of the exact message, so that
any other message of the same library still shows. `install()` is called first thing by the training scripts and the
tools (library/train_script.py, tools/merge_lora.py); it is idempotent.

What is silenced, and why it is harmless:
- bitsandbytes (logger `bitsandbytes.backends.cpu.ops`, at import on a CPU with AVX512-BF16): "Failed to load CPU
  gemm_4bit_forward from kernels-community: No module named 'kernels'..." -- an optional 4-bit kernel kiln never uses;
  bitsandbytes falls back to its own implementation.
- diffusers (logger `diffusers.models.modeling_utils`): "There are modules in <Model> that should be kept in float32: [].
  Casting directly with `to()`..." -- only with the empty list, i.e. the model has no such modules (the U-Net, VAE,
  FLUX and SD3 transformers); a model that does list modules still warns.
- transformers (logger `transformers.utils.import_utils`): "`CLIPImageProcessor` requires torchvision (not installed);
  falling back to `CLIPImageProcessorPil`..." -- printed when diffusers' pipelines import the image processors for the
  safety checker at the first preview; kiln never runs them, and torchvision must not be installed (ENVIRONMENT.md).
- torch (DeprecationWarning from `torch.jit._script`): "`torch.jit.script_method` is deprecated" -- raised inside torch's
  own torch/utils/mkldnn.py when bitsandbytes' import first touches torch.compile; nothing in kiln calls it.
"""

from __future__ import annotations

import logging
import warnings


def _bitsandbytes_kernels(message: str) -> bool:
    return message.startswith("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")


def _diffusers_fp32(message: str) -> bool:
    return message.startswith("There are modules in ") and "that should be kept in float32: []." in message


def _torchvision_fallback(message: str) -> bool:
    return "ImageProcessor` requires torchvision (not installed); falling back to `" in message


# logger name -> which of its messages to drop
LOG_FILTERS = {
    "bitsandbytes.backends.cpu.ops": _bitsandbytes_kernels,
    "diffusers.models.modeling_utils": _diffusers_fp32,
    "transformers.utils.import_utils": _torchvision_fallback,
}


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches `match`."""

    def __init__(self, match) -> None:
        super().__init__()
        self.match = match

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not self.match(message)


_installed = False


def install() -> None:
    """Add the filters (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, match in LOG_FILTERS.items():
        logging.getLogger(name).addFilter(_DropMessages(match))
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning, module=r"torch\.jit\._script"
    )
