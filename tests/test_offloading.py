"""Block swap and activation offload (library/custom_offloading_utils.py) and fp8 base storage (library/fp8_utils.py), on
CPU. `RecordingEngine` replays the CUDA stream protocol on CPU: it fails on a read of a buffer before compute waited
for the copy into it, and on a copy over a buffer that compute read after the copy's "free" event."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from library.custom_offloading_utils import BlockSwapper, CopyEngine, HostActivationOffload
from library.fp8_utils import Fp8Linear, store_linear_weights_fp8
from networks.lora import LoRAModule

DIM = 16


class MLPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, 2 * DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)

    def forward(self, x, scale=None):
        h = self.fc2(F.gelu(self.fc1(self.norm(x))))
        return x + (h if scale is None else h * scale)


class AttnBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, 3 * DIM)  # qkv
        self.out = nn.Linear(DIM, DIM)
        self.register_buffer("gain", torch.full((DIM,), 0.5))

    def forward(self, x, scale=None):
        b, t, _ = x.shape
        q, k, v = self.fc1(self.norm(x)).view(b, t, 3, 2, DIM // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, DIM)
        return x + self.out(a) * self.gain


class Toy(nn.Module):
    def __init__(self, n_blocks=6, checkpointing=False, fp8=False):
        super().__init__()
        self.inp = nn.Linear(4, DIM)
        self.blocks = nn.ModuleList([MLPBlock() if i % 2 == 0 else AttnBlock() for i in range(n_blocks)])
        self.head = nn.Linear(DIM, 4)
        self.checkpointing = checkpointing
        self.requires_grad_(False)
        if fp8:
            store_linear_weights_fp8(self.blocks, compute_dtype=torch.float32)
        # a LoRA-like trainable adapter on one Linear per block (not a submodule of the block)
        self.adapters = nn.ModuleList(LoRAModule(f"b{i}", blk.fc1, rank=2, alpha=1.0) for i, blk in enumerate(self.blocks))
        for a in self.adapters:
            nn.init.normal_(a.lora_up.weight, std=0.1)
            a.apply_to()

    def forward(self, x):
        h = self.inp(x)
        for i, blk in enumerate(self.blocks):
            if self.checkpointing and torch.is_grad_enabled():
                # MLP blocks get a keyword argument: full-backward-hook machinery must cope with kwargs
                h = checkpoint(blk, h, use_reentrant=False, **({"scale": 1.0} if i % 2 == 0 else {}))
            else:
                h = blk(h)
        return self.head(h)


class RecordingEngine(CopyEngine):
    """A CopyEngine that copies synchronously and checks the ordering a CUDA side stream needs.

    Compute is the sequence of aten ops run under `uses()` (view ops excepted); `ops` is the compute stream's position.
    Events: ("copy", n) for the n-th copy, ("compute", pos) from `record`. Errors (in `errors`):
    - compute reads a buffer whose latest copy it has not waited for (`wait` of that copy or a later one, `wait_all`);
    - a copy writes a buffer that compute read after the point the side stream is ordered after (the `after` event,
      or everything queued so far when it is None; the side stream is in order, so that point never goes back)."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.errors: list[str] = []
        self.ops = 0
        self.copies = 0
        self.waited = 0  # compute has waited for copies 1..waited
        self.side_after = 0  # the side stream runs after compute ops 1..side_after
        self.pending: dict[int, int] = {}  # buffer (storage pointer) -> its latest copy
        self.last_read: dict[int, int] = {}  # buffer -> compute op that read it last
        self._copying = False

    def copy(self, dst, src, after=None):
        self.side_after = max(self.side_after, self.ops if after is None else after[1])
        key = dst.untyped_storage().data_ptr()
        if self.last_read.get(key, 0) > self.side_after:
            self.errors.append(f"copy {self.copies + 1} overwrites a buffer read by op {self.last_read[key]} > {self.side_after}")
        self._copying = True
        try:
            dst.copy_(src)
        finally:
            self._copying = False
        self.copies += 1
        self.pending[key] = self.copies
        self.log.append(("copy", self.copies, key))
        return ("copy", self.copies)

    def wait(self, event):
        assert event is not None and event[0] == "copy", event
        self.waited = max(self.waited, event[1])
        self.log.append(("wait", event[1]))

    def record(self):
        self.log.append(("record", self.ops))
        return ("compute", self.ops)

    def wait_all(self):
        self.waited = self.copies
        self.log.append(("wait_all", self.copies))

    def read(self, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage().data_ptr()
        if self.pending.get(key, 0) > self.waited:
            self.errors.append(f"op {self.ops} reads the buffer of copy {self.pending[key]} before waiting for it")
        self.last_read[key] = self.ops
        self.log.append(("read", self.ops, key))

    def uses(self) -> TorchDispatchMode:
        """A dispatch mode (forward and backward) that reports every tensor each compute op reads."""
        engine = self

        class Uses(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not engine._copying and not func.is_view:
                    engine.ops += 1
                    for t in tree_leaves((args, kwargs)):
                        if isinstance(t, torch.Tensor) and t.device.type != "meta":
                            engine.read(t)
                return func(*args, **kwargs)

        return Uses()


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)) for _ in range(3)]


def _train(blocks_to_swap, checkpointing, fp8=False, eval_between=False, eval_swapping=None, engine=None):
    torch.manual_seed(0)
    model = Toy(checkpointing=checkpointing, fp8=fp8)
    frozen_before = {k: v.clone() for k, v in model.blocks.state_dict().items()}
    swapper = BlockSwapper(model.blocks, blocks_to_swap, torch.device("cpu"), engine=engine)
    with engine.uses() if engine is not None else contextlib.nullcontext():
        return _steps(model, swapper, blocks_to_swap, eval_between, eval_swapping, frozen_before)


def _steps(model, swapper, blocks_to_swap, eval_between, eval_swapping, frozen_before):
    opt = torch.optim.AdamW(model.adapters.parameters(), lr=1e-2)
    losses = []
    for x, y in _data():
        if eval_between:
            with torch.no_grad(), swapper.swapping_fewer(blocks_to_swap if eval_swapping is None else eval_swapping):
                model(x)
            swapper.prepare_for_forward()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    loads = getattr(swapper, "loads", 0)
    swapper.remove()
    frozen_after = model.blocks.state_dict()
    for k, v in frozen_before.items():
        assert torch.equal(frozen_after[k], v), k  # frozen weights are never changed by swapping
    return losses, {k: v.clone() for k, v in model.adapters.state_dict().items()}, loads


@pytest.mark.parametrize("checkpointing", [False, True, "no_early_stop"])
def test_block_swap_changes_no_number(checkpointing):
    if checkpointing == "no_early_stop":  # the recompute runs each block to its end (forward hooks fire in backward)
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            return test_block_swap_changes_no_number(True)
    ref_losses, ref_weights, _ = _train(0, checkpointing)
    for n in (2, 4):
        losses, weights, loads = _train(n, checkpointing)
        assert loads > 0
        assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses)), (n, losses, ref_losses)
        assert weights.keys() == ref_weights.keys()
        for k in ref_weights:
            assert torch.equal(weights[k], ref_weights[k]), (n, k)
    # checkpointing itself changes nothing either
    if checkpointing:
        plain, _, _ = _train(0, False)
        assert all(torch.equal(a, b) for a, b in zip(plain, ref_losses))


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("eval_swapping", [None, 1])
def test_block_swap_waits_for_every_copy_before_use(checkpointing, eval_swapping):
    """The stream protocol of CUDA, replayed on CPU: compute reads a slot only after waiting for the copy into it, and a
    copy overwrites a slot only after its previous occupant's last read (fails if `_ensure` or its wait is skipped)."""
    ref_losses, ref_weights, _ = _train(0, checkpointing)
    engine = RecordingEngine()
    losses, weights, loads = _train(4, checkpointing, engine=engine, eval_between=eval_swapping is not None, eval_swapping=eval_swapping)
    assert not engine.errors, engine.errors[:5]
    assert loads == engine.copies > 0 and any(e[0] == "wait" for e in engine.log)
    slots = {e[2] for e in engine.log if e[0] == "copy"}
    assert len(slots) == 2 and all(any(e[0] == "read" and e[2] == k for e in engine.log) for k in slots)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def test_recording_engine_catches_misordering():
    engine = RecordingEngine()
    buf, src = torch.zeros(4), torch.ones(4)
    with engine.uses():
        done = engine.copy(buf, src)
        buf.sum()  # read before the wait
        assert len(engine.errors) == 1
        engine.wait(done)
        buf.sum()
        free = engine.record()
        buf.sum()  # read after the "free" event
        engine.copy(buf, src, after=free)
        assert len(engine.errors) == 2
        engine.copy(buf, src)  # after everything queued: fine
        engine.wait_all()
        buf.sum()
    assert len(engine.errors) == 2


def test_block_swap_slots_alias_and_footprint():
    torch.manual_seed(0)
    model = Toy()
    swapper = BlockSwapper(model.blocks, 4, "cpu")
    # blocks 2..5 swapped, two slots: 2 & 4 share one, 3 & 5 the other (fixed footprint)
    assert model.blocks[2].norm.weight.data_ptr() == model.blocks[4].norm.weight.data_ptr()
    assert model.blocks[3].fc1.weight.data_ptr() == model.blocks[5].fc1.weight.data_ptr()
    assert model.blocks[2].norm.weight.data_ptr() != model.blocks[3].norm.weight.data_ptr()
    # trainable adapters are untouched and resident; buffers stay with their block
    assert all(p.requires_grad for p in model.adapters.parameters())
    assert model.blocks[5].gain.data_ptr() != model.blocks[3].gain.data_ptr()
    assert swapper.host_bytes > 0 and len(swapper._slots) == 2
    swapper.remove()


def test_block_swap_rejects_too_many():
    blocks = [nn.Linear(2, 2) for _ in range(6)]
    with pytest.raises(ValueError):
        BlockSwapper(blocks, 5, "cpu")
    with pytest.raises(ValueError):
        BlockSwapper(blocks, -1, "cpu")
    BlockSwapper(blocks, 4, "cpu").remove()


def test_prepare_for_forward_after_no_grad_forward():
    ref_losses, ref_weights, _ = _train(0, False)
    losses, weights, _ = _train(4, False, eval_between=True)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)
    # a no-grad forward with swap gives the same output as without
    torch.manual_seed(0)
    m = Toy()
    x = _data()[0][0]
    with torch.no_grad():
        expected = m(x)
        s = BlockSwapper(m.blocks, 3, "cpu")
        assert torch.equal(m(x), expected)
        s.prepare_for_forward()
        assert torch.equal(m(x), expected)


@pytest.mark.parametrize("eval_swapping", [0, 1, 3])
def test_swapping_fewer_blocks_for_inference_changes_no_number(eval_swapping):
    ref_losses, ref_weights, _ = _train(0, False)
    losses, weights, _ = _train(4, True, eval_between=True, eval_swapping=eval_swapping)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def test_swapping_fewer_blocks_loads_fewer_and_restores_the_slots():
    from library.custom_offloading_utils import blocks_to_swap_for_inference

    torch.manual_seed(0)
    m = Toy()
    x = _data()[0][0]
    with torch.no_grad():
        expected = m(x)
        swapper = BlockSwapper(m.blocks, 4, "cpu")  # blocks 2..5 swapped
        size = swapper.block_bytes(2)
        assert blocks_to_swap_for_inference(swapper, free_bytes=10**12) == 0
        assert blocks_to_swap_for_inference(swapper, free_bytes=size * 2 + 100, reserve_bytes=100) == 2
        assert blocks_to_swap_for_inference(swapper, free_bytes=size, reserve_bytes=size) == 4
        loads = swapper.loads
        with swapper.swapping_fewer(1):
            assert swapper.loads - loads <= 1  # block 5's prefetch at most
            # blocks 2..4 have their own copies now, block 5 still reads its slot
            assert m.blocks[2].norm.weight.data_ptr() != m.blocks[4].norm.weight.data_ptr()
            for _ in range(2):
                loads = swapper.loads
                assert torch.equal(m(x), expected)
                assert swapper.loads - loads <= 1
        # back to two shared slots
        assert m.blocks[2].norm.weight.data_ptr() == m.blocks[4].norm.weight.data_ptr()
        assert m.blocks[3].fc1.weight.data_ptr() == m.blocks[5].fc1.weight.data_ptr()
        loads = swapper.loads
        assert torch.equal(m(x), expected)
        assert swapper.loads - loads >= 2


def test_block_swap_with_fp8_weights():
    ref_losses, ref_weights, _ = _train(0, True, fp8=True)
    losses, weights, _ = _train(4, True, fp8=True)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


# --- fp8 -------------------------------------------------------------------------------------------------


def _linear_bf16():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    return lin


def test_fp8_linear_error_dtype_and_memory():
    lin = _linear_bf16()
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    ref = lin(x).float()
    w_bytes = lin.weight.numel() * lin.weight.element_size()
    holder = nn.Sequential(lin)
    report = store_linear_weights_fp8(holder)
    assert isinstance(lin, Fp8Linear) and lin.weight.dtype == torch.float8_e4m3fn
    assert not lin.weight.requires_grad
    assert lin.bias.dtype == torch.bfloat16
    out = lin(x)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.06, rel
    assert report.converted == 1 and report.bytes_before == w_bytes
    assert lin.weight.numel() * lin.weight.element_size() * 2 == w_bytes  # halves vs bf16
    assert report.bytes_saved == w_bytes // 2 - 4  # minus the float32 scale
    # the scale uses the e4m3 range
    assert lin.weight.float().abs().max() == torch.finfo(torch.float8_e4m3fn).max


def test_fp8_skip_and_other_params_in_compute_dtype():
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Embedding(4, 8)).requires_grad_(False)
    report = store_linear_weights_fp8(m, skip=lambda name, mod: name == "2")
    assert report.converted == 1
    assert isinstance(m[0], Fp8Linear) and type(m[2]) is nn.Linear
    assert m[2].weight.dtype == m[1].weight.dtype == m[3].weight.dtype == m[0].bias.dtype == torch.bfloat16
    # an already wrapped Linear is refused
    lin = nn.Linear(8, 8).requires_grad_(False)
    LoRAModule("x", lin, 2, 1.0).apply_to()
    with pytest.raises(ValueError):
        store_linear_weights_fp8(nn.Sequential(lin))


def test_fp8_gradients_flow_to_adapter():
    lin = _linear_bf16()
    store_linear_weights_fp8(nn.Sequential(lin))
    lora = LoRAModule("l", lin, rank=4, alpha=4).to(torch.bfloat16)
    nn.init.normal_(lora.lora_up.weight, std=0.1)
    lora.apply_to()
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    out = lin(x)
    with torch.no_grad():  # the adapter sees the same input as the base path
        base = F.linear(x, lin.dequantized_weight(torch.bfloat16), lin.bias)
        expected = base + lora.lora_up(lora.lora_down(x)) * lora.scale
    assert torch.equal(out, expected)
    out.float().pow(2).mean().backward()
    assert lora.lora_down.weight.grad is not None and lora.lora_down.weight.grad.abs().sum() > 0
    assert lora.lora_up.weight.grad is not None and lora.lora_up.weight.grad.abs().sum() > 0
    assert x.grad is not None and lin.weight.grad is None
    # the base path equals the dequantized Linear
    lora.restore()
    assert torch.equal(lin(x.detach()), F.linear(x.detach(), lin.dequantized_weight(torch.bfloat16), lin.bias))


def test_fp8_state_dict_round_trip(tmp_path):
    lin = _linear_bf16()
    store_linear_weights_fp8(nn.Sequential(lin))
    path = str(tmp_path / "fp8.safetensors")
    save_file(lin.state_dict(), path)
    sd = load_file(path)
    assert sd["weight"].dtype == torch.float8_e4m3fn and set(sd) == {"weight", "bias", "weight_scale"}
    other = nn.Linear(64, 48).to(torch.bfloat16).requires_grad_(False)
    torch.nn.init.zeros_(other.weight)
    store_linear_weights_fp8(nn.Sequential(other))
    other.load_state_dict(sd)
    for k, v in lin.state_dict().items():
        assert torch.equal(
            other.state_dict()[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else other.state_dict()[k],
            v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
        ), k
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(other(x), lin(x))


def test_activation_offload_keeps_only_block_inputs_and_changes_no_gradient():
    """--cpu_offload_checkpointing on diffusers' FLUX transformer: the saved-tensor hooks see exactly the tensor inputs of
    each checkpointed block (hidden states, text states, temb), and the LoRA gradients equal plain checkpointing's."""
    from diffusers import FluxTransformer2DModel

    from library.flux_train_utils import image_position_ids, text_position_ids
    from library.tiny_models import tiny_flux_transformer_config

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**tiny_flux_transformer_config()).requires_grad_(False)
    adapters = [LoRAModule(f"a{i}", blk.attn.to_q, rank=2, alpha=1.0) for i, blk in enumerate(model.transformer_blocks)]
    for a in adapters:
        nn.init.normal_(a.lora_up.weight, std=0.1)
        a.apply_to()
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": image_position_ids(8, 8),
        "txt_ids": text_position_ids(5),
        "guidance": torch.tensor([3.5]) if cfg.guidance_embeds else None,
        "return_dict": False,
    }

    def grads(checkpoint_func):
        model.enable_gradient_checkpointing(checkpoint_func)
        for a in adapters:
            a.lora_up.weight.grad = None
        model(**inputs)[0].square().mean().backward()
        return [a.lora_up.weight.grad.clone() for a in adapters]

    reference = grads(None)
    offload = _StorageChecked()
    offloaded = grads(offload.checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(reference, offloaded))
    assert offload.shared == []  # real copies: the "changes no gradient" above compares offloading with checkpointing
    # double blocks get (hidden, text, temb), single blocks (hidden, text, temb) in diffusers 0.42
    blocks = cfg.num_layers + cfg.num_single_layers
    assert offload.packed == 3 * blocks


def test_activation_offload_on_the_sd_unet():
    """The U-Net checkpoints resnets and transformer blocks through the same function: inputs offloaded, same gradients."""
    from library.tiny_models import build_tiny_sd

    unet = build_tiny_sd()["unet"].requires_grad_(False)
    unet.conv_in.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10])
    ctx = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    unet.train()

    def grad(checkpoint_func):
        unet.enable_gradient_checkpointing(checkpoint_func)
        unet.conv_in.weight.grad = None
        unet(x, t, ctx).sample.square().mean().backward()
        return unet.conv_in.weight.grad.clone()

    reference = grad(None)
    offload = _StorageChecked()
    assert torch.equal(grad(offload.checkpoint), reference)
    assert offload.packed > 0 and offload.shared == []


# --- activation offload -----------------------------------------------------------------------------------------


class _StorageChecked(HostActivationOffload):
    """Notes every saved tensor whose offloaded copy shares memory with it (there must be none)."""

    def __init__(self, engine=None):
        super().__init__(engine)
        self.shared = []

    def pack(self, tensor):
        packed = super().pack(tensor)
        if packed[1].untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            self.shared.append(tuple(tensor.shape))
        return packed


def test_activation_offload_copies_into_its_own_host_buffer():
    offload = HostActivationOffload()
    base = torch.randn(6, 4)
    for t in (base, base.t(), base[1:4]):  # dense layouts are kept, views are copied alone
        device, host, _ = packed = offload.pack(t)
        assert device == t.device and torch.equal(host, t)
        assert host.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        assert host.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert host.stride() == t.contiguous().stride() or host.stride() == t.stride()
        back = offload.unpack(packed)
        assert torch.equal(back, t) and back.device == t.device
    assert base.t().stride() == offload.pack(base.t())[1].stride()
    assert offload.packed == 4


def _offload_grads(offload):
    torch.manual_seed(0)
    model = Toy()
    x, y = _data()[0]
    h = model.inp(x)
    for blk in model.blocks:
        h = offload.checkpoint(blk, h) if offload is not None else checkpoint(blk, h, use_reentrant=False)
    F.mse_loss(model.head(h), y).backward()
    return [p.grad for p in model.adapters.parameters()]


def test_activation_offload_waits_for_its_copies():
    """The recompute reads a block's offloaded inputs only after waiting for their copy (CUDA's side-stream order), and
    the gradients equal plain checkpointing's."""
    reference = _offload_grads(None)
    engine = RecordingEngine()
    offload = _StorageChecked(engine)
    with engine.uses():
        grads = _offload_grads(offload)
    assert not engine.errors, engine.errors[:5]
    assert offload.packed == engine.copies == len(Toy().blocks) and offload.shared == []
    assert sum(e[0] == "wait" for e in engine.log) == engine.copies
    assert all(torch.equal(a, b) for a, b in zip(grads, reference))
