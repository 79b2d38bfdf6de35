"""Captions: the per-sample caption pipeline (reference §3.2) and the `(tag:1.2)` weighted-caption parser.

Every random choice takes an explicit `random.Random`, so a caption is a pure function of
(caption text, options, rng state, epoch, step): the data order and captions of a run replay exactly.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CaptionOptions:
    """The caption settings of one subset (after config inheritance)."""

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    enable_wildcard: bool = False
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    def is_random(self) -> bool:
        """True when the same caption can come out differently from one step to the next."""
        return bool(
            self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
            or self.caption_tag_dropout_rate > 0
            or self.shuffle_caption
            or self.token_warmup_step > 0
            or self.enable_wildcard
        )


_WILDCARD = re.compile(r"\{([^}]+)\}")


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Pick one line of a multi-line caption, then one option of each `{a|b|c}`; `{{` and `}}` are literal braces."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_mark, close_mark = "\x01", "\x02"  # stand-ins for escaped braces, free of braces themselves
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def warmup_token_count(n_flex: int, opts: CaptionOptions, step: int, max_train_steps: int) -> int:
    """How many flexible tags token warm-up keeps at `step` (all of them once warm-up is over)."""
    warmup_steps = opts.token_warmup_step
    if 0 < warmup_steps < 1:  # a fraction of the whole run
        warmup_steps = math.floor(warmup_steps * max_train_steps)
    if not warmup_steps or step >= warmup_steps:
        return n_flex
    return math.floor(step * (n_flex - opts.token_warmup_min) / warmup_steps) + opts.token_warmup_min


def caption_dropped(opts: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    """Whether caption dropout empties the whole caption of this sample (rate, or every n-th epoch; `epoch` from 1).

    Draws one number from `rng` when caption_dropout_rate > 0, as step 2 of process_caption does.
    """
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    if opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0:
        dropped = True
    return dropped


def process_caption(
    caption: str,
    opts: CaptionOptions,
    rng: random.Random,
    epoch: int = 1,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """Apply prefix/suffix, dropout, wildcards, keep-tokens, warm-up, shuffle, tag dropout and the secondary separator.

    `epoch` counts from 1 (caption_dropout_every_n_epochs=2 drops every caption in epochs 2, 4, ...).
    """
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix

    if caption_dropped(opts, rng, epoch):
        return ""

    if opts.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    sep = opts.caption_separator
    keep_sep = opts.keep_tokens_separator
    has_keep_sep = bool(keep_sep) and keep_sep in caption
    if opts.shuffle_caption or opts.token_warmup_step > 0 or opts.caption_tag_dropout_rate > 0 or has_keep_sep:
        fixed_suffix: list[str] = []
        if has_keep_sep:
            fixed_part, flex_part = caption.split(keep_sep, 1)
            if keep_sep in flex_part:
                flex_part, suffix_part = flex_part.split(keep_sep, 1)
                fixed_suffix = _split_tags(suffix_part, sep)
            fixed = _split_tags(fixed_part, sep)
            flex = _split_tags(flex_part, sep)
        else:
            tags = [t.strip() for t in caption.strip().split(sep)]
            fixed, flex = tags[: opts.keep_tokens], tags[opts.keep_tokens :]

        flex = flex[: warmup_token_count(len(flex), opts, step, max_train_steps)]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_suffix)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, sep)
    return caption


# ---------------------------------------------------------------------------------------------------------------------
# Caption variants: the caption pipeline for cached text-encoder outputs (library/te_cache.py).
#
# A random caption pipeline cannot run per step when the text encoders' outputs are cached, so the random part is
# drawn ahead of time: each image gets a few processed captions ("variants"), encoded once, and each step picks one.
# Whole-caption dropout is kept out of the variants and applied when a step draws (the shared empty-caption entry),
# so its rate and its every-n-epochs rule behave exactly as without caching. Token warm-up depends on the step and
# cannot be drawn ahead of time.


def without_caption_dropout(opts: CaptionOptions) -> CaptionOptions:
    return replace(opts, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)


def has_caption_dropout(opts: CaptionOptions) -> bool:
    return opts.caption_dropout_rate > 0 or opts.caption_dropout_every_n_epochs > 0


def caption_variants(caption: str, opts: CaptionOptions, seed_key: str, variants: int) -> list[str]:
    """The processed captions to cache for one raw caption: variant k = process_caption(caption, opts without caption
    dropout, random.Random(f"{seed_key}-{k}"), epoch 1, step 0), for k < `variants`.

    A pipeline that is not random once caption dropout is taken out gives one variant, and so do variants that all came
    out equal (a one-tag caption with shuffle_caption): one variant then says the same with less to encode. The result
    depends only on the arguments, so a cache can compare stored texts with a fresh call to find stale entries.
    Raises ValueError for token warm-up (the caption depends on the step).
    """
    if opts.token_warmup_step > 0:
        raise ValueError("token warm-up changes the caption with the training step; its captions cannot be drawn ahead of time")
    if variants < 1:
        raise ValueError(f"caption variants must be at least 1, not {variants}")
    opts = without_caption_dropout(opts)
    n = variants if opts.is_random() else 1
    texts = [process_caption(caption, opts, random.Random(f"{seed_key}-{k}"), 1, 0) for k in range(n)]
    return texts[:1] if all(t == texts[0] for t in texts) else texts


def draw_caption_variant(opts: CaptionOptions, rng: random.Random, epoch: int, n_variants: int) -> int | None:
    """Which cached variant a training step uses: None when caption dropout empties the caption (use the empty-caption
    entry), else an index below `n_variants` drawn uniformly. Dropout is drawn first, as in process_caption."""
    if caption_dropped(opts, rng, epoch):
        return None
    return rng.randrange(n_variants) if n_variants > 1 else 0


# ---------------------------------------------------------------------------------------------------------------------
# Weighted captions: A1111 attention syntax.
#   (text) multiplies the weight of text by 1.1, [text] divides it by 1.1, (text:1.5) multiplies it by 1.5;
#   brackets nest; \( \) \[ \] are literal brackets; a bracket left open applies to the rest of the caption.

ROUND_BRACKET_FACTOR = 1.1
_WEIGHT_TOKEN = re.compile(r"\\.|\(|\[|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|\)|]|[^\\()\[\]:]+|:")


def parse_weighted_caption(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pieces; neighbouring pieces of equal weight are merged."""
    pieces: list[list] = []  # [text, weight]
    open_round: list[int] = []  # index into pieces where each open bracket started
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _WEIGHT_TOKEN.finditer(text):
        tok = m.group(0)
        if tok.startswith("\\"):
            pieces.append([tok[1:], 1.0])
        elif tok == "(":
            open_round.append(len(pieces))
        elif tok == "[":
            open_square.append(len(pieces))
        elif m.group(1) is not None and open_round:  # ":1.3)" closes a weighted round bracket
            scale(open_round.pop(), float(m.group(1)))
        elif tok == ")" and open_round:
            scale(open_round.pop(), ROUND_BRACKET_FACTOR)
        elif tok == "]" and open_square:
            scale(open_square.pop(), 1 / ROUND_BRACKET_FACTOR)
        else:
            pieces.append([tok, 1.0])
    for start in open_round:
        scale(start, ROUND_BRACKET_FACTOR)
    for start in open_square:
        scale(start, 1 / ROUND_BRACKET_FACTOR)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and math.isclose(merged[-1][1], weight):
            merged[-1] = (merged[-1][0] + piece_text, merged[-1][1])
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]
