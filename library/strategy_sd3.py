"""SD3 / SD3.5 strategies: CLIP-L, CLIP-G and T5-XXL tokenizing and encoding, per-encoder caption dropout, and the
joining of the three encoders' outputs into what the MMDiT takes (reference section 1.3).

Tokens
    Every caption is tokenized three times, each padded and truncated to a fixed length (no 75-token chunking, no
    weighted captions): CLIP-L and CLIP-G to 77, T5 to `t5xxl_max_token_length` (default 256). CLIP-G pads with id 0
    ("!") whatever pad token its tokenizer has, as sd-scripts forces; CLIP-L pads with its tokenizer's pad token
    (<|endoftext|>). `tokenize` returns sd-scripts' list `[l_ids, g_ids, t5_ids, l_mask, g_mask, t5_mask]`, the masks
    1 for real tokens (<BOS> text <EOS> for CLIP, text <EOS> for T5) and 0 for padding.

Encoder outputs (what the text-encoder cache stores, named TE_OUTPUT_KEYS, one tensor each)
    l_out, g_out      CLIP-L / CLIP-G penultimate hidden states, hidden_states[-2] (no final layer norm): (B, 77, 768)
                      and (B, 77, 1280) at full size
    t5_out            T5's last hidden state: (B, L_t5, 4096)
    l_pooled, g_pooled  the projected pooled outputs (`text_embeds` of CLIPTextModelWithProjection: the final-normed
                      state at the first <|endoftext|> token, through text_projection): (B, 768), (B, 1280)
    l_attn_mask, g_attn_mask, t5_attn_mask  the tokenizers' masks, (B, 77) and (B, L_t5), in the dtype of the
                      encoder's output
    With apply_lg_attn_mask / apply_t5_attn_mask the padding mask goes into the CLIP / T5 encoders' own attention.
    As in sd-scripts, the padded positions of the outputs are not zeroed (sd-scripts' help text says "zero embs", its
    code does not), and the masks are not used beyond the encoders: the MMDiT gets no attention mask. Both flags
    change the outputs, so they are part of a cache's identity (`Sd3TextEncodingStrategy.cache_identity`); the
    dropout rates are not (the cache holds outputs without dropout).

Per-encoder caption dropout (`clip_l_dropout_rate`, `clip_g_dropout_rate`, `t5_dropout_rate`)
    Applied to encoder outputs after encoding, live or cached alike, so a cached run and a live run with the same
    generators drop the same encoders of the same samples. A dropped encoder's outputs are replaced by zeros, as
    sd-scripts does for all three (not by the outputs of an empty caption): CLIP-L zeros l_out, l_pooled and
    l_attn_mask (channels 0-767 of the joined context's first 77 tokens and of the pooled vector), CLIP-G likewise
    g_out, g_pooled, g_attn_mask, T5 zeros t5_out and t5_attn_mask. The draws come from torch.Generators passed in
    (see `draw_encoder_drops`), not from Python's global `random` as in sd-scripts: the same probabilities, other
    draws.

Joining (`join_encodings`)
    context = cat(pad(cat(l_out, g_out) on channels with zeros to T5's width), t5_out) along the sequence:
    (B, 77 + L_t5, 4096); pooled = cat(l_pooled, g_pooled): (B, 2048). The padding goes to T5's width, as diffusers
    (sd-scripts pads to a fixed 4096, the same at full size; the tiny test encoders need the former).

Against diffusers' StableDiffusion3Pipeline.encode_prompt (the tests' oracle), with the same encoders and tokenizers,
both settings at their defaults (no masks, T5 length 256 = diffusers' max_sequence_length) and no dropout, the
context and pooled vector are equal. The differences:
    - CLIP-G padding: kiln pads with id 0 always; diffusers pads with tokenizer_2's pad token (id 0 in the SD3
      repositories' tokenizer_2, so they agree there). With another pad token only the padded positions of g_out
      differ (CLIP is causal; the pooled vector is taken at <|endoftext|>, before the padding).
    - apply_lg_attn_mask (diffusers has no such option): with it only the padded positions of l_out/g_out differ.
    - apply_t5_attn_mask (diffusers has no such option): with it every T5 position may differ (T5 attends both ways).
    - Without a T5 encoder diffusers uses max_sequence_length zero tokens, sd-scripts 77 zero tokens; kiln needs T5.
    - diffusers casts the CLIP states to CLIP-L's dtype; kiln keeps each encoder's output dtype (torch.cat
      promotes when they differ). diffusers' clip_skip has no counterpart (sd-scripts always takes hidden_states[-2]).
    - Per-encoder dropout is kiln's / sd-scripts' training feature; diffusers has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from library.strategy_base import TextEncodingStrategy, TokenizeStrategy, tokenizer_fingerprint
from library.transfer import to_device

CLIP_MAX_LENGTH = 77
CLIP_G_PAD_TOKEN_ID = 0  # sd-scripts sets CLIP-G's pad token id to 0 ("!"), not <|endoftext|>
DEFAULT_T5_MAX_LENGTH = 256
TE_OUTPUT_KEYS = ("l_out", "g_out", "t5_out", "l_pooled", "g_pooled", "l_attn_mask", "g_attn_mask", "t5_attn_mask")
ENCODERS = ("clip_l", "clip_g", "t5")  # the order of dropout rates and of the columns of draw_encoder_drops


class Sd3EncoderOutputs(NamedTuple):
    """The per-encoder outputs in TE_OUTPUT_KEYS order (see the module docstring)."""

    l_out: torch.Tensor
    g_out: torch.Tensor
    t5_out: torch.Tensor
    l_pooled: torch.Tensor
    g_pooled: torch.Tensor
    l_attn_mask: torch.Tensor
    g_attn_mask: torch.Tensor
    t5_attn_mask: torch.Tensor


class Sd3TokenizeStrategy(TokenizeStrategy):
    """CLIP-L, CLIP-G (padded with id 0) and T5 tokens of each caption; see the module docstring."""

    def __init__(self, clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer, t5xxl_max_token_length: int | None = None) -> None:
        self.clip_l, self.clip_g, self.t5 = clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer
        self.t5_max_length = t5xxl_max_token_length or DEFAULT_T5_MAX_LENGTH

    def tokenize(self, texts: list[str]) -> list[torch.Tensor]:
        """[l_ids, g_ids, t5_ids, l_mask, g_mask, t5_mask]: (B, 77), (B, 77), (B, L_t5) ids and their masks."""
        kwargs = {"padding": "max_length", "truncation": True, "return_tensors": "pt"}
        lt = self.clip_l(texts, max_length=CLIP_MAX_LENGTH, **kwargs)
        gt = self.clip_g(texts, max_length=CLIP_MAX_LENGTH, **kwargs)
        t5 = self.t5(texts, max_length=self.t5_max_length, **kwargs)
        g_ids = gt.input_ids.masked_fill(gt.attention_mask == 0, CLIP_G_PAD_TOKEN_ID)
        return [lt.input_ids, g_ids, t5.input_ids, lt.attention_mask, gt.attention_mask, t5.attention_mask]

    def tokenize_with_weights(self, texts: list[str]):
        raise ValueError("--weighted_captions is for SD 1.x/2.x and SDXL; SD3 has no prompt weighting")

    def settings(self) -> dict:
        return {
            "tokenizers": [tokenizer_fingerprint(t) for t in (self.clip_l, self.clip_g, self.t5)],
            "vocab": [len(self.clip_l), len(self.clip_g), len(self.t5)],
            "pad": [self.clip_l.pad_token_id, CLIP_G_PAD_TOKEN_ID, self.t5.pad_token_id],
            "clip_max_length": CLIP_MAX_LENGTH,
            "t5_max_length": self.t5_max_length,
        }


def encode_clip(clip, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states (B, 77, D), projected pooled output (B, P)) of a CLIPTextModelWithProjection; mask
    (B, 77) goes into its attention when given."""
    out = clip(
        input_ids=to_device(ids, clip.device),
        attention_mask=None if mask is None else to_device(mask, clip.device),
        output_hidden_states=True,
    )
    return out.hidden_states[-2], out.text_embeds


def encode_t5(t5, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """T5EncoderModel's last hidden state (B, L, D); mask (B, L) goes into its attention when given."""
    return t5(
        input_ids=to_device(ids, t5.device), attention_mask=None if mask is None else to_device(mask, t5.device)
    ).last_hidden_state


def _checked_rates(rates: Sequence[float]) -> tuple[float, float, float]:
    out = tuple(float(r) for r in rates)
    if len(out) != len(ENCODERS) or any(not 0.0 <= r <= 1.0 for r in out):
        raise ValueError(f"dropout rates must be three numbers between 0 and 1 (CLIP-L, CLIP-G, T5), got {list(out)}")
    return out


def draw_encoder_drops(
    batch_size: int, rates: Sequence[float], generators: torch.Generator | Sequence[torch.Generator] | None
) -> torch.Tensor:
    """(B, 3) bool on the CPU: which encoders (columns CLIP-L, CLIP-G, T5) of which sample are dropped.

    generators: one per sample (the trainer's per-sample generators), or a single generator for the whole batch, or
    None when every rate is 0. Per sample, in the order CLIP-L, CLIP-G, T5, one `torch.rand` is drawn for each encoder
    whose rate is above 0 (a rate of 0 draws nothing and drops nothing; 1 always drops); with a single generator the
    draws go sample by sample. The result depends only on the rates and the generators' states."""
    rates = _checked_rates(rates)
    drops = torch.zeros((batch_size, len(ENCODERS)), dtype=torch.bool)
    if not any(r > 0.0 for r in rates):
        return drops
    if generators is None:
        raise ValueError("per-encoder dropout needs a torch.Generator (or one per sample)")
    if isinstance(generators, torch.Generator):
        per_sample = [generators] * batch_size
    else:
        per_sample = list(generators)
        if len(per_sample) != batch_size:
            raise ValueError(f"{len(per_sample)} generators for a batch of {batch_size}")
    for i, g in enumerate(per_sample):
        for e, rate in enumerate(rates):
            if rate > 0.0:
                drops[i, e] = bool(torch.rand((), generator=g) < rate)
    return drops


def _zero_rows(t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """t with the rows (samples) where drop (B,) is True replaced by zeros; a new tensor, t is not changed."""
    keep = to_device(~drop, t.device).reshape(-1, *([1] * (t.dim() - 1)))
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


def drop_encoder_outputs(outputs: Sequence[torch.Tensor], drops: torch.Tensor) -> list[torch.Tensor]:
    """Per-encoder outputs (TE_OUTPUT_KEYS order) with the dropped encoders' outputs of each sample set to zeros.

    drops: (B, 3) bool from draw_encoder_drops. CLIP-L: l_out, l_pooled, l_attn_mask; CLIP-G: g_out, g_pooled,
    g_attn_mask; T5: t5_out, t5_attn_mask (sd-scripts' replacement: zeros, not the empty caption's outputs). The
    inputs are not modified (cached tensors stay as they are); an encoder that no sample drops keeps its tensors."""
    o = Sd3EncoderOutputs(*outputs)
    groups = {
        0: ("l_out", "l_pooled", "l_attn_mask"),
        1: ("g_out", "g_pooled", "g_attn_mask"),
        2: ("t5_out", "t5_attn_mask"),
    }
    changed = {}
    for e, names in groups.items():
        if drops[:, e].any():
            changed.update({n: _zero_rows(getattr(o, n), drops[:, e]) for n in names})
    return list(o._replace(**changed))


def join_encodings(outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, 77 + L_t5, D_t5), pooled (B, P_l + P_g)) from per-encoder outputs (TE_OUTPUT_KEYS order):
    CLIP-L and CLIP-G states joined on channels, zero-padded to T5's width, T5's states appended along the sequence;
    the two pooled vectors joined."""
    o = Sd3EncoderOutputs(*outputs)
    lg = torch.cat([o.l_out, o.g_out], dim=-1)
    width = o.t5_out.shape[-1]
    if lg.shape[-1] > width:
        raise ValueError(f"CLIP-L + CLIP-G width {lg.shape[-1]} exceeds T5's width {width}")
    lg = torch.nn.functional.pad(lg, (0, width - lg.shape[-1]))
    return torch.cat([lg, o.t5_out], dim=-2), torch.cat([o.l_pooled, o.g_pooled], dim=-1)


class Sd3TextEncodingStrategy(TextEncodingStrategy):
    """Tokens -> per-encoder outputs (`encode_tokens`, what the cache stores); outputs -> dropout and the MMDiT's
    (context, pooled) (`conditioning`). See the module docstring."""

    def __init__(
        self,
        apply_lg_attn_mask: bool = False,
        apply_t5_attn_mask: bool = False,
        clip_l_dropout_rate: float = 0.0,
        clip_g_dropout_rate: float = 0.0,
        t5_dropout_rate: float = 0.0,
    ) -> None:
        self.apply_lg_attn_mask = bool(apply_lg_attn_mask)
        self.apply_t5_attn_mask = bool(apply_t5_attn_mask)
        self.dropout_rates = _checked_rates((clip_l_dropout_rate, clip_g_dropout_rate, t5_dropout_rate))

    def encode_tokens(self, models: list, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """models [CLIP-L, CLIP-G (both CLIPTextModelWithProjection), T5EncoderModel], tokens from
        Sd3TokenizeStrategy.tokenize -> the outputs in TE_OUTPUT_KEYS order, without dropout."""
        clip_l, clip_g, t5 = models
        l_ids, g_ids, t5_ids, l_mask, g_mask, t5_mask = tokens
        lg = self.apply_lg_attn_mask
        l_out, l_pooled = encode_clip(clip_l, l_ids, l_mask if lg else None)
        g_out, g_pooled = encode_clip(clip_g, g_ids, g_mask if lg else None)
        t5_out = encode_t5(t5, t5_ids, t5_mask if self.apply_t5_attn_mask else None)
        return list(
            Sd3EncoderOutputs(
                l_out,
                g_out,
                t5_out,
                l_pooled,
                g_pooled,
                to_device(l_mask, l_out.device, l_out.dtype),
                to_device(g_mask, g_out.device, g_out.dtype),
                to_device(t5_mask, t5_out.device, t5_out.dtype),
            )
        )

    def encode_tokens_with_weights(
        self, models: list, tokens: list[torch.Tensor], weights: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        raise ValueError("--weighted_captions is for SD 1.x/2.x and SDXL; SD3 has no prompt weighting")

    def drop(
        self, outputs: Sequence[torch.Tensor], generators: torch.Generator | Sequence[torch.Generator] | None
    ) -> list[torch.Tensor]:
        """Per-encoder dropout at this strategy's rates (draw_encoder_drops, then drop_encoder_outputs)."""
        drops = draw_encoder_drops(outputs[0].shape[0], self.dropout_rates, generators)
        return drop_encoder_outputs(outputs, drops)

    def conditioning(
        self, outputs: Sequence[torch.Tensor], generators: torch.Generator | Sequence[torch.Generator] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) for the MMDiT from per-encoder outputs, live or cached: dropout, then join_encodings.
        generators may be None only when every rate is 0; preview sampling joins with join_encodings, no dropout."""
        return join_encodings(self.drop(outputs, generators))

    def cache_identity(self) -> dict:
        """The encoding options that change the cached outputs (the family adds them to the cache identity)."""
        return {"apply_lg_attn_mask": self.apply_lg_attn_mask, "apply_t5_attn_mask": self.apply_t5_attn_mask}
