"""SDXL strategies: two CLIP tokenizers and text encoders, and the U-Net's size/crop conditioning.

Encoder outputs (reference section 2): text encoder 1's penultimate layer (the 11th of CLIP-L's 12, no final norm), text encoder
2's penultimate layer (no final norm), and encoder 2's projected, normed end-of-text token as the pooled vector.
Long prompts (`--max_token_length` 150/225) are encoded in 77-token chunks and joined; the pooled vector is the
first chunk's.
"""

from __future__ import annotations

import torch

from library.strategy_base import (
    TextEncodingStrategy,
    TokenizeStrategy,
    apply_token_weights,
    clip_ids_and_weights,
    join_clip_chunks,
    tokenizer_fingerprint,
)
from library.transfer import to_device

TE_OUTPUT_KEYS = ("hidden_state1", "hidden_state2", "pool2")


class SdxlTokenizeStrategy(TokenizeStrategy):
    def __init__(self, tokenizer1, tokenizer2, max_token_length: int | None = None) -> None:
        self.tokenizers = (tokenizer1, tokenizer2)
        self.max_length = max_token_length or 75

    def _ids(self, texts: list[str], weighted: bool):
        out_ids, out_w = [], []
        for tok in self.tokenizers:
            pairs = [clip_ids_and_weights(tok, t, self.max_length, weighted) for t in texts]
            out_ids.append(torch.stack([p[0] for p in pairs]))
            out_w.append(torch.stack([p[1] for p in pairs]))
        return out_ids, out_w

    def tokenize(self, texts: list[str]) -> list[torch.Tensor]:
        return self._ids(texts, False)[0]

    def tokenize_with_weights(self, texts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self._ids(texts, True)

    def settings(self) -> dict:
        return {
            "tokenizers": [tokenizer_fingerprint(t) for t in self.tokenizers],
            "vocab": [len(t) for t in self.tokenizers],
            "pad": [t.pad_token_id for t in self.tokenizers],
            "max_length": self.max_length,
        }


class SdxlTextEncodingStrategy(TextEncodingStrategy):
    def encode_tokens(self, models: list, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        te1, te2 = models
        ids1, ids2 = tokens
        b, n, length = ids1.shape
        out1 = te1(to_device(ids1.reshape(b * n, length), te1.device), output_hidden_states=True)
        hidden1 = join_clip_chunks(out1.hidden_states[-2], n)  # = hidden_states[11] of the 12-layer CLIP-L
        out2 = te2(to_device(ids2.reshape(b * n, length), te2.device), output_hidden_states=True)
        hidden2 = join_clip_chunks(out2.hidden_states[-2], n)
        pool2 = out2.text_embeds.reshape(b, n, -1)[:, 0]
        return [hidden1, hidden2, pool2]

    def encode_tokens_with_weights(
        self, models: list, tokens: list[torch.Tensor], weights: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        hidden1, hidden2, pool2 = self.encode_tokens(models, tokens)
        return [
            apply_token_weights(hidden1, to_device(weights[0], hidden1.device)),
            apply_token_weights(hidden2, to_device(weights[1], hidden2.device)),
            pool2,
        ]


def size_conditioning(
    original_sizes_hw: torch.Tensor, crop_top_lefts: torch.Tensor, target_sizes_hw: torch.Tensor
) -> torch.Tensor:
    """SDXL's micro-conditioning: (B, 6) = original (h, w), crop (top, left), target (h, w), as diffusers' time_ids."""
    return torch.cat([original_sizes_hw, crop_top_lefts, target_sizes_hw], dim=1).float()
