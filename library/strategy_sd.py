"""SD 1.x/2.x strategies: one CLIP tokenizer and text encoder, `--max_token_length`, `--clip_skip`, weighted captions.

SD 1.x/2.x has no text-encoder output cache: captions change every step with caption augmentation, and the text
encoder is small. Latents are cached through library.strategy_base.LatentsCachingStrategy with arch "sd".
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


class SdTokenizeStrategy(TokenizeStrategy):
    def __init__(self, tokenizer, max_token_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_token_length or 75

    def tokenize(self, texts: list[str]) -> list[torch.Tensor]:
        return [torch.stack([clip_ids_and_weights(self.tokenizer, t, self.max_length, False)[0] for t in texts])]

    def tokenize_with_weights(self, texts: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pairs = [clip_ids_and_weights(self.tokenizer, t, self.max_length, True) for t in texts]
        return [torch.stack([p[0] for p in pairs])], [torch.stack([p[1] for p in pairs])]

    def settings(self) -> dict:
        return {"tokenizer": tokenizer_fingerprint(self.tokenizer), "vocab": len(self.tokenizer), "max_length": self.max_length}


def clip_hidden_states(text_encoder, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """Encoder states of (N, 77) ids: the final layer normed, or with clip_skip=k the k-th layer from the end, normed."""
    if not clip_skip or clip_skip <= 1:
        return text_encoder(ids, output_hidden_states=False).last_hidden_state
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    return _final_layer_norm(text_encoder)(hidden)


def _final_layer_norm(text_encoder):
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


class SdTextEncodingStrategy(TextEncodingStrategy):
    def __init__(self, clip_skip: int | None = None) -> None:
        self.clip_skip = clip_skip

    def encode_tokens(self, models: list, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        (text_encoder,) = models
        (ids,) = tokens  # (B, n_chunks, 77)
        b, n, length = ids.shape
        hidden = clip_hidden_states(text_encoder, to_device(ids.reshape(b * n, length), text_encoder.device), self.clip_skip)
        return [join_clip_chunks(hidden, n)]

    def encode_tokens_with_weights(
        self, models: list, tokens: list[torch.Tensor], weights: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        (hidden,) = self.encode_tokens(models, tokens)
        return [apply_token_weights(hidden, to_device(weights[0], hidden.device))]
