"""What lets a run stop and continue without losing anything: the random generators a state must restore, and
SIGINT/SIGTERM handling that stops at a step boundary.

`rng_states()` / `restore_rng_states()` cover every generator a training run draws from: torch's CPU generator
(adapter initialisation, dropout, rank and module dropout on CPU), each CUDA device's generator (dropout on the GPU),
Python's `random` and NumPy's global generator. kiln's own per-sample randomness comes from seeded generators and
needs no state. `cuda` is a seam: tests pass an object with the `torch.cuda` functions used here.

`StopSignals` turns the first SIGINT (Ctrl-C) or SIGTERM into a request the loop reads at the next step boundary
(the run then saves and exits non-zero); a second one raises KeyboardInterrupt at once. Files are written to
temporary names and renamed, so stopping at any moment leaves no partial file under a final name.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys

import numpy as np
import torch

logger = logging.getLogger("kiln")


def rng_states(cuda=torch.cuda) -> dict:
    """The state of every global random generator, in a form torch.load(weights_only=True) reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda.get_rng_state_all() if cuda.is_available() else [],
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
    }


def restore_rng_states(states: dict, cuda=torch.cuda) -> None:
    """Put back what `rng_states` captured (states written before Python/NumPy were saved restore torch and CUDA)."""
    torch.set_rng_state(states["torch"])
    saved_cuda = list(states.get("cuda") or [])
    if saved_cuda and not cuda.is_available():
        logger.warning("the state was saved on CUDA and this run has no CUDA device: GPU dropout draws cannot be restored")
    elif saved_cuda:
        available = cuda.device_count()
        if available != len(saved_cuda):
            logger.warning(f"the state holds {len(saved_cuda)} CUDA generators and this machine has {available} devices")
        cuda.set_rng_state_all(saved_cuda[:available])
    if "python" in states:
        py = states["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "numpy" in states:
        npy = states["numpy"]
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGINT and SIGTERM set `stop.signum` (the loop stops at the next step
    boundary); a second signal raises KeyboardInterrupt at once. The previous handlers are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            self.__exit__()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped at once")
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def stop_with_launcher() -> None:
    """Under `accelerate launch`, have the kernel send SIGTERM to this process when the launcher exits, so a trainer
    never goes on alone after its launcher has gone (it then stops at the next step and saves). Linux only."""
    if not sys.platform.startswith("linux") or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
