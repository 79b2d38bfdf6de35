"""library/ema.py: EMA of trained weights."""

from __future__ import annotations

import io

import pytest
import torch

from library.ema import EmaWeights


def params(**values) -> dict[str, torch.nn.Parameter]:
    return {n: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32)) for n, v in values.items()}


def set_(p: torch.Tensor, value) -> None:
    with torch.no_grad():
        p.copy_(torch.as_tensor(value, dtype=p.dtype))


def test_hand_computed_values_with_update_every_2():
    ps = params(a=[0.0, 1.0], b=[[2.0]])
    ema = EmaWeights(ps, decay=0.75, update_every=2)
    # weights after steps 1..4; only steps 2 and 4 update
    seq_a = [[4.0, 1.0], [8.0, 5.0], [0.0, 0.0], [4.0, -3.0]]
    seq_b = [[[6.0]], [[10.0]], [[0.0]], [[2.0]]]
    updated = []
    for step, (va, vb) in enumerate(zip(seq_a, seq_b), start=1):
        set_(ps["a"], va)
        set_(ps["b"], vb)
        updated.append(ema.after_step(step))
    assert updated == [False, True, False, True]
    # a: 0.75*0 + 0.25*8 = 2, then 0.75*2 + 0.25*4 = 2.5; 0.75*1 + 0.25*5 = 2, then 0.75*2 + 0.25*(-3) = 0.75
    # b: 0.75*2 + 0.25*10 = 4, then 0.75*4 + 0.25*2 = 3.5
    state = ema.state_dict()
    assert torch.equal(state["a"], torch.tensor([2.5, 0.75]))
    assert torch.equal(state["b"], torch.tensor([[3.5]]))
    assert all(t.dtype == torch.float32 for t in state.values())


def test_many_steps_match_the_formula_in_float64():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(300))
    ema = EmaWeights({"w": p}, decay=0.9)
    ref = p.detach().double().clone()
    for step in range(1, 31):
        set_(p, torch.randn(300))
        assert ema.after_step(step)
        ref = 0.9 * ref + 0.1 * p.detach().double()
    torch.testing.assert_close(ema.state_dict()["w"].double(), ref, rtol=0, atol=1e-6)


def test_bf16_weights_keep_a_float32_average():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    ema = EmaWeights({"w": p}, decay=0.999)
    set_(p, torch.full((8,), 2.0))
    ema.after_step(1)
    # 0.999 * 1 + 0.001 * 2 = 1.001: below bf16's resolution at 1 (2^-7), kept in float32
    torch.testing.assert_close(ema.state_dict()["w"], torch.full((8,), 1.001), rtol=0, atol=1e-6)
    with ema.applied():
        assert p.dtype == torch.bfloat16 and torch.equal(p, torch.ones(8, dtype=torch.bfloat16))
    assert torch.equal(p, torch.full((8,), 2.0, dtype=torch.bfloat16))


def test_applied_swaps_in_the_average_and_restores_bit_for_bit():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    named = dict(model.named_parameters())
    ema = EmaWeights(named, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.37)  # values that the EMA does not hold
    ema.after_step(1)
    before = {n: p.detach().clone() for n, p in named.items()}
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with ema.applied():
        for n, p in named.items():
            assert torch.equal(p, ema.state_dict()[n].to(torch.bfloat16)), n
            assert not torch.equal(p, before[n])
        out = model(x)
        assert out.requires_grad  # the block runs with autograd as usual
    for n, p in named.items():
        assert torch.equal(p.view(torch.int16), before[n].view(torch.int16)), n
    with pytest.raises(RuntimeError, match="inside"):
        with ema.applied():
            raise RuntimeError("inside")
    assert all(torch.equal(p, before[n]) for n, p in named.items())


def test_state_round_trip():
    torch.manual_seed(2)
    ps = {"x": torch.nn.Parameter(torch.randn(5, 3)), "y": torch.nn.Parameter(torch.randn(7))}
    ema = EmaWeights(ps, decay=0.8)
    for step in range(1, 4):
        with torch.no_grad():
            for p in ps.values():
                p.add_(1.0)
        ema.after_step(step)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    other = EmaWeights(ps, decay=0.8)  # starts from the current weights
    other.load_state_dict(saved)
    for n in ps:
        assert torch.equal(other.state_dict()[n], ema.state_dict()[n])
    for e in (ema, other):
        with torch.no_grad():
            for p in ps.values():
                p.mul_(0.5)
        e.after_step(4)
        with torch.no_grad():
            for p in ps.values():
                p.mul_(2.0)
    for n in ps:
        assert torch.equal(other.state_dict()[n], ema.state_dict()[n])

    with pytest.raises(ValueError, match="missing y"):
        other.load_state_dict({"x": saved["x"]})
    with pytest.raises(ValueError, match="extra z"):
        other.load_state_dict({**saved, "z": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({"x": saved["x"], "y": torch.zeros(8)})


def test_on_cpu_equals_on_device():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.LayerNorm(32)).to(torch.bfloat16)
    named = dict(model.named_parameters())
    on_dev = EmaWeights(named, decay=0.99, update_every=3)
    on_cpu = EmaWeights(named, decay=0.99, update_every=3, on_cpu=True)
    assert all(t.device.type == "cpu" for t in on_cpu.state_dict().values())
    for step in range(1, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        assert on_dev.after_step(step) == on_cpu.after_step(step) == (step % 3 == 0)
    for n in named:
        assert torch.equal(on_dev.state_dict()[n], on_cpu.state_dict()[n].to(on_dev.state_dict()[n].device)), n


def test_a_rebound_weight_is_followed():
    """Weights are read where they are at update time: one rebound to another tensor (`.data =`, as a block swapper
    does) is followed. (Other devices than the CPU need a GPU to test.)"""
    p = torch.nn.Parameter(torch.zeros(4))
    ema = EmaWeights({"w": p}, decay=0.5)
    p.data = torch.full((4,), 2.0)  # rebinding, as a swapper does
    ema.after_step(1)
    assert torch.equal(ema.state_dict()["w"], torch.ones(4))


def test_bad_arguments():
    ps = params(a=[1.0])
    with pytest.raises(ValueError, match="decay"):
        EmaWeights(ps, decay=1.5)
    with pytest.raises(ValueError, match="update_every"):
        EmaWeights(ps, decay=0.9, update_every=0)
    with pytest.raises(ValueError, match="no weights"):
        EmaWeights({}, decay=0.9)
    with pytest.raises(TypeError, match="floating"):
        EmaWeights({"i": torch.zeros(2, dtype=torch.int64)}, decay=0.9)
