"""Block swap changes no number on CPU: tiny FLUX (2 double + 4 single blocks) with kiln's FLUX LoRA, float32, no
gradient checkpointing, AdamW steps; the per-step LoRA gradients and the final weights equal the run without swap
bit for bit. (float32 results on CPU depend on the number of intra-op threads, swap or not: compare runs at the
same thread count.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from library.custom_offloading_utils import BlockSwapper
from library.flux_train_utils import image_position_ids, text_position_ids
from library.tiny_models import tiny_flux_transformer_config


def _train(blocks_to_swap: int, steps: int = 3):
    from diffusers import FluxTransformer2DModel

    import networks.lora_flux as lf

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**{**tiny_flux_transformer_config(), "num_single_layers": 4}).requires_grad_(False)
    network = lf.create_network(1.0, 4, 4.0, [], model)
    network.apply_to(False, True)
    if blocks_to_swap:
        BlockSwapper([*model.transformer_blocks, *model.single_transformer_blocks], blocks_to_swap, "cpu")
    params = [p for p in network.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    cfg, g = model.config, torch.Generator().manual_seed(3)
    grads = []
    for _ in range(steps):
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
        F.mse_loss(out, torch.randn(out.shape, generator=g)).backward()
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad()
    return grads, [p.detach().clone() for p in params]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_flux_lora_steps_are_bit_identical_with_block_swap():
    ref_grads, ref_weights = _train(0)
    for n in (1, 4):  # one block in one slot; four blocks through two slots
        grads, weights = _train(n)
        for step, (a, b) in enumerate(zip(grads, ref_grads)):
            assert [i for i, (x, y) in enumerate(zip(a, b)) if not torch.equal(x, y)] == [], (n, step)
        assert all(torch.equal(x, y) for x, y in zip(weights, ref_weights)), n
