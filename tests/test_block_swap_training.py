"""--blocks_to_swap while the swapped blocks are trained (full fine-tuning of FLUX / SD3), on CPU, where the swapper
runs the code of CUDA with synchronous copies into separate memory: library/custom_offloading_utils.py BlockSwapper
(updating, write-back, own_weights, to_host/to_device) with library/full_optim.py ChunkedOptimizer.stream_with.

- Bit for bit: fused per-parameter and blockwise steps (AdamW, Adafactor, stochastic bf16, per-chunk clipping, a
  block whose chunk completes only in step(), gradient checkpointing, previews between steps) give the losses and
  weights of the run without swap; so do real FLUX blocks and SD3 blocks placed by the family; a state saved with
  swap resumes exactly; EMA and state_dict() see every block's own values inside own_weights().
- Placement and order (OrderEngine: the CUDA side-stream protocol replayed on CPU, compute writes included): once a
  block's backward is done, its gradients are gone and its optimizer state is in host buffers the engine allocated;
  no copy overwrites a slot whose updates were not copied out first, or reads a buffer that compute writes after the
  copy's ordering point.
- Refusals: a plain optimizer over trained swapped weights, a chunk spanning two swapped blocks, flux_train.py
  without a fused mode or with --fused_optimizer_groups.
- End to end: flux_train.py --blocks_to_swap 2 --fused_backward_pass (with EMA and a state) against the run
  without swap: every file bit for bit.
(Float32 results on CPU depend on the number of threads: each comparison runs at one thread count.)
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import launch_script, write_caption, write_image
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from library.custom_offloading_utils import BlockSwapper, CopyEngine
from library.ema import EmaWeights
from library.full_optim import ChunkedOptimizer, chunks_by_pattern

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

DIM = 16


class Block(nn.Module):
    """An MLP block modulated by a conditioning vector all blocks share (like FLUX's AdaLN): the gradient of `mod`
    does not flow through the block's input."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.mod = nn.Linear(DIM, 2 * DIM)
        self.norm = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, 2 * DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)
        if unused:  # trained but never used: its block's chunk completes only in step()
            self.unused = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mod(temb).unsqueeze(1).chunk(2, dim=-1)
        return x + self.fc2(F.gelu(self.fc1(self.norm(x) * (1 + scale) + shift)))


class Net(nn.Module):
    def __init__(self, unused: bool = False, checkpointing: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(4, DIM)
        self.time = nn.Linear(1, DIM)
        self.blocks = nn.ModuleList(Block(unused and i == 4) for i in range(6))
        self.head = nn.Linear(DIM, 4)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = F.silu(self.time(t))
        h = self.inp(x)
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, temb=temb, use_reentrant=False)
            else:
                h = block(h, temb)
        return self.head(h)


def adamw(groups):
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.01)


def adafactor(groups):
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)


def batches(n: int = 3) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2, 5, 4, generator=g), torch.rand(2, 1, generator=g), torch.randn(2, 5, 4, generator=g)) for _ in range(n)
    ]


def own(swapper: BlockSwapper | None, read_only: bool = False):
    return swapper.own_weights(read_only) if swapper is not None else contextlib.nullcontext()


def build(
    blocks_to_swap: int,
    chunking: str = "parameter",
    make=adamw,
    bf16: bool = False,
    checkpointing: bool = False,
    unused: bool = False,
    engine: CopyEngine | None = None,
    swapper_class=BlockSwapper,
):
    """The model, its swapper (None without swap) and a fused ChunkedOptimizer over every weight, as flux_train.py
    builds them: the weights are frozen when the swapper is made and trained afterwards."""
    torch.manual_seed(0)
    model = Net(unused, checkpointing).to(torch.bfloat16 if bf16 else torch.float32).requires_grad_(False)
    swapper = swapper_class(model.blocks, blocks_to_swap, "cpu", engine=engine) if blocks_to_swap else None
    model.requires_grad_(True)
    named = list(model.named_parameters())
    chunks = chunks_by_pattern(named, r"blocks\.\d+\.") if chunking == "block" else chunking
    opt = ChunkedOptimizer([{"params": [p for _, p in named], "lr": 1e-2}], make, chunks, stochastic_bf16=bf16, seed=3)
    if swapper is not None:
        opt.stream_with(swapper)
    opt.fuse_into_backward(max_grad_norm=0.5)
    return model, swapper, opt


def train(model: Net, opt: ChunkedOptimizer, data, after_step=None) -> list[torch.Tensor]:
    dtype = next(model.parameters()).dtype
    losses = []
    for x, t, y in data:
        loss = F.mse_loss(model(x.to(dtype), t.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
        if after_step is not None:
            after_step()
    return losses


def weights(model: nn.Module, swapper: BlockSwapper | None) -> dict[str, torch.Tensor]:
    with own(swapper, read_only=True):
        return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what="") -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == [], what


# ---------------------------------------------------------------------------------------------------------------------
# bit for bit


CASES = {
    "per-parameter AdamW": {},
    "blockwise Adafactor, a late chunk": {"chunking": "block", "make": adafactor, "unused": True},
    "stochastic bf16": {"bf16": True},
    "blockwise, checkpointing": {"chunking": "block", "checkpointing": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_trained_swapped_blocks_change_no_number(case):
    """One swapped block in one slot, and four blocks through two slots (a write-back before every reuse), with
    previews (swapping_fewer) between steps: the losses, the preview outputs and the weights of the run without swap."""
    kw = CASES[case]

    def run(blocks_to_swap):
        model, swapper, opt = build(blocks_to_swap, **kw)
        x, t, _ = batches(1)[0]
        previews = []

        def preview():
            with torch.no_grad(), swapper.swapping_fewer(1) if swapper else contextlib.nullcontext():
                previews.append(model(x.to(next(model.parameters()).dtype), t.to(next(model.parameters()).dtype)))

        losses = train(model, opt, batches(), preview)
        return losses, previews, weights(model, swapper), swapper

    ref_losses, ref_previews, ref_weights, _ = run(0)
    for n in (1, 4):
        losses, previews, final, swapper = run(n)
        assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses)), (n, losses, ref_losses)
        assert all(torch.equal(a, b) for a, b in zip(previews, ref_previews)), n
        assert_same(final, ref_weights, n)
        assert swapper.updates > 0
        if n == 4:
            assert swapper.write_backs > 0


def test_a_swapped_state_resumes_bit_for_bit():
    """Weights and ChunkedOptimizer.state_dict() saved after 2 of 3 steps with swap (through a file: the host buffers
    are reused by later steps) and loaded into a fresh run: its third step gives the uninterrupted run's weights."""
    data = batches(3)
    model, swapper, opt = build(4)
    train(model, opt, data)
    expected = weights(model, swapper)

    model, swapper, opt = build(4)
    train(model, opt, data[:2])
    saved = io.BytesIO()
    torch.save({"weights": weights(model, swapper), "optimizer": opt.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)

    model, swapper, opt = build(4)
    with swapper.own_weights(), torch.no_grad():  # writes reach the host buffers; the slots load them again
        for k, p in model.named_parameters():
            p.copy_(state["weights"][k])
    opt.load_state_dict(state["optimizer"])
    streamed = [p for p in model.parameters() if swapper.streamed_block(p) is not None]
    assert all(opt.state_on_device(p) == [] for p in streamed)  # loaded states of streamed weights go to host memory
    train(model, opt, data[2:])
    assert_same(weights(model, swapper), expected)


def test_own_weights_shows_each_blocks_values_to_ema_and_state_dict():
    """Between steps, blocks 2 and 4 (one slot) have views of the same memory: state_dict() outside own_weights()
    shows one block's values twice. Inside it every block has its own; an EMA built and updated there, applied
    there, and taken out again gives the EMA of the run without swap, and training goes on unchanged."""

    def run(blocks_to_swap):
        model, swapper, opt = build(blocks_to_swap)
        with own(swapper, read_only=True):
            ema = EmaWeights(dict(model.named_parameters()), 0.5)

        def update():
            with own(swapper, read_only=True):
                ema.update()

        losses = train(model, opt, batches(2), update)
        with own(swapper), ema.applied():
            averaged = {k: v.clone() for k, v in model.state_dict().items()}
        losses += train(model, opt, batches(3)[2:])
        return model, swapper, losses, averaged, weights(model, swapper)

    _, _, ref_losses, ref_averaged, ref_final = run(0)
    model, swapper, losses, averaged, final = run(4)
    assert_same(averaged, ref_averaged)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert_same(final, ref_final)
    b2, b4 = model.blocks[2].fc1.weight, model.blocks[4].fc1.weight
    assert b2.data_ptr() == b4.data_ptr()  # views into one slot
    with swapper.own_weights(read_only=True):
        assert b2.data_ptr() != b4.data_ptr() and swapper.blocks_to_swap == 0  # nothing streams meanwhile
        assert not torch.equal(b2, b4)
    assert swapper.blocks_to_swap == 4


# ---------------------------------------------------------------------------------------------------------------------
# placement and order


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class OrderEngine(CopyEngine):
    """Synchronous copies that check the ordering a CUDA side stream needs, compute writes included.

    Compute is the sequence of aten ops under `uses()` (views excepted); `ops` is its position. Events: ("copy", n)
    for the n-th copy, ("compute", pos) from `record`. Errors:
    - compute reads a buffer whose latest copy it has not waited for;
    - a copy writes a buffer that compute reads after the copy's ordering point (its `after` event, or everything
      queued so far when None; the side stream is in order, so that point never goes back);
    - a copy reads a buffer that compute writes after that point (it would copy stale or torn values);
    - a copy overwrites a watched buffer (the swapper's slots) holding compute writes that no copy has read out.
    `host` holds the storages of every host buffer the engine allocated."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.ops = self.copies = self.waited = self.side_after = 0
        self.pending: dict[int, int] = {}  # buffer -> its latest copy
        self.last_read: dict[int, int] = {}
        self.last_write: dict[int, int] = {}
        self.saved: dict[int, int] = {}  # buffer -> compute position up to which a copy read it out
        self.watched: set[int] = set()
        self.host: set[int] = set()
        self._copying = False

    def host_empty(self, like):
        t = super().host_empty(like)
        self.host.add(_key(t))
        return t

    def copy(self, dst, src, after=None):
        self.side_after = max(self.side_after, self.ops if after is None else after[1])
        d, s, n = _key(dst), _key(src), self.copies + 1
        if self.last_read.get(d, 0) > self.side_after:
            self.errors.append(f"copy {n} overwrites a buffer read by op {self.last_read[d]} > {self.side_after}")
        if self.last_write.get(s, 0) > self.side_after:
            self.errors.append(f"copy {n} reads a buffer written by op {self.last_write[s]} > {self.side_after}")
        if d in self.watched and self.last_write.get(d, 0) > self.saved.get(d, 0):
            self.errors.append(f"copy {n} overwrites a slot updated by op {self.last_write[d]} before it was copied out")
        self.saved[s] = self.side_after
        self._copying = True
        try:
            with torch.no_grad():
                dst.copy_(src)
        finally:
            self._copying = False
        self.copies = n
        self.pending[d] = n
        return ("copy", n)

    def wait(self, event):
        assert event is not None and event[0] == "copy", event
        self.waited = max(self.waited, event[1])

    def record(self):
        return ("compute", self.ops)

    def wait_all(self):
        self.waited = self.copies

    def synchronize(self):
        self.waited = self.copies

    def uses(self) -> TorchDispatchMode:
        engine = self

        class Uses(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not engine._copying and not func.is_view:
                    engine.ops += 1
                    for i, arg in enumerate(func._schema.arguments):
                        if arg.alias_info is not None and arg.alias_info.is_write:
                            value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
                            for t in tree_leaves(value):
                                if isinstance(t, torch.Tensor):
                                    engine.last_write[_key(t)] = engine.ops
                    for t in tree_leaves((args, kwargs)):
                        if isinstance(t, torch.Tensor) and t.device.type != "meta":
                            k = _key(t)
                            if engine.pending.get(k, 0) > engine.waited:
                                engine.errors.append(f"op {engine.ops} ({func}) reads copy {engine.pending[k]} before waiting")
                            engine.last_read[k] = engine.ops
                return func(*args, **kwargs)

        return Uses()


def _watched_run(swapper_class=BlockSwapper, **kw):
    engine = OrderEngine()
    model, swapper, opt = build(4, engine=engine, swapper_class=swapper_class, **kw)
    engine.watched = {_key(s) for s in swapper._slots}
    streamed = {j: [p for p in model.blocks[j].parameters()] for j in range(swapper.first_swapped, 6)}
    problems: list[str] = []

    def placed(blocks, when):
        for j in blocks:
            for p in streamed[j]:
                if p.grad is not None:
                    problems.append(f"{when}: a gradient of block {j} is kept")
                if opt.state_on_device(p) or not all(
                    _key(v) in engine.host for v in opt.param_state(p).values() if isinstance(v, torch.Tensor)
                ):
                    problems.append(f"{when}: optimizer state of block {j} is not in host buffers")

    def done_after(i):  # full backward pre-hook of block i, after the swapper's: the blocks after i are done
        def hook(module, grad_output):
            placed(range(max(i + 1, swapper.first_swapped), 6), f"backward reached block {i}")

        return hook

    for i in range(1, 5):
        model.blocks[i].register_full_backward_pre_hook(done_after(i))
    with engine.uses():
        losses = train(model, opt, batches(), lambda: placed(streamed, "between steps"))
    resident = [p for p in model.parameters() if swapper.streamed_block(p) is None]
    return engine, swapper, opt, losses, weights(model, swapper), problems, resident


@pytest.mark.parametrize(
    "kw,steps_per_block",
    [({}, 8), ({"chunking": "block", "make": adafactor, "checkpointing": True}, 1)],
    ids=["per-parameter AdamW", "blockwise Adafactor, checkpointing"],
)
def test_swapped_state_and_gradients_leave_the_device_and_write_backs_come_first(kw, steps_per_block):
    ref_model, _, ref_opt = build(0, **kw)
    ref_losses = train(ref_model, ref_opt, batches())
    engine, swapper, opt, losses, final, problems, resident = _watched_run(**kw)
    assert not engine.errors, engine.errors[:5]
    assert not problems, problems[:5]
    assert swapper.write_backs >= 6 and swapper.updates == 3 * 4 * steps_per_block  # 3 steps x 4 swapped blocks
    assert all(opt.state_on_device(p) for p in resident)  # the others' state stays on the device: the check can tell
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert_same(final, weights(ref_model, None))


def test_the_order_check_catches_a_missing_write_back():
    class Forgetful(BlockSwapper):
        def _write_back(self, k, after):
            self._dirty[k] = False  # "forgets" to copy the slot out

    engine, *_ = _watched_run(Forgetful)
    assert any("before it was copied out" in e for e in engine.errors)


# ---------------------------------------------------------------------------------------------------------------------
# real blocks


def test_flux_blocks_trained_in_two_slots_change_no_number():
    from diffusers import FluxTransformer2DModel

    from library.flux_train_utils import image_position_ids, text_position_ids
    from library.tiny_models import tiny_flux_transformer_config

    def run(blocks_to_swap):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**{**tiny_flux_transformer_config(), "num_single_layers": 4}).requires_grad_(False)
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        swapper = BlockSwapper(blocks, blocks_to_swap, "cpu") if blocks_to_swap else None
        model.requires_grad_(True)
        opt = ChunkedOptimizer(list(model.parameters()), adamw, "parameter")
        if swapper is not None:
            opt.stream_with(swapper)
        opt.fuse_into_backward(1.0)
        cfg, g, losses = model.config, torch.Generator().manual_seed(3), []
        for _ in range(2):
            out = model(
                hidden_states=torch.randn(2, 16, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(2, 16, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
                timestep=torch.rand(2, generator=g),
                img_ids=image_position_ids(8, 8),
                txt_ids=text_position_ids(16),
                guidance=torch.ones(2),
                return_dict=False,
            )[0]
            loss = F.mse_loss(out, torch.randn(out.shape, generator=g))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return losses, weights(model, swapper), swapper

    ref_losses, ref_weights, _ = run(0)
    losses, final, swapper = run(4)  # 2 double + 4 single blocks: the last 4 through two slots
    assert swapper.write_backs > 0
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert_same(final, ref_weights)


def test_sd3_blocks_placed_by_the_family_train_blockwise_bit_for_bit():
    """Sd3Family.place_models (swap_denoiser_blocks) with the denoiser trained, one chunk per joint block as
    --blockwise_fused_optimizers makes them."""
    from diffusers import SD3Transformer2DModel

    from library.family import TrainModels
    from library.family_sd3 import Sd3Family
    from library.sd3_models import tiny_sd3_transformer_config
    from library.train_script import training_parser

    def run(blocks_to_swap):
        family = Sd3Family()
        args = training_parser(family, "t").parse_args(
            ["--pretrained_model_name_or_path", "kiln-tiny-sd3", "--blocks_to_swap", str(blocks_to_swap)]
        )
        torch.manual_seed(0)
        config = {
            **tiny_sd3_transformer_config("sd3.5-medium"),
            "num_layers": 4,
            "joint_attention_dim": 16,
            "pooled_projection_dim": 8,
        }
        model = SD3Transformer2DModel(**config).requires_grad_(False)
        models = TrainModels([], [None] * 3, None, model)
        family.place_models(args, models, torch.device("cpu"), torch.float32, [model], torch.float32)
        swapper = getattr(family, "swapper", None)
        model.requires_grad_(True).train()
        block_of = {id(p): n for n, b in enumerate(model.transformer_blocks) for p in b.parameters()}
        chunks: dict[int, list] = {}
        for p in model.parameters():
            chunks.setdefault(block_of.get(id(p), -1), []).append(p)
        opt = ChunkedOptimizer(list(model.parameters()), adamw, [chunks[k] for k in sorted(chunks)])
        if swapper is not None:
            opt.stream_with(swapper)
        opt.fuse_into_backward(1.0)
        g, losses = torch.Generator().manual_seed(5), []
        for _ in range(2):
            out = model(
                hidden_states=torch.randn(2, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(2, 7, 16, generator=g),
                pooled_projections=torch.randn(2, 8, generator=g),
                timestep=torch.rand(2, generator=g) * 1000,
                return_dict=False,
            )[0]
            loss = F.mse_loss(out, torch.randn(out.shape, generator=g))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return losses, weights(model, swapper), swapper

    ref_losses, ref_weights, _ = run(0)
    losses, final, swapper = run(2)
    assert swapper.blocks_to_swap == 2 and swapper.updates == 2 * 2
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert_same(final, ref_weights)


# ---------------------------------------------------------------------------------------------------------------------
# refusals


def test_a_plain_optimizer_over_swapped_trained_weights_is_refused():
    torch.manual_seed(0)
    model = Net().requires_grad_(False)
    BlockSwapper(model.blocks, 2, "cpu")
    model.requires_grad_(True)
    x, t, _ = batches(1)[0]
    with pytest.raises(RuntimeError, match="stream_with"):
        model(x, t)


def test_a_chunk_spanning_two_swapped_blocks_is_refused():
    model, swapper, _ = build(4)
    opt = ChunkedOptimizer(list(model.parameters()), adamw, "all")
    with pytest.raises(ValueError, match="4 swapped blocks"):
        opt.stream_with(swapper)


@pytest.mark.parametrize(
    "flags,problem",
    [
        ([], "add --fused_backward_pass"),
        (["--fused_optimizer_groups", "4"], "--fused_optimizer_groups"),
        (["--fused_backward_pass"], None),
        (["--blockwise_fused_optimizers"], None),
        (["--learning_rate", "0", "--train_t5xxl"], None),  # the denoiser is not trained: its blocks stream frozen
    ],
)
def test_flux_train_needs_a_fused_mode_to_swap_trained_blocks(flags, problem, tmp_path):
    from library.family_flux import FluxFamily
    from library.method_full import FLUX, SD3, FullMethod
    from library.train_script import training_parser

    for family, spec, model in ((FluxFamily(), FLUX, "kiln-tiny-flux"), (None, SD3, "kiln-tiny-sd3")):
        if family is None:
            from library.family_sd3 import Sd3Family

            family = Sd3Family()
        elif "--train_t5xxl" in flags:
            continue  # FLUX never trains its text encoders
        method = FullMethod(spec)
        args = training_parser(family, "t", method).parse_args(
            ["--pretrained_model_name_or_path", model, "--output_dir", str(tmp_path), "--blocks_to_swap", "2", *flags]
        )
        found = [p for p in method.argument_problems(args, family) if "--blocks_to_swap" in p]
        if problem is None:
            assert found == [], found
        else:
            assert len(found) == 1 and problem in found[0] and "\n" not in found[0], found


# ---------------------------------------------------------------------------------------------------------------------
# end to end


def same_objects(a, b) -> bool:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_objects(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_objects(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_flux_train_with_swapped_blocks_writes_the_files_of_the_run_without(tmp_path):
    """flux_train.py --fused_backward_pass with EMA, previews with the EMA weights, a checkpoint and a state at step 2:
    with --blocks_to_swap 2 every checkpoint, EMA file, state (weights and optimizer) and preview image is the run
    without swap's, bit for bit."""
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        write_caption(write_image(tmp_path / "data" / "2_shape" / f"{i}.png", (64, 64), color), f"a shape {i}")
    (tmp_path / "prompts.txt").write_text("a red shape --w 64 --h 64 --s 2 --d 7\n")
    # fmt: off
    common = ["--max_data_loader_n_workers", "0", "--seed", "1", "--resolution", "64", "--caption_extension", ".txt",
              "--pretrained_model_name_or_path", "kiln-tiny-flux", "--train_data_dir", tmp_path / "data", "--output_name",
              "fx", "--max_train_steps", "3", "--learning_rate", "1e-3", "--fused_backward_pass", "--cache_text_encoder_outputs",
              "--ema_decay", "0.5", "--save_every_n_steps", "2", "--save_state", "--max_grad_norm", "1", "--sample_prompts",
              tmp_path / "prompts.txt", "--sample_every_n_steps", "2", "--sample_with_ema"]
    # fmt: on
    launch_script("flux_train.py", *common, "--output_dir", tmp_path / "plain")
    run = launch_script("flux_train.py", *common, "--output_dir", tmp_path / "swap", "--blocks_to_swap", "2")
    assert "block swap: 2 of 4 blocks" in run.stdout + run.stderr
    plain, swap = tmp_path / "plain", tmp_path / "swap"
    names = sorted(p.name for p in plain.iterdir() if p.suffix == ".safetensors")
    assert names == ["fx-ema.safetensors", "fx-step00000002-ema.safetensors", "fx-step00000002.safetensors", "fx.safetensors"]
    for name in names:
        assert_same(load_file(str(swap / name)), load_file(str(plain / name)), name)
    for folder in ("fx-step00000002-state", "fx-state"):
        assert_same(load_file(str(swap / folder / "network.safetensors")), load_file(str(plain / folder / "network.safetensors")))
        optimizer = [torch.load(str(d / folder / "optimizer.pt"), weights_only=True) for d in (plain, swap)]
        assert same_objects(*optimizer), folder
    images = [sorted((d / "sample").iterdir()) for d in (plain, swap)]
    assert len(images[0]) == 2 and [p.read_bytes() for p in images[0]] == [p.read_bytes() for p in images[1]]
    losses = json.loads((plain / "fx_losses.json").read_text())["losses"]
    assert json.loads((swap / "fx_losses.json").read_text())["losses"] == losses


def test_flux_train_swap_with_checkpointing_and_activation_offload_trains_as_without(tmp_path):
    """With --gradient_checkpointing (and --cpu_offload_checkpointing), swapped trained blocks give the run without
    swap's weights within float32 rounding (not bit for bit: the recomputed blocks compute from their slot buffers)."""
    for i, color in enumerate([(200, 30, 30), (30, 200, 30)]):
        write_caption(write_image(tmp_path / "data" / "2_shape" / f"{i}.png", (64, 64), color), f"a shape {i}")
    # fmt: off
    common = ["--max_data_loader_n_workers", "0", "--seed", "1", "--resolution", "64", "--caption_extension", ".txt",
              "--pretrained_model_name_or_path", "kiln-tiny-flux", "--train_data_dir", tmp_path / "data", "--output_name",
              "fx", "--max_train_steps", "3", "--learning_rate", "1e-3", "--fused_backward_pass", "--cache_text_encoder_outputs",
              "--max_grad_norm", "1", "--gradient_checkpointing"]
    # fmt: on
    launch_script("flux_train.py", *common, "--output_dir", tmp_path / "plain")
    launch_script("flux_train.py", *common, "--output_dir", tmp_path / "swap", "--blocks_to_swap", "2", "--cpu_offload_checkpointing")
    plain, swap = load_file(str(tmp_path / "plain" / "fx.safetensors")), load_file(str(tmp_path / "swap" / "fx.safetensors"))
    assert plain.keys() == swap.keys()
    for k in plain:
        torch.testing.assert_close(swap[k], plain[k], rtol=0, atol=1e-6)
