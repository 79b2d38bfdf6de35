"""library/full_optim.py: chunked (per-parameter / blockwise) optimizer steps, fused into backward, and stochastic
rounding of bf16 weights."""

from __future__ import annotations

import copy
import io
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from library.full_optim import ChunkedOptimizer, chunks_by_pattern, copy_stochastic_


class Net(torch.nn.Module):
    """Three blocks and a head, so that blockwise chunks have something to split."""

    def __init__(self, width: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = torch.nn.Linear(8, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.LayerNorm(width)) for _ in range(3)
        )
        self.head = torch.nn.Linear(width, 4)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x.to(self.head.weight.dtype)))
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1000 + step))
    teacher = torch.linspace(-1.0, 1.0, 32).reshape(8, 4)
    return x, torch.sin(x @ teacher)


def loss_of(model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step)
    return (model(x).float() - y).pow(2).mean()


def train(model, optimizer, steps, start=0, scheduler=None, clip=None, backward=None) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        loss = loss_of(model, step)
        (backward or (lambda t: t.backward()))(loss)
        if clip:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def blocks_of(model: Net) -> list[list[torch.Tensor]]:
    return chunks_by_pattern(model.named_parameters(), r"blocks\.\d+\.")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, exact: bool = False) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def kiln_builder(optimizer_type: str, lr: float, *optimizer_args: str):
    from library.optimizers import make_optimizer

    args = SimpleNamespace(
        optimizer_type=optimizer_type,
        optimizer_args=list(optimizer_args),
        learning_rate=lr,
        max_grad_norm=0.0,
        lr_scheduler="constant",
        use_8bit_adam=False,
        use_lion_optimizer=False,
    )
    return lambda groups: make_optimizer(args, groups)[2]


# ---------------------------------------------------------------------------------------------------------------------
# stochastic rounding


def test_copy_stochastic_is_unbiased_and_stays_between_neighbours():
    gen = torch.Generator().manual_seed(0)
    spacing_at_1 = 2.0**-7
    values = [1.0 + 0.3 * spacing_at_1, -(1.0 + 0.7 * spacing_at_1), 3.14159, -1e-3, 1e-30, 123456.789]
    n = 200_000
    for value in values:
        src = torch.full((n,), value, dtype=torch.float32)
        out = torch.empty(n, dtype=torch.bfloat16)
        copy_stochastic_(out, src.clone(), gen)
        lo = torch.tensor(value).to(torch.bfloat16)
        # the two bf16 neighbours of value
        down = torch.tensor(value, dtype=torch.float32).view(torch.int32) & -65536
        neighbours = {down.view(torch.float32).item(), (down + 65536).view(torch.float32).item()}
        assert set(out.float().unique().tolist()) <= neighbours, value
        spacing = abs((down + 65536).view(torch.float32).item() - down.view(torch.float32).item())
        mean = out.double().mean().item()
        # the count of rounded-up values is binomial: the mean is within 6 sigma of the value
        sigma = spacing * 0.5 / math.sqrt(n)
        assert abs(mean - value) < 6 * sigma, (value, mean)
        # round-to-nearest is biased by much more than that for these values
        assert abs(lo.double().item() - value) > 20 * sigma, value

    exact = torch.tensor([1.0, -2.5, 0.0, -0.0, float("inf"), float("-inf"), 65280.0])
    out = torch.empty_like(exact, dtype=torch.bfloat16)
    copy_stochastic_(out, exact.clone(), gen)
    assert torch.equal(out.float(), exact) and torch.signbit(out[3])
    nan = torch.tensor([float("nan")] * 64)
    nan.view(torch.int32).add_(torch.arange(64, dtype=torch.int32))  # NaN payloads in the low bits
    out = torch.zeros(64, dtype=torch.bfloat16)
    copy_stochastic_(out, nan.clone(), gen)
    assert torch.isnan(out).all()
    with pytest.raises(TypeError):
        copy_stochastic_(torch.empty(2), torch.zeros(2), gen)


def test_small_updates_survive_only_with_stochastic_rounding():
    """1000 SGD steps of lr * grad = 1e-4 on bf16 weights at 1.0, where bf16's spacing is 2^-7 ~ 0.0078: round to
    nearest loses every update, stochastic rounding moves the weights by 0.1 on average."""
    steps, lr, n = 1000, 1e-4, 4096

    def run(stochastic: bool) -> torch.Tensor:
        w = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        if stochastic:
            opt = ChunkedOptimizer([w], lambda g: torch.optim.SGD(g, lr=lr), "all", stochastic_bf16=True, seed=1)
        else:
            opt = torch.optim.SGD([w], lr=lr)
        for _ in range(steps):
            w.grad = torch.full_like(w, -1.0)
            opt.step()
            opt.zero_grad()
        return w.detach().double()

    nearest = run(False)
    assert torch.equal(nearest, torch.ones(n, dtype=torch.float64))
    rounded = run(True)
    expected = 1.0 + steps * lr
    # per weight: a sum of 1000 Bernoulli steps of size 2^-7 with p = 1e-4 / 2^-7: std ~ 0.028; the mean of 4096: ~0.0004
    assert abs(rounded.mean().item() - expected) < 0.003, rounded.mean().item()
    assert rounded.min().item() > 1.0 and rounded.max().item() < 1.3


def test_stochastic_bf16_keeps_float32_state_and_no_master_copy():
    model = Net(dtype=torch.bfloat16)
    opt = ChunkedOptimizer(
        [{"params": list(model.parameters()), "lr": 1e-3}], lambda g: torch.optim.AdamW(g), "parameter", stochastic_bf16=True
    )
    opt.fuse_into_backward()
    before = snapshot(model)
    train(model, opt, 2)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.grad is None
        state = opt.param_state(p)
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg"].shape == p.shape, name
        assert not torch.equal(p, before[name]), name
    proxies = [q for qs in opt._proxies for q in qs]
    assert len(proxies) == len(list(model.parameters())) and all(q.numel() == 0 and q.grad is None for q in proxies)


# ---------------------------------------------------------------------------------------------------------------------
# (a) fused per-parameter steps = the plain optimizer


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-3), id="SGD"),
        pytest.param(lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01), id="AdamW"),
        pytest.param(kiln_builder("AdaFactor", 1e-3, "relative_step=False", "scale_parameter=True"), id="Adafactor"),
        pytest.param(kiln_builder("AdamW8bit", 3e-3), id="AdamW8bit"),
    ],
)
def test_fused_per_parameter_steps_equal_the_plain_optimizer(make):
    """bitsandbytes 0.50 runs its 8-bit optimizers on CPU (the 64x64 weights get 8-bit states, the smaller ones 32-bit):
    its quantization is per tensor, so stepping tensor by tensor gives the plain optimizer's weights too."""
    plain, fused = Net(width=64), Net(width=64)
    plain_opt = make([{"params": list(plain.parameters())}])
    opt = ChunkedOptimizer([{"params": list(fused.parameters())}], make, "parameter")
    assert len(opt.chunk_optimizers) == len(list(fused.parameters()))
    opt.fuse_into_backward()
    with torch.no_grad():
        start = loss_of(fused, 0).item()
    plain_losses = train(plain, plain_opt, 5)
    fused_losses = train(fused, opt, 5)
    assert_same_weights(plain, fused)
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    with torch.no_grad():
        assert loss_of(fused, 0).item() < start  # it trains
    if "8bit" in type(opt.chunk_optimizers[0]).__name__:
        states = [opt.param_state(p) for p in fused.parameters()]
        assert any(s.get("state1") is not None and s["state1"].dtype == torch.uint8 for s in states)


def test_unfused_blockwise_and_all_chunks_equal_the_plain_optimizer():
    make = lambda params: torch.optim.AdamW(params, lr=3e-3)  # noqa: E731
    plain = Net()
    train(plain, make(plain.parameters()), 4, clip=0.5)
    for chunks in ("all", "blocks", "parameter"):
        model = Net()
        opt = ChunkedOptimizer(list(model.parameters()), make, blocks_of(model) if chunks == "blocks" else chunks)
        train(model, opt, 4, clip=0.5)  # the caller clips globally, unfused
        assert_same_weights(plain, model, exact=True)


# ---------------------------------------------------------------------------------------------------------------------
# (b) gradients are freed inside backward


@pytest.mark.parametrize("mode", ["parameter", "blocks"])
def test_fused_steps_free_gradients_inside_backward(mode):
    model = Net()
    params = list(model.parameters())
    chunks = blocks_of(model) if mode == "blocks" else "parameter"
    opt = ChunkedOptimizer(params, lambda g: torch.optim.SGD(g, lr=0.1), chunks)
    live: list[int] = []
    for p in params:  # registered before the optimizer's hooks: sees the gradient that has just arrived
        p.register_post_accumulate_grad_hook(lambda _p: live.append(sum(q.grad is not None for q in params)))
    opt.fuse_into_backward()

    later = [p for b in model.blocks[1:] for p in b.parameters()]
    if mode == "parameter":  # blockwise, the head is in the chunk of "the rest", with the first layer
        later += list(model.head.parameters())
    before = {id(p): p.detach().clone() for p in later}
    seen = []

    def check(grad: torch.Tensor) -> None:  # the gradient reaching block 0's output: blocks 1-2 are done
        seen.append(True)
        assert all(p.grad is None for p in later)
        assert all(not torch.equal(p, before[id(p)]) for p in later)

    x, y = batch(0)
    h = torch.tanh(model.inp(x))
    h = h + model.blocks[0](h)
    h.register_hook(check)
    for block in model.blocks[1:]:
        h = h + block(h)
    (model.head(h) - y).pow(2).mean().backward()
    assert seen == [True]
    assert all(p.grad is None for p in params)
    assert len(live) == len(params)
    # at most: one gradient per parameter; blockwise, a block's 4 and the head's 2 (held until the first layer's arrive)
    assert max(live) == (1 if mode == "parameter" else 6) < len(params)


def test_fused_refuses_gradient_accumulation():
    model = Net()
    opt = ChunkedOptimizer(list(model.parameters()), lambda g: torch.optim.SGD(g, lr=0.1), "parameter")
    opt.fuse_into_backward()
    loss_of(model, 0).backward()
    with pytest.raises(RuntimeError, match="second gradient"):
        loss_of(model, 1).backward()


def test_hooks_can_be_removed():
    model = Net()
    opt = ChunkedOptimizer(list(model.parameters()), lambda g: torch.optim.SGD(g, lr=0.1), "parameter")
    handle = opt.fuse_into_backward()
    with pytest.raises(RuntimeError):
        opt.fuse_into_backward()
    handle.remove()
    loss_of(model, 0).backward()
    assert all(p.grad is not None for p in model.parameters())  # nothing stepped in backward any more
    opt.step()
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# (c) blockwise chunks


def count_steps(opt: ChunkedOptimizer) -> list[int]:
    counts = [0] * len(opt.chunk_optimizers)
    for c, inner in enumerate(opt.chunk_optimizers):
        inner.register_step_post_hook(lambda *_a, c=c: counts.__setitem__(c, counts[c] + 1))
    return counts


def test_blockwise_chunks_step_each_block_once_per_step():
    model = Net()
    chunks = blocks_of(model)
    assert [len(c) for c in chunks] == [4, 4, 4, 4]  # three blocks (Linear + LayerNorm) and the rest (inp, head)
    opt = ChunkedOptimizer(list(model.parameters()), lambda g: torch.optim.SGD(g, lr=0.1), chunks)
    counts = count_steps(opt)
    order: list[int] = []
    for c, inner in enumerate(opt.chunk_optimizers):
        inner.register_step_pre_hook(lambda *_a, c=c: order.append(c))
    opt.fuse_into_backward()
    for step in range(3):
        loss_of(model, step).backward()
        assert counts == [step + 1] * 4  # all stepped inside backward
        opt.step()
        assert counts == [step + 1] * 4  # and not again
        opt.zero_grad()
    assert order[:4] == [2, 1, 0, 3]  # backward reaches the last block first; "the rest" holds the first layer

    # a chunk with a parameter that gets no gradient is stepped by step(), on the gradients it has; one with none
    # is skipped
    model.blocks[1][2].weight.requires_grad_(False)
    for p in model.blocks[2].parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    loss_of(model, 3).backward()
    assert counts == [4, 3, 3, 4]
    opt.step()
    assert counts == [4, 4, 3, 4]
    after = snapshot(model)
    assert torch.equal(after["blocks.1.2.weight"], before["blocks.1.2.weight"])
    assert not torch.equal(after["blocks.1.0.weight"], before["blocks.1.0.weight"])
    assert all(torch.equal(after[n], before[n]) for n in after if n.startswith("blocks.2."))


def test_blockwise_fused_clipping_is_per_block():
    make = lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.5)  # noqa: E731
    ref, model = Net(), Net()
    ref_chunks = blocks_of(ref)
    ref_opt = make(ref.parameters())
    opt = ChunkedOptimizer(list(model.parameters()), make, blocks_of(model))
    opt.fuse_into_backward(max_grad_norm=0.05)
    for step in range(3):
        loss_of(ref, step).backward()
        for chunk in ref_chunks:
            torch.nn.utils.clip_grad_norm_(chunk, 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
        opt.zero_grad()
    assert_same_weights(ref, model)
    # global clipping would have given other weights
    glob = Net()
    train(glob, make(glob.parameters()), 3, clip=0.05)
    assert not torch.allclose(glob.head.weight, model.head.weight, atol=1e-4)


def test_a_chunk_may_hold_several_groups():
    model, plain = Net(), Net()

    def groups(m):
        return [
            {"params": [p for n, p in m.named_parameters() if "weight" in n], "lr": 0.1},
            {"params": [p for n, p in m.named_parameters() if "weight" not in n], "lr": 0.01, "momentum": 0.5},
        ]

    make = lambda g: torch.optim.SGD(g, lr=1.0)  # noqa: E731
    opt = ChunkedOptimizer(groups(model), make, blocks_of(model))
    assert [len(o.param_groups) for o in opt.chunk_optimizers] == [2, 2, 2, 2]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01] and opt.param_groups[0]["momentum"] == 0
    opt.fuse_into_backward()
    train(model, opt, 3)
    train(plain, make(groups(plain)), 3)
    assert_same_weights(plain, model)


def test_bad_chunkings_are_refused():
    model = Net()
    params = list(model.parameters())
    make = lambda g: torch.optim.SGD(g, lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match="more than one chunk"):
        ChunkedOptimizer(params, make, [params, params[:1]])
    with pytest.raises(ValueError, match="in no chunk"):
        ChunkedOptimizer(params, make, [params[1:]])
    with pytest.raises(ValueError, match="of no group"):
        ChunkedOptimizer(params[1:], make, [params])
    with pytest.raises(ValueError, match="unknown chunking"):
        ChunkedOptimizer(params, make, "block")
    with pytest.raises(ValueError, match="did not keep the groups"):
        ChunkedOptimizer(params, lambda g: torch.optim.SGD([p for gr in g for p in gr["params"]][:1], lr=0.1), "all")


# ---------------------------------------------------------------------------------------------------------------------
# (d) state round trip


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


CASES = {
    "AdamW per parameter, fused": (lambda: torch.optim.AdamW, "parameter", True, torch.float32, False),
    "AdamW8bit blockwise, fused": (None, "blocks", True, torch.float32, False),
    "AdamW stochastic bf16 per parameter, fused": (lambda: torch.optim.AdamW, "parameter", True, torch.bfloat16, True),
    "Adafactor stochastic bf16 blockwise, unfused": ("adafactor", "blocks", False, torch.bfloat16, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_continues_bit_for_bit(case):
    cls, chunking, fused, dtype, stochastic = CASES[case]
    if cls is None:
        make = kiln_builder("AdamW8bit", 3e-3)
    elif cls == "adafactor":
        make = kiln_builder("AdaFactor", 3e-3, "relative_step=False")
    else:
        make = lambda g: cls()(g, lr=3e-3, weight_decay=0.01)  # noqa: E731
    from transformers import get_cosine_schedule_with_warmup

    def setup(model, seed):
        chunks = blocks_of(model) if chunking == "blocks" else chunking
        opt = ChunkedOptimizer(
            [{"params": list(model.parameters()), "lr": 3e-3}], make, chunks, stochastic_bf16=stochastic, seed=seed
        )
        if fused:
            opt.fuse_into_backward(max_grad_norm=1.0)
        sched = get_cosine_schedule_with_warmup(opt, 2, 6)
        return opt, sched

    model = Net(width=64 if cls is None else 16, dtype=dtype)
    opt, sched = setup(model, seed=7)
    train(model, opt, 3, scheduler=sched, clip=None if fused else 1.0)
    saved = save_load({"model": snapshot(model), "opt": opt.state_dict(), "sched": sched.state_dict()})
    if stochastic:
        assert set(saved["opt"]["generators"]) == {"cpu"}
    train(model, opt, 2, start=3, scheduler=sched, clip=None if fused else 1.0)

    resumed = Net(width=64 if cls is None else 16, dtype=dtype, seed=123)
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            p.copy_(saved["model"][n])
    opt2, sched2 = setup(resumed, seed=99)  # another seed: the generator state comes from the state dict
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    train(resumed, opt2, 2, start=3, scheduler=sched2, clip=None if fused else 1.0)
    assert_same_weights(model, resumed, exact=True)
    if stochastic:  # and the rounding did use random numbers (a fresh generator would have given other weights)
        fresh = Net(width=16, dtype=dtype, seed=123)
        with torch.no_grad():
            for n, p in fresh.named_parameters():
                p.copy_(saved["model"][n])
        opt3, sched3 = setup(fresh, seed=99)
        state = dict(saved["opt"], generators={})
        opt3.load_state_dict(state)
        sched3.load_state_dict(saved["sched"])
        train(fresh, opt3, 2, start=3, scheduler=sched3, clip=None if fused else 1.0)
        assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def test_load_state_dict_refuses_another_layout():
    model = Net()
    params = list(model.parameters())
    make = lambda g: torch.optim.AdamW(g, lr=1e-3)  # noqa: E731
    opt = ChunkedOptimizer(params, make, "parameter")
    train(model, opt, 1)
    state = save_load(opt.state_dict())
    with pytest.raises(ValueError, match="different chunking: the state has 16 chunks, this optimizer 4"):
        ChunkedOptimizer(params, make, blocks_of(model)).load_state_dict(state)
    reordered = [[p] for p in params[1:]] + [[params[0]]]
    with pytest.raises(ValueError, match="different chunking: chunk 0"):
        ChunkedOptimizer(params, make, reordered).load_state_dict(state)
    with pytest.raises(ValueError, match="stochastic_bf16"):
        ChunkedOptimizer(params, make, "parameter", stochastic_bf16=True).load_state_dict(state)
    with pytest.raises(ValueError, match="saved by torch.optim.adamw.AdamW"):
        ChunkedOptimizer(params, lambda g: torch.optim.SGD(g, lr=0.1), "parameter").load_state_dict(state)
    with pytest.raises(ValueError, match="not a ChunkedOptimizer state"):
        opt.load_state_dict(make(params).state_dict())
    with pytest.raises(ValueError, match="parameter groups"):
        ChunkedOptimizer([{"params": params[:2]}, {"params": params[2:]}], make, "parameter").load_state_dict(state)
    other = Net(width=8)
    with pytest.raises(ValueError, match="shapes differ"):
        ChunkedOptimizer(list(other.parameters()), make, "parameter").load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------------
# (e) learning-rate schedulers


def test_cosine_schedule_gives_the_plain_optimizers_lrs_and_weights():
    from library.optimizers import make_lr_scheduler

    args = SimpleNamespace(lr_scheduler="cosine", lr_warmup_steps=2, lr_scheduler_args=None)

    def groups(m):
        return [
            {"params": list(m.inp.parameters()) + list(m.blocks.parameters()), "lr": 0.05},
            {"params": list(m.head.parameters()), "lr": 0.01},
        ]

    make = lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9)  # noqa: E731
    plain, model = Net(), Net()
    plain_opt = make(groups(plain))
    opt = ChunkedOptimizer(groups(model), make, "parameter")
    opt.fuse_into_backward()
    plain_sched = make_lr_scheduler(args, plain_opt, 8)
    sched = make_lr_scheduler(args, opt, 8)
    used: list[list[float]] = []  # the lr of every chunk group when its chunk steps
    for inner in opt.chunk_optimizers:
        inner.register_step_pre_hook(lambda o, *_: used.append([g["lr"] for g in o.param_groups]))

    plain_lrs, lrs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for step in range(8):
            plain_lrs.append([g["lr"] for g in plain_opt.param_groups])
            lrs.append([g["lr"] for g in opt.param_groups])
            used.clear()
            train(plain, plain_opt, 1, start=step, scheduler=plain_sched)
            train(model, opt, 1, start=step, scheduler=sched)
            assert sorted({lr for u in used for lr in u}) == sorted(set(lrs[-1]))
    assert lrs == plain_lrs
    assert lrs[0] == [0.0, 0.0] and lrs[2] == [0.05, 0.01] and lrs[-1][0] < 0.01
    assert sched.get_last_lr() == plain_sched.get_last_lr()
    assert_same_weights(plain, model)


# ---------------------------------------------------------------------------------------------------------------------
# (f) accelerate


def test_accelerate_prepare_wraps_the_chunked_optimizer():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState
    from transformers import get_linear_schedule_with_warmup

    make = lambda g: torch.optim.AdamW(g, lr=3e-3)  # noqa: E731
    plain = Net(dtype=torch.bfloat16)
    plain_ref = copy.deepcopy(plain)
    ref_opt = ChunkedOptimizer(list(plain_ref.parameters()), make, "parameter", stochastic_bf16=True, seed=3)
    ref_opt.fuse_into_backward()
    ref_sched = get_linear_schedule_with_warmup(ref_opt, 1, 5)
    train(plain_ref, ref_opt, 4, scheduler=ref_sched)

    try:
        accelerator = Accelerator(cpu=True)
        model = plain
        opt = ChunkedOptimizer(list(model.parameters()), make, "parameter", stochastic_bf16=True, seed=3)
        opt.fuse_into_backward()
        sched = get_linear_schedule_with_warmup(opt, 1, 5)
        model, popt, psched = accelerator.prepare(model, opt, sched)
        assert isinstance(popt, AcceleratedOptimizer) and popt.optimizer is opt
        assert popt.param_groups is opt.param_groups
        train(model, popt, 4, scheduler=psched, backward=accelerator.backward)
        state = popt.state_dict()
        popt.load_state_dict(state)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert_same_weights(plain_ref, model, exact=True)
    assert [g["lr"] for g in popt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
