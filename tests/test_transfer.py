"""library/transfer.py: host -> device copies. The host -> CUDA path (`staged_copy`) runs here on CPU through its seam:
a recording `pin` and a tensor type that logs the copy."""

from __future__ import annotations

import torch

import library.transfer as transfer
from library.transfer import is_staged, staged_copy, to_device


def test_to_device_is_to_with_the_same_values_and_dtype():
    x = torch.randn(3, 4, dtype=torch.float64)
    for dtype in (None, torch.float32, torch.bfloat16, torch.float64):
        got = to_device(x, "cpu", dtype)
        assert got.device.type == "cpu" and got.dtype == (dtype or x.dtype)
        assert torch.equal(got, x.to(dtype or x.dtype))
    mask = torch.tensor([True, False])
    assert torch.equal(to_device(mask, torch.device("cpu")), mask)


def test_to_device_stages_only_host_to_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(transfer, "staged_copy", lambda t, device, dtype=None: calls.append((t, device, dtype)) or t)
    x = torch.randn(2)
    assert is_staged(x, torch.device("cuda")) and not is_staged(x, torch.device("cpu"))
    to_device(x, "cuda:0", torch.bfloat16)
    assert len(calls) == 1 and calls[0][0] is x and calls[0][1] == torch.device("cuda:0") and calls[0][2] == torch.bfloat16
    to_device(x, "cpu", torch.bfloat16)
    assert len(calls) == 1


class _Logged(torch.Tensor):
    """A tensor whose `.to` calls are logged (stands for pinned memory)."""

    log: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            cls.log.append((args[0].dtype, args[1:], kwargs))
        return super().__torch_function__(func, types, args, kwargs)


def _staged(x, dtype):
    pinned, _Logged.log = [], []

    def pin(t):
        pinned.append(t.dtype)
        return t.clone().as_subclass(_Logged)

    out = staged_copy(x, torch.device("cpu"), dtype, pin=pin)
    return out.as_subclass(torch.Tensor), pinned, list(_Logged.log)


def test_staged_copy_narrows_on_the_host_pins_and_copies_non_blocking():
    x = torch.randn(3, 4, dtype=torch.float64)
    # narrower target: cast before pinning, so the pinned buffer and the copy are bf16
    out, pinned, log = _staged(x, torch.bfloat16)
    assert pinned == [torch.bfloat16]
    assert log[0] == (torch.bfloat16, (torch.device("cpu"),), {"non_blocking": True})
    assert out.dtype == torch.bfloat16 and torch.equal(out, x.to(torch.bfloat16))
    # wider target: copied as is, cast on the device
    f16 = x.to(torch.float16)
    out, pinned, log = _staged(f16, torch.float32)
    assert pinned == [torch.float16] and log[0][2] == {"non_blocking": True}
    assert out.dtype == torch.float32 and torch.equal(out, f16.float())
    # no dtype: the same tensor's values and dtype
    out, pinned, log = _staged(x, None)
    assert pinned == [torch.float64] and len(log) == 1 and log[0][2] == {"non_blocking": True}
    assert out.dtype == torch.float64 and torch.equal(out, x)
