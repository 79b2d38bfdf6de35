"""library/transfer.py: host -> device copies (the CUDA path needs a GPU; here the values, dtypes and devices)."""

from __future__ import annotations

import torch

from library.transfer import to_device


def test_to_device_is_to_with_the_same_values_and_dtype():
    x = torch.randn(3, 4, dtype=torch.float64)
    for dtype in (None, torch.float32, torch.bfloat16, torch.float64):
        got = to_device(x, "cpu", dtype)
        assert got.device.type == "cpu" and got.dtype == (dtype or x.dtype)
        assert torch.equal(got, x.to(dtype or x.dtype))
    mask = torch.tensor([True, False])
    assert torch.equal(to_device(mask, torch.device("cpu")), mask)
