"""SD3 tokenizing and text encoding (library/strategy_sd3.py) on tiny CLIP-L, CLIP-G and T5 encoders.

Oracle: diffusers' StableDiffusion3Pipeline.encode_prompt on the same encoders and tokenizers; the documented
differences (CLIP-G's pad id, the two attention-mask options) are tested as differences. Also: tokens and masks, the
pooled vector at <|endoftext|>, per-encoder dropout, and dropout on outputs read back from kiln's text-encoder cache
against dropout when encoding live.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import write_caption, write_image

from library import config_util
from library.datasets import DatasetGroup, build_datasets
from library.strategy_sd3 import (
    CLIP_G_PAD_TOKEN_ID,
    TE_OUTPUT_KEYS,
    Sd3EncoderOutputs,
    Sd3TextEncodingStrategy,
    Sd3TokenizeStrategy,
    draw_encoder_drops,
    drop_encoder_outputs,
    join_encodings,
)
from library.te_cache import TextEncoderOutputCache
from library.tiny_models import tiny_clip_config, tiny_t5_config, tiny_t5_tokenizer, write_tiny_clip_tokenizer

L_WIDTH, G_WIDTH = 24, 32  # joined 56 < T5's 64: the context's zero padding on channels is exercised
BOS, EOS = 512, 513  # tiny CLIP tokenizer
T5_EOS, T5_PAD = 1, 0
CAPTIONS = ["a red cat", "two dogs on a hill in the rain", "", "blue sky"]


class Tiny:
    """The tiny SD3 text side: encoders, tokenizers (CLIP-G pads with "!" = id 0, as the SD3 repositories' tokenizer_2,
    and a second CLIP-G tokenizer padding with <|endoftext|>)."""

    def __init__(self, tmp: str) -> None:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        torch.manual_seed(0)
        self.clip_l = CLIPTextModelWithProjection(tiny_clip_config(v2=False, hidden_size=L_WIDTH)).eval()
        self.clip_g = CLIPTextModelWithProjection(tiny_clip_config(v2=True, hidden_size=G_WIDTH)).eval()
        self.t5 = T5EncoderModel(tiny_t5_config()).eval()
        write_tiny_clip_tokenizer(os.path.join(tmp, "l"))
        write_tiny_clip_tokenizer(os.path.join(tmp, "g"), pad_token="!")
        write_tiny_clip_tokenizer(os.path.join(tmp, "g_eos"))
        self.tok_l = CLIPTokenizer.from_pretrained(os.path.join(tmp, "l"))
        self.tok_g = CLIPTokenizer.from_pretrained(os.path.join(tmp, "g"))
        self.tok_g_eos = CLIPTokenizer.from_pretrained(os.path.join(tmp, "g_eos"))
        self.tok_t5 = tiny_t5_tokenizer()

    @property
    def models(self) -> list:
        return [self.clip_l, self.clip_g, self.t5]

    def tokenize(self, texts: list[str], t5_length: int | None = None, tok_g=None) -> list[torch.Tensor]:
        return Sd3TokenizeStrategy(self.tok_l, tok_g or self.tok_g, self.tok_t5, t5_length).tokenize(texts)

    def encode(self, texts: list[str], t5_length: int | None = None, tok_g=None, **options) -> list[torch.Tensor]:
        with torch.no_grad():
            return Sd3TextEncodingStrategy(**options).encode_tokens(self.models, self.tokenize(texts, t5_length, tok_g))

    def diffusers(self, texts: list[str], t5_length: int = 256, tok_g=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled_prompt_embeds) of StableDiffusion3Pipeline.encode_prompt."""
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline(
            transformer=None,
            scheduler=None,
            vae=None,
            text_encoder=self.clip_l,
            tokenizer=self.tok_l,
            text_encoder_2=self.clip_g,
            tokenizer_2=tok_g or self.tok_g,
            text_encoder_3=self.t5,
            tokenizer_3=self.tok_t5,
        )
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                texts, None, None, device=torch.device("cpu"), do_classifier_free_guidance=False, max_sequence_length=t5_length
            )
        return embeds, pooled


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(str(tmp_path_factory.mktemp("sd3_tokenizers")))


def named(outputs) -> Sd3EncoderOutputs:
    return Sd3EncoderOutputs(*outputs)


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---------------------------------------------------------------------------------------------------------------------
# Tokens


def test_tokens_lengths_padding_and_masks(tiny):
    l_ids, g_ids, t5_ids, l_mask, g_mask, t5_mask = tiny.tokenize(CAPTIONS)
    assert l_ids.shape == g_ids.shape == l_mask.shape == g_mask.shape == (4, 77)
    assert t5_ids.shape == t5_mask.shape == (4, 256)  # t5xxl_max_token_length defaults to 256
    for i, text in enumerate(CAPTIONS):
        n = len(text.replace(" ", ""))  # the tiny CLIP tokenizer: one token per character
        assert l_mask[i].tolist() == [1] * (n + 2) + [0] * (75 - n)
        assert torch.equal(g_mask[i], l_mask[i])
        assert l_ids[i, 0] == BOS and l_ids[i, n + 1] == EOS and (l_ids[i, n + 2 :] == EOS).all()  # CLIP-L pads with EOS
        assert torch.equal(g_ids[i, : n + 2], l_ids[i, : n + 2]) and (g_ids[i, n + 2 :] == CLIP_G_PAD_TOKEN_ID).all()
        k = int(t5_mask[i].sum())
        assert t5_mask[i, :k].all() and not t5_mask[i, k:].any()
        assert t5_ids[i, k - 1] == T5_EOS and (t5_ids[i, k:] == T5_PAD).all()
    assert int(t5_mask[2].sum()) == 1  # the empty caption is <EOS> alone

    # CLIP-G pads with id 0 whatever its tokenizer's pad token (sd-scripts); the other ids are the tokenizer's own
    g_eos = tiny.tokenize(CAPTIONS, tok_g=tiny.tok_g_eos)[1]
    assert torch.equal(g_eos, g_ids)


def test_t5_length_and_truncation(tiny):
    long = " ".join(["red cat"] * 80)
    l_ids, _, t5_ids, l_mask, _, t5_mask = tiny.tokenize([long, "cat"], t5_length=16)
    assert t5_ids.shape == (2, 16) and t5_mask[0].all() and t5_ids[0, -1] == T5_EOS  # truncated, ends in <EOS>
    assert l_mask[0].all() and l_ids[0, -1] == EOS  # CLIP: 77 tokens, no chunking
    strategy = Sd3TokenizeStrategy(tiny.tok_l, tiny.tok_g, tiny.tok_t5, 16)
    settings = strategy.settings()
    assert settings["t5_max_length"] == 16 and settings["clip_max_length"] == 77 and settings["pad"][1] == 0
    assert Sd3TokenizeStrategy(tiny.tok_l, tiny.tok_g, tiny.tok_t5, 128).settings() != settings
    with pytest.raises(ValueError, match="weighted"):
        strategy.tokenize_with_weights(["a"])


# ---------------------------------------------------------------------------------------------------------------------
# Encoding against diffusers


def test_context_and_pooled_equal_diffusers(tiny):
    outputs = tiny.encode(CAPTIONS)
    o = named(outputs)
    assert len(outputs) == len(TE_OUTPUT_KEYS)
    assert o.l_out.shape == (4, 77, L_WIDTH) and o.g_out.shape == (4, 77, G_WIDTH) and o.t5_out.shape == (4, 256, 64)
    assert o.l_pooled.shape == (4, L_WIDTH) and o.g_pooled.shape == (4, G_WIDTH)
    context, pooled = join_encodings(outputs)
    assert context.shape == (4, 77 + 256, 64) and pooled.shape == (4, L_WIDTH + G_WIDTH)
    embeds, diffusers_pooled = tiny.diffusers(CAPTIONS)
    assert torch.equal(context, embeds) and torch.equal(pooled, diffusers_pooled)
    # the layout: [CLIP-L | CLIP-G | zeros] on the first 77 tokens, then T5
    assert torch.equal(context[:, :77, :L_WIDTH], o.l_out) and torch.equal(context[:, :77, L_WIDTH:56], o.g_out)
    assert (context[:, :77, 56:] == 0).all() and torch.equal(context[:, 77:], o.t5_out)
    # another T5 length (diffusers' max_sequence_length)
    context32, _ = join_encodings(tiny.encode(CAPTIONS, t5_length=32))
    assert context32.shape == (4, 77 + 32, 64) and torch.equal(context32, tiny.diffusers(CAPTIONS, t5_length=32)[0])


def test_penultimate_states_and_pooled_at_end_of_text(tiny):
    """l_out/g_out: hidden_states[-2] (no final norm); pooled: the final-normed state of the first <|endoftext|>
    through text_projection."""
    l_ids, g_ids, _, l_mask, _, _ = tiny.tokenize(CAPTIONS)
    o = named(tiny.encode(CAPTIONS))
    rows = torch.arange(len(CAPTIONS))
    eos_at = l_mask.sum(dim=1) - 1
    for clip, ids, out, pooled in ((tiny.clip_l, l_ids, o.l_out, o.l_pooled), (tiny.clip_g, g_ids, o.g_out, o.g_pooled)):
        assert (ids[rows, eos_at] == EOS).all()
        with torch.no_grad():
            res = clip.text_model(input_ids=ids, output_hidden_states=True)
            assert torch.equal(out, res.hidden_states[-2]) and not torch.equal(out, res.last_hidden_state)
            expected = clip.text_projection(res.last_hidden_state[rows, eos_at])
        torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)


def test_clip_g_pad_token_difference_from_diffusers(tiny):
    """A CLIP-G tokenizer that pads with <|endoftext|>: diffusers pads with it, kiln with id 0. CLIP is causal and
    pools at the first <|endoftext|>, so only the padded positions of CLIP-G's channels differ."""
    context, pooled = join_encodings(tiny.encode(CAPTIONS, tok_g=tiny.tok_g_eos))
    embeds, diffusers_pooled = tiny.diffusers(CAPTIONS, tok_g=tiny.tok_g_eos)
    pad = ~tiny.tokenize(CAPTIONS)[4].bool()  # (B, 77) CLIP-G padding
    assert torch.equal(pooled, diffusers_pooled)
    assert torch.equal(context[:, 77:], embeds[:, 77:]) and torch.equal(context[:, :77, :L_WIDTH], embeds[:, :77, :L_WIDTH])
    g, dg = context[:, :77, L_WIDTH:56], embeds[:, :77, L_WIDTH:56]
    assert torch.equal(g[~pad], dg[~pad]) and not torch.allclose(g[pad], dg[pad])
    # with the SD3 repositories' tokenizer_2 (pads with "!" = id 0) kiln and diffusers tokenize CLIP-G alike
    assert torch.equal(join_encodings(tiny.encode(CAPTIONS))[0], tiny.diffusers(CAPTIONS)[0])


def test_apply_lg_attn_mask(tiny):
    """The padding mask goes into CLIP-L/G's attention: the real tokens' states (and the pooled vector) are those
    without the mask, as if the padding were not there; the padded positions change and are not zeroed."""
    plain = named(tiny.encode(CAPTIONS))
    masked = named(tiny.encode(CAPTIONS, apply_lg_attn_mask=True))
    l_ids, g_ids, _, l_mask, g_mask, _ = tiny.tokenize(CAPTIONS)
    for ids, mask, clip, a, b in (
        (l_ids, l_mask, tiny.clip_l, plain.l_out, masked.l_out),
        (g_ids, g_mask, tiny.clip_g, plain.g_out, masked.g_out),
    ):
        real = mask.bool()
        torch.testing.assert_close(b[real], a[real], rtol=0, atol=1e-6)
        assert not torch.allclose(b[~real], a[~real]) and (b[~real].abs().sum(dim=-1) > 0).all()
        for i in range(len(CAPTIONS)):  # = encoding the unpadded tokens alone
            n = int(mask[i].sum())
            with torch.no_grad():
                alone = clip(input_ids=ids[i : i + 1, :n], output_hidden_states=True).hidden_states[-2][0]
            torch.testing.assert_close(b[i, :n], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked.l_pooled, plain.l_pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(masked.g_pooled, plain.g_pooled, rtol=0, atol=1e-6)
    assert torch.equal(masked.t5_out, plain.t5_out)
    assert torch.equal(masked.l_attn_mask, l_mask.float()) and torch.equal(masked.g_attn_mask, g_mask.float())
    assert Sd3TextEncodingStrategy(apply_lg_attn_mask=True).cache_identity() == {
        "apply_lg_attn_mask": True,
        "apply_t5_attn_mask": False,
    }


def test_apply_t5_attn_mask(tiny):
    """T5 attends both ways: with the mask its real tokens' states are those of the unpadded tokens alone, unlike
    diffusers' (no mask); padded positions are not zeroed."""
    plain = named(tiny.encode(CAPTIONS))
    masked = named(tiny.encode(CAPTIONS, apply_t5_attn_mask=True))
    _, _, t5_ids, _, _, t5_mask = tiny.tokenize(CAPTIONS)
    assert torch.equal(masked.l_out, plain.l_out) and torch.equal(masked.g_pooled, plain.g_pooled)
    for i in range(len(CAPTIONS)):
        n = int(t5_mask[i].sum())
        with torch.no_grad():
            alone = tiny.t5(input_ids=t5_ids[i : i + 1, :n]).last_hidden_state[0]
        torch.testing.assert_close(masked.t5_out[i, :n], alone, rtol=0, atol=1e-5)
        assert not torch.allclose(masked.t5_out[i, :n], plain.t5_out[i, :n])
    assert (masked.t5_out[~t5_mask.bool()].abs().sum(dim=-1) > 0).all()
    assert torch.equal(masked.t5_attn_mask, t5_mask.float())
    assert Sd3TextEncodingStrategy(apply_t5_attn_mask=True).cache_identity()["apply_t5_attn_mask"] is True


# ---------------------------------------------------------------------------------------------------------------------
# Per-encoder dropout


@pytest.mark.parametrize("encoder", [0, 1, 2])
def test_dropout_rate_one_zeroes_that_encoder(tiny, encoder):
    outputs = tiny.encode(CAPTIONS)
    before = [t.clone() for t in outputs]
    rates = [0.0, 0.0, 0.0]
    rates[encoder] = 1.0
    strategy = Sd3TextEncodingStrategy(clip_l_dropout_rate=rates[0], clip_g_dropout_rate=rates[1], t5_dropout_rate=rates[2])
    dropped = named(strategy.drop(outputs, generators(range(4))))
    o = named(outputs)
    zeroed = [("l_out", "l_pooled", "l_attn_mask"), ("g_out", "g_pooled", "g_attn_mask"), ("t5_out", "t5_attn_mask")][encoder]
    for name in TE_OUTPUT_KEYS:
        if name in zeroed:
            assert (getattr(dropped, name) == 0).all(), name
        else:
            assert getattr(dropped, name) is getattr(o, name), name
    assert all(torch.equal(a, b) for a, b in zip(outputs, before))  # the inputs (cached tensors) are not changed
    context, pooled = strategy.conditioning(outputs, generators(range(4)))
    full_context, full_pooled = join_encodings(outputs)
    where = [(slice(0, 77), slice(0, L_WIDTH)), (slice(0, 77), slice(L_WIDTH, 56)), (slice(77, None), slice(None))][encoder]
    assert (context[:, where[0], where[1]] == 0).all()
    keep = torch.ones_like(context, dtype=torch.bool)
    keep[:, where[0], where[1]] = False
    assert torch.equal(context[keep], full_context[keep])
    pooled_cols = [slice(0, L_WIDTH), slice(L_WIDTH, None), slice(0, 0)][encoder]
    assert (pooled[:, pooled_cols] == 0).all()
    keep_p = torch.ones(pooled.shape[1], dtype=torch.bool)
    keep_p[pooled_cols] = False
    assert torch.equal(pooled[:, keep_p], full_pooled[:, keep_p])


def test_dropout_rate_zero_changes_nothing_and_draws_nothing(tiny):
    outputs = tiny.encode(CAPTIONS)
    gens = generators(range(4))
    states = [g.get_state() for g in gens]
    strategy = Sd3TextEncodingStrategy()
    dropped = strategy.drop(outputs, gens)
    assert all(a is b for a, b in zip(dropped, outputs))
    context, pooled = strategy.conditioning(outputs, gens)
    expected = join_encodings(outputs)
    assert torch.equal(context, expected[0]) and torch.equal(pooled, expected[1])
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))  # the generators are untouched
    assert strategy.conditioning(outputs, None)[0].shape == context.shape  # no generator needed at rate 0


def test_dropout_draws_are_deterministic_per_sample():
    rates = (0.5, 0.3, 0.7)
    drops = draw_encoder_drops(64, rates, generators(range(64)))
    assert drops.shape == (64, 3) and drops.dtype == torch.bool
    assert torch.equal(drops, draw_encoder_drops(64, rates, generators(range(64))))
    assert not torch.equal(drops, draw_encoder_drops(64, rates, generators(range(100, 164))))
    assert all(0 < int(drops[:, e].sum()) < 64 for e in range(3))  # some dropped, some kept, per encoder
    # per sample: one draw per encoder with a rate above 0, in the order CLIP-L, CLIP-G, T5
    g = torch.Generator().manual_seed(5)
    draws = torch.rand(3, generator=g)
    assert draw_encoder_drops(1, rates, generators([5]))[0].tolist() == (draws < torch.tensor(rates)).tolist()
    only_t5 = draw_encoder_drops(1, (0.0, 0.0, 0.7), generators([5]))[0]
    assert only_t5.tolist() == [False, False, bool(draws[0] < 0.7)]
    # one generator for the whole batch: sample by sample
    single = draw_encoder_drops(4, rates, torch.Generator().manual_seed(9))
    seq = torch.rand(12, generator=torch.Generator().manual_seed(9)).reshape(4, 3)
    assert torch.equal(single, seq < torch.tensor(rates))
    # a sample's draws depend on its own generator only
    assert torch.equal(draw_encoder_drops(2, rates, generators([3, 7]))[1], draw_encoder_drops(1, rates, generators([7]))[0])
    assert draw_encoder_drops(3, (1.0, 1.0, 1.0), generators([1, 2, 3])).all()


def test_dropout_argument_errors(tiny):
    with pytest.raises(ValueError, match="between 0 and 1"):
        Sd3TextEncodingStrategy(t5_dropout_rate=1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        draw_encoder_drops(2, (0.1, 0.2), None)
    with pytest.raises(ValueError, match="Generator"):
        draw_encoder_drops(2, (0.1, 0.0, 0.0), None)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        draw_encoder_drops(2, (0.1, 0.0, 0.0), generators([1, 2, 3]))
    o = named(tiny.encode(["a"]))
    with pytest.raises(ValueError, match="exceeds T5's width"):
        join_encodings(o._replace(t5_out=o.t5_out[..., :40]))
    with pytest.raises(ValueError, match="weighted"):
        Sd3TextEncodingStrategy().encode_tokens_with_weights(tiny.models, [], [])


def test_dropout_on_cached_outputs_equals_dropout_when_encoding_live(tiny, tmp_path):
    """The text-encoder cache (on disk) stores the per-encoder outputs without dropout; dropout and joining on what it
    reads back give what encoding the same captions live gives, for the same per-sample generators."""
    captions = ["a red cat", "two dogs", "blue sky", "a tree, at night", "green"]
    folder = tmp_path / "images"
    for i, text in enumerate(captions):
        write_caption(write_image(folder / f"img{i}.png", (64, 64), color=(20 * i, 90, 40)), text)
    configs = config_util.resolve(
        config_util.validate_user_config(
            {"general": {"resolution": 64, "caption_extension": ".txt"}, "datasets": [{"subsets": [{"image_dir": str(folder)}]}]},
            config_util.build_schema(),
        ),
        None,
    )
    group = DatasetGroup(build_datasets(configs, 1), 1)
    tokenize = Sd3TokenizeStrategy(tiny.tok_l, tiny.tok_g, tiny.tok_t5, 32)
    strategy = Sd3TextEncodingStrategy(
        apply_lg_attn_mask=True, clip_l_dropout_rate=0.5, clip_g_dropout_rate=0.5, t5_dropout_rate=0.5
    )

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(zip(TE_OUTPUT_KEYS, strategy.encode_tokens(tiny.models, tokenize.tokenize(texts))))

    identity = {"tokens": tokenize.settings(), **strategy.cache_identity()}
    cache = TextEncoderOutputCache("sd3", encode, identity, cache_to_disk=True, batch_size=2)
    assert cache.fill(group, show_progress=False) == len(captions)
    infos = sorted(group.datasets[0].train, key=lambda info: info.path)
    rows = [cache.get(info) for info in infos]
    assert set(rows[0]) == set(TE_OUTPUT_KEYS) and rows[0]["l_out"].shape == (77, L_WIDTH)
    cached = [torch.stack([row[k] for row in rows]) for k in TE_OUTPUT_KEYS]

    seeds = [11, 12, 13, 14, 15]
    drops = draw_encoder_drops(len(seeds), strategy.dropout_rates, generators(seeds))
    assert drops.any() and not drops.all()  # the seeds drop some encoders of some samples, not all
    with torch.no_grad():
        live = strategy.encode_tokens(tiny.models, tokenize.tokenize([info.caption for info in infos]))
    for a, b in zip(cached, live):  # the cache encoded in batches of 2, this in one batch of 5: float rounding only
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    from_cache = strategy.conditioning(cached, generators(seeds))
    from_live = strategy.conditioning(live, generators(seeds))
    for a, b in zip(from_cache, from_live):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert torch.equal(a == 0, b == 0)  # the same encoders of the same samples dropped
    assert torch.equal(from_cache[0], join_encodings(drop_encoder_outputs(cached, drops))[0])
    # what was dropped is zero in both
    for i in range(len(seeds)):
        assert bool((from_cache[1][i, :L_WIDTH] == 0).all()) == bool(drops[i, 0])
        assert bool((from_cache[0][i, 77:] == 0).all()) == bool(drops[i, 2])
