"""SD 1.x/2.x tokenizing and text encoding: CLIP's long-prompt chunks (<BOS> 75 tokens <EOS> padding, 1-3 chunks),
weighted captions, clip_skip, and the re-joining of chunk encodings (first <BOS>, 75 tokens per chunk, last <EOS>).

The tiny tokenizer has one token per character ("ab cd" -> a, b</w>, c, d</w>), so expected ids are built by hand.
"""

from __future__ import annotations

import pytest
import torch

from library.strategy_base import apply_token_weights, clip_chunk_ids, clip_ids_and_weights, join_clip_chunks
from library.strategy_sd import SdTextEncodingStrategy, SdTokenizeStrategy, clip_hidden_states
from library.tiny_models import build_tiny_sd

BOS, EOS = 512, 513
PAD = {False: EOS, True: 0}  # SD1 pads with <|endoftext|>, SD2 with "!" (id 0)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def char_id(c: str) -> int:
    return ord(c) - ord("!")  # printable ASCII comes first in the byte table, from "!"


def text_ids(text: str) -> list[int]:
    """Ids of lower-case words separated by spaces: one token per letter, the last letter of a word ends in </w>."""
    ids = []
    for word in text.split():
        ids += [char_id(c) for c in word[:-1]] + [char_id(word[-1]) + 256]
    return ids


def text_of(n_tokens: int, offset: int = 0) -> str:
    """A caption of exactly n_tokens tokens, made of 4-letter words with varying letters."""
    words, left, i = [], n_tokens, offset
    while left > 0:
        length = min(4, left)
        words.append("".join(LETTERS[(i + k) % 26] for k in range(length)))
        left -= length
        i += 1
    return " ".join(words)


def chunk(body: list[int], v2: bool) -> list[int]:
    return [BOS] + body + [EOS] + [PAD[v2]] * (75 - len(body))


def expected_chunks(ids: list[int], n_chunks: int, v2: bool) -> list[list[int]]:
    return [chunk(ids[75 * c : 75 * (c + 1)], v2) for c in range(n_chunks)]


def sd_scripts_ids(tokenizer, text: str, max_token_length: int | None) -> torch.Tensor:
    """sd-scripts' _get_input_ids (reference section 2): pad/truncate to max_token_length + 2, then cut into 77-chunks
    <BOS> 75 <last token>; for pad != eos a chunk ending in a text token ends in <EOS>, and <BOS> <PAD> becomes
    <BOS> <EOS>."""
    max_length = (max_token_length or 75) + 2
    ids = tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt").input_ids[0]
    if max_length == 77:
        return ids[None]
    chunks = []
    for i in range(1, max_length - 77 + 2, 75):
        c = torch.cat([ids[:1], ids[i : i + 75], ids[-1:]])
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            if c[-2] != tokenizer.eos_token_id and c[-2] != tokenizer.pad_token_id:
                c[-1] = tokenizer.eos_token_id
            if c[1] == tokenizer.pad_token_id:
                c[1] = tokenizer.eos_token_id
        chunks.append(c)
    return torch.stack(chunks)


@pytest.fixture(scope="module")
def models():
    sd1, sd2 = build_tiny_sd(False), build_tiny_sd(True)
    for parts in (sd1, sd2):
        parts["text_encoder"].eval().requires_grad_(False)
    return {False: sd1, True: sd2}


@pytest.fixture(scope="module", params=[False, True], ids=["sd1", "sd2"])
def v2(request):
    return request.param


@pytest.fixture(scope="module")
def tok(models, v2):
    return models[v2]["tokenizer"]


# ---------------------------------------------------------------------------------------------------------------------
# tokenizing


def test_character_tokenizer(tok, v2):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == (BOS, EOS, PAD[v2], 77)
    for text in ["ab cd", "red cat", text_of(37), "Red  Cat"]:
        assert tok(text, add_special_tokens=False).input_ids == text_ids(text.lower())
    assert text_ids("ab cd") == [64, 321, 66, 323]
    assert all(len(text_ids(text_of(n))) == n for n in (0, 1, 3, 4, 5, 75, 151))


@pytest.mark.parametrize("max_token_length, n_chunks", [(None, 1), (75, 1), (150, 2), (225, 3)])
def test_tokenize_shapes(tok, max_token_length, n_chunks):
    (ids,) = SdTokenizeStrategy(tok, max_token_length).tokenize(["a", text_of(100), text_of(300)])
    assert ids.shape == (3, n_chunks, 77) and ids.dtype == torch.long


def test_short_caption(tok, v2):
    (ids,) = SdTokenizeStrategy(tok).tokenize(["ab cd", ""])
    assert ids[0, 0].tolist() == [BOS, 64, 321, 66, 323, EOS] + [PAD[v2]] * 71
    assert ids[1, 0].tolist() == [BOS, EOS] + [PAD[v2]] * 75


@pytest.mark.parametrize("n_tokens", [0, 1, 74, 75, 76, 149, 150, 151, 224, 225, 260])
@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_chunks_by_hand(tok, v2, n_tokens, max_token_length):
    text = text_of(n_tokens)
    n_chunks = (max_token_length or 75) // 75
    (ids,) = SdTokenizeStrategy(tok, max_token_length).tokenize([text])
    expected = expected_chunks(text_ids(text), n_chunks, v2)
    assert ids[0].tolist() == expected
    # every chunk: <BOS> first, <EOS> right after its tokens, padding after that
    for c, row in enumerate(ids[0].tolist()):
        n_body = min(75, max(0, n_tokens - 75 * c))
        assert row[0] == BOS and row[1 + n_body] == EOS and len(row) == 77
        assert row[2 + n_body :] == [PAD[v2]] * (75 - n_body)


@pytest.mark.parametrize("n_tokens", [0, 1, 74, 75, 76, 150, 151, 225, 300])
@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_chunks_match_sd_scripts(tok, n_tokens, max_token_length):
    text = text_of(n_tokens, offset=3)
    (ids,) = SdTokenizeStrategy(tok, max_token_length).tokenize([text])
    assert torch.equal(ids[0], sd_scripts_ids(tok, text, max_token_length))


def test_long_caption_is_cut(tok, v2):
    head = text_of(148)  # 37 words of 4 letters
    a = head + " xy zzzz"
    b = head + " xy abc de"
    assert text_ids(a)[:150] == text_ids(b)[:150] and text_ids(a) != text_ids(b)
    strategy = SdTokenizeStrategy(tok, 150)
    ids_a, ids_b = strategy.tokenize([a, b])[0]
    assert torch.equal(ids_a, ids_b)
    assert ids_a[1].tolist() == [BOS] + text_ids(a)[75:150] + [EOS]  # a full last chunk: 75 tokens then <EOS>
    # at 75 tokens the same text is cut after its 75th token
    (short,) = SdTokenizeStrategy(tok).tokenize([a])
    assert short[0, 0].tolist() == [BOS] + text_ids(a)[:75] + [EOS]


def test_empty_chunks(tok, v2):
    (ids,) = SdTokenizeStrategy(tok, 225).tokenize([text_of(10)])
    assert ids[0, 0].tolist() == chunk(text_ids(text_of(10)), v2)
    for c in (1, 2):  # SD1: <BOS> <EOS> <EOS>...; SD2: <BOS> <EOS> then pad ids 0
        assert ids[0, c].tolist() == [BOS, EOS] + [PAD[v2]] * 75


def test_batch_rows_are_independent(tok):
    texts = ["ab cd", text_of(160), "", text_of(80, offset=5)]
    strategy = SdTokenizeStrategy(tok, 225)
    (batch,) = strategy.tokenize(texts)
    for i, text in enumerate(texts):
        assert torch.equal(batch[i], strategy.tokenize([text])[0][0])
        assert torch.equal(batch[i], clip_chunk_ids(tok, text_ids(text), 225))


def test_clip_chunk_ids_direct(tok, v2):
    ids = list(range(100, 260))  # 160 ids
    out = clip_chunk_ids(tok, ids, 150)
    assert out.tolist() == [chunk(ids[:75], v2), chunk(ids[75:150], v2)]
    assert clip_chunk_ids(tok, [], 75).tolist() == [chunk([], v2)]
    assert clip_chunk_ids(tok, ids, 10).shape == (1, 77)  # at least one chunk


def test_tokenize_does_not_parse_weights(tok):
    (plain,) = SdTokenizeStrategy(tok).tokenize(["(red:1.5) cat"])
    assert plain[0, 0, 1:6].tolist() != text_ids("red cat")[:5]
    assert tok("(red:1.5) cat", add_special_tokens=False).input_ids == plain[0, 0, 1:13].tolist()


@pytest.mark.parametrize(
    "caption, plain, weights",
    [
        ("(red:1.5) cat", "red cat", [1.5] * 3 + [1.0] * 3),
        ("a (red:1.5) cat", "a red cat", [1.0] + [1.5] * 3 + [1.0] * 3),
        ("((big)) dog", "big dog", [1.1 * 1.1] * 3 + [1.0] * 3),
        ("[small] (cat)", "small cat", [1 / 1.1] * 5 + [1.1] * 3),
        ("(red cat:0.5), dog", None, None),
        ("no weights here", "no weights here", [1.0] * 13),
    ],
)
def test_tokenize_with_weights(tok, v2, caption, plain, weights):
    strategy = SdTokenizeStrategy(tok)
    (ids,), (w,) = strategy.tokenize_with_weights([caption])
    assert ids.shape == w.shape == (1, 1, 77) and w.dtype == torch.float32
    if plain is None:  # "(red cat:0.5), dog": red, cat at 0.5; ",", dog at 1
        assert ids[0, 0, 1:7].tolist() == text_ids("red cat")
        assert torch.allclose(w[0, 0, 1:7], torch.tensor(0.5))
        assert torch.all(w[0, 0, 7:] == 1)
        return
    assert torch.equal(ids, strategy.tokenize([plain])[0])
    n = len(weights)
    assert torch.allclose(w[0, 0, 1 : 1 + n], torch.tensor(weights), atol=1e-6)
    # <BOS>, <EOS> and padding have weight 1
    assert w[0, 0, 0] == 1 and torch.all(w[0, 0, 1 + n :] == 1)


def test_weights_of_long_caption(tok, v2):
    # 100 plain tokens, then "(zz:1.3)" -> tokens 100, 101 (chunk 2, slots 26, 27), then 20 more tokens
    caption = text_of(100) + " (zz:1.3) " + text_of(20, offset=9)
    strategy = SdTokenizeStrategy(tok, 150)
    (ids,), (w,) = strategy.tokenize_with_weights([caption])
    plain_ids = text_ids(text_of(100) + " zz " + text_of(20, offset=9))
    assert ids[0].tolist() == expected_chunks(plain_ids, 2, v2)
    expected = torch.ones(2, 77)
    expected[1, 26:28] = 1.3
    assert torch.allclose(w[0], expected)
    # cut text: weights beyond the limit are dropped with their tokens
    (ids,), (w,) = SdTokenizeStrategy(tok, 75).tokenize_with_weights([caption])
    assert ids[0].tolist() == expected_chunks(plain_ids, 1, v2) and torch.all(w == 1)


def test_clip_ids_and_weights_unweighted(tok):
    ids, w = clip_ids_and_weights(tok, "(red:1.5) cat", 75, weighted=False)
    assert torch.all(w == 1) and ids.shape == (1, 77)


def test_settings(tok):
    s = SdTokenizeStrategy(tok, 150).settings()
    assert s["max_length"] == 150 and s["vocab"] == 514
    assert SdTokenizeStrategy(tok).settings()["max_length"] == 75


# ---------------------------------------------------------------------------------------------------------------------
# encoding


def encode_chunk(te, ids: torch.Tensor, clip_skip=None) -> torch.Tensor:
    """(77,) ids -> (77, D) states, independently of the strategy."""
    with torch.no_grad():
        if clip_skip is None:
            return te(ids[None]).last_hidden_state[0]
        out = te(ids[None], output_hidden_states=True)
        return te.final_layer_norm(out.hidden_states[-clip_skip])[0]


@pytest.fixture(scope="module")
def te(models, v2):
    return models[v2]["text_encoder"]


def test_clip_skip_none(tok, te):
    (ids,) = SdTokenizeStrategy(tok).tokenize(["ab cd", text_of(50)])
    with torch.no_grad():
        (hidden,) = SdTextEncodingStrategy(None).encode_tokens([te], [ids])
        expected = te(ids[:, 0]).last_hidden_state
    assert hidden.shape == (2, 77, 64)
    assert torch.equal(hidden, expected)
    with torch.no_grad():
        (h1,) = SdTextEncodingStrategy(1).encode_tokens([te], [ids])
        out = te(ids[:, 0], output_hidden_states=True)
    assert torch.equal(h1, expected)
    # clip_skip 1 is the last layer, normed: the same as last_hidden_state
    assert torch.allclose(te.final_layer_norm(out.hidden_states[-1]), expected, atol=1e-5)


@pytest.mark.parametrize("clip_skip", [2, 3])
def test_clip_skip(tok, te, clip_skip):
    (ids,) = SdTokenizeStrategy(tok).tokenize(["ab cd", text_of(50)])
    with torch.no_grad():
        (hidden,) = SdTextEncodingStrategy(clip_skip).encode_tokens([te], [ids])
        out = te(ids[:, 0], output_hidden_states=True)
        expected = te.final_layer_norm(out.hidden_states[-clip_skip])
        assert len(out.hidden_states) == te.config.num_hidden_layers + 1
    assert torch.allclose(hidden, expected, atol=1e-6)
    assert not torch.allclose(hidden, out.last_hidden_state, atol=1e-3)
    assert torch.allclose(clip_hidden_states(te, ids[:, 0], clip_skip), expected, atol=1e-6)


@pytest.mark.parametrize("clip_skip", [None, 2])
@pytest.mark.parametrize("max_token_length, n_chunks", [(150, 2), (225, 3)])
def test_chunked_encoding_is_rejoined(tok, te, clip_skip, max_token_length, n_chunks):
    texts = [text_of(100), "ab cd", text_of(200, offset=7)]
    (ids,) = SdTokenizeStrategy(tok, max_token_length).tokenize(texts)
    with torch.no_grad():
        (hidden,) = SdTextEncodingStrategy(clip_skip).encode_tokens([te], [ids])
    assert hidden.shape == (3, 75 * n_chunks + 2, 64)
    for b in range(3):
        per_chunk = [encode_chunk(te, ids[b, c], clip_skip) for c in range(n_chunks)]
        expected = torch.cat([per_chunk[0][:1]] + [p[1:76] for p in per_chunk] + [per_chunk[-1][76:]])
        assert torch.allclose(hidden[b], expected, atol=1e-5), b
        # explicitly: first <BOS> from chunk 0, tokens 1..75 of chunk c at 1 + 75c, last slot of the last chunk
        assert torch.allclose(hidden[b, 0], per_chunk[0][0], atol=1e-5)
        assert torch.allclose(hidden[b, 76:151], per_chunk[1][1:76], atol=1e-5)
        assert torch.allclose(hidden[b, -1], per_chunk[-1][76], atol=1e-5)


def test_weighted_encoding_one_chunk(tok, te):
    strategy = SdTokenizeStrategy(tok)
    (ids,), (w,) = strategy.tokenize_with_weights(["(red:1.5) cat", "((big)) dog"])
    encoder = SdTextEncodingStrategy(None)
    with torch.no_grad():
        (plain,) = encoder.encode_tokens([te], [ids])
        (weighted,) = encoder.encode_tokens_with_weights([te], [ids], [w])
    assert weighted.shape == plain.shape == (2, 77, 64)
    assert torch.allclose(weighted[0, 1:4], plain[0, 1:4] * 1.5, atol=1e-6)
    assert torch.allclose(weighted[1, 1:4], plain[1, 1:4] * 1.21, atol=1e-5)
    assert torch.equal(weighted[:, 0], plain[:, 0]) and torch.equal(weighted[:, 4:], plain[:, 4:])


def test_weighted_encoding_two_chunks(tok, te):
    caption = text_of(100) + " (zz:1.3) " + text_of(20, offset=9)
    strategy = SdTokenizeStrategy(tok, 150)
    (ids,), (w,) = strategy.tokenize_with_weights([caption, "(ab:0.5) cd"])
    encoder = SdTextEncodingStrategy(2)
    with torch.no_grad():
        (plain,) = encoder.encode_tokens([te], [ids])
        (weighted,) = encoder.encode_tokens_with_weights([te], [ids], [w])
    assert weighted.shape == (2, 152, 64)
    factor = torch.ones(2, 152)
    factor[0, 75 + 26 : 75 + 28] = 1.3  # chunk 2 slots 26, 27 -> joined positions 101, 102 (= token index + 1)
    factor[1, 1:3] = 0.5
    assert torch.allclose(weighted, plain * factor[..., None], atol=1e-6)
    # random weights: each token's state times its weight, in join_clip_chunks' layout
    g = torch.Generator().manual_seed(0)
    w = torch.rand(2, 2, 77, generator=g) + 0.5
    with torch.no_grad():
        (weighted,) = encoder.encode_tokens_with_weights([te], [ids], [w])
    joined = torch.cat([w[:, 0, :1], w[:, 0, 1:76], w[:, 1, 1:76], w[:, 1, 76:]], dim=1)
    assert torch.allclose(weighted, plain * joined[..., None], atol=1e-6)


def test_join_clip_chunks_layout():
    b, n, d = 2, 3, 2
    hidden = torch.zeros(b * n, 77, d)
    for i in range(b):
        for c in range(n):
            hidden[i * n + c, :, 0] = torch.arange(77) + 100 * c + 1000 * i  # (sample, chunk, slot) code
            hidden[i * n + c, :, 1] = -1
    joined = join_clip_chunks(hidden, n)
    assert joined.shape == (b, 75 * n + 2, d)
    for i in range(b):
        codes = joined[i, :, 0].long().tolist()
        expected = [1000 * i] + [1000 * i + 100 * c + s for c in range(n) for s in range(1, 76)] + [1000 * i + 100 * (n - 1) + 76]
        assert codes == expected
    assert torch.equal(join_clip_chunks(hidden[:2], 1), hidden[:2])


def test_apply_token_weights_layout():
    weights = torch.arange(2 * 2 * 77, dtype=torch.float32).reshape(2, 2, 77)
    hidden = torch.ones(2, 152, 3)
    out = apply_token_weights(hidden, weights)
    joined = torch.cat([weights[:, 0, :1], weights[:, 0, 1:76], weights[:, 1, 1:76], weights[:, 1, 76:]], dim=1)
    assert torch.equal(out, joined[..., None].expand(2, 152, 3))
    one = apply_token_weights(torch.ones(2, 77, 3), weights[:, :1])
    assert torch.equal(one, weights[:, 0, :, None].expand(2, 77, 3))
