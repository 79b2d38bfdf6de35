"""FLUX.1 strategies: CLIP-L (pooled output) and T5-XXL (hidden states) text encoding.

Outputs (reference section 2): `l_pooled` = CLIP-L's pooled output (B, 768), `t5_out` = T5's last hidden state
(B, L, 4096) with L = --t5xxl_max_token_length (256 for schnell, 512 for dev by default), and `t5_attn_mask` (B, L),
1 for real tokens. With --apply_t5_attn_mask, T5 attends only to real tokens and the transformer's attention ignores
the padding (see family_flux). Text position ids are zeros and are made where they are used.
"""

from __future__ import annotations

import torch

from library.strategy_base import TextEncodingStrategy, TokenizeStrategy, tokenizer_fingerprint
from library.transfer import to_device

TE_OUTPUT_KEYS = ("l_pooled", "t5_out", "t5_attn_mask")


class FluxTokenizeStrategy(TokenizeStrategy):
    def __init__(self, clip_tokenizer, t5_tokenizer, t5_max_length: int) -> None:
        self.clip, self.t5 = clip_tokenizer, t5_tokenizer
        self.t5_max_length = t5_max_length

    def tokenize(self, texts: list[str]) -> list[torch.Tensor]:
        clip = self.clip(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t5 = self.t5(texts, padding="max_length", max_length=self.t5_max_length, truncation=True, return_tensors="pt")
        return [clip, t5.input_ids, t5.attention_mask]

    def tokenize_with_weights(self, texts: list[str]):
        raise ValueError("--weighted_captions is for SD 1.x/2.x and SDXL; FLUX's T5 encoder has no prompt weighting")

    def settings(self) -> dict:
        return {
            "tokenizers": [tokenizer_fingerprint(self.clip), tokenizer_fingerprint(self.t5)],
            "vocab": [len(self.clip), len(self.t5)],
            "t5_max_length": self.t5_max_length,
        }


class FluxTextEncodingStrategy(TextEncodingStrategy):
    def __init__(self, apply_t5_attn_mask: bool = False) -> None:
        self.apply_t5_attn_mask = apply_t5_attn_mask

    def encode_tokens(self, models: list, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        clip, t5 = models
        clip_ids, t5_ids, t5_mask = tokens
        l_pooled = clip(to_device(clip_ids, clip.device), output_hidden_states=False).pooler_output
        mask = to_device(t5_mask, t5.device)
        t5_out = t5(to_device(t5_ids, t5.device), attention_mask=mask if self.apply_t5_attn_mask else None).last_hidden_state
        return [l_pooled, t5_out, mask.to(t5_out.dtype)]

    def encode_tokens_with_weights(
        self, models: list, tokens: list[torch.Tensor], weights: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        raise ValueError("--weighted_captions is for SD 1.x/2.x and SDXL; FLUX's T5 encoder has no prompt weighting")
