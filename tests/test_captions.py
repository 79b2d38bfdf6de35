"""Caption pipeline (reference §3.2) and the A1111 weighted-caption parser."""

from __future__ import annotations

import dataclasses
import random

import pytest

from library.captions import (
    CaptionOptions,
    expand_wildcards,
    parse_weighted_caption,
    process_caption,
    warmup_token_count,
)


def tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",")] if caption else []


def run_many(caption, opts, n=200, **kw):
    return [process_caption(caption, opts, random.Random(seed), **kw) for seed in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# 1. prefix/suffix and whole-caption dropout


def test_prefix_and_suffix_joined_with_space():
    cap = "a dog, running"
    assert process_caption(cap, CaptionOptions(caption_prefix="photo of"), random.Random(0)) == "photo of a dog, running"
    assert process_caption(cap, CaptionOptions(caption_suffix="high res"), random.Random(0)) == "a dog, running high res"
    opts = CaptionOptions(caption_prefix="sks", caption_suffix="end")
    assert process_caption(cap, opts, random.Random(0)) == "sks a dog, running end"


def test_default_options_leave_caption_unchanged():
    cap = "a,b,  c , d"  # no pipeline step active: not re-split or re-joined
    assert process_caption(cap, CaptionOptions(), random.Random(0)) == cap


def test_caption_dropout_rate_one_drops_everything():
    opts = CaptionOptions(caption_dropout_rate=1.0, caption_prefix="p", shuffle_caption=True)
    assert all(out == "" for out in run_many("a, b, c", opts, n=50))


def test_caption_dropout_rate_zero_keeps_caption():
    opts = CaptionOptions(caption_dropout_rate=0.0)
    assert all(out == "a, b, c" for out in run_many("a, b, c", opts, n=50))


def test_caption_dropout_rate_half_drops_some():
    outs = run_many("a, b, c", CaptionOptions(caption_dropout_rate=0.5), n=200)
    n_dropped = outs.count("")
    assert 50 < n_dropped < 150
    assert set(outs) == {"", "a, b, c"}


def test_caption_dropout_every_n_epochs():
    opts = CaptionOptions(caption_dropout_every_n_epochs=2)
    for epoch in (1, 3, 5):
        assert process_caption("a, b", opts, random.Random(0), epoch=epoch) == "a, b"
    for epoch in (2, 4, 6):
        assert process_caption("a, b", opts, random.Random(0), epoch=epoch) == ""
    # default epoch is 1: not dropped
    assert process_caption("a, b", opts, random.Random(0)) == "a, b"


# ---------------------------------------------------------------------------------------------------------------------
# 2. Wildcards


def test_wildcard_choice_is_one_of_options_and_covers_all():
    opts = CaptionOptions(enable_wildcard=True)
    outs = run_many("a {red|green|blue} car", opts, n=200)
    assert set(outs) == {"a red car", "a green car", "a blue car"}


def test_multiple_wildcards_each_expanded():
    outs = {expand_wildcards("{a|b} x {c|d}", random.Random(s)) for s in range(200)}
    assert outs == {"a x c", "a x d", "b x c", "b x d"}


def test_wildcard_not_expanded_without_enable_wildcard():
    assert process_caption("a {red|green} car", CaptionOptions(), random.Random(0)) == "a {red|green} car"


def test_lone_escaped_braces_are_literal():
    assert expand_wildcards("a {{ b", random.Random(0)) == "a { b"
    assert expand_wildcards("a }} b", random.Random(0)) == "a } b"


def test_double_braces_escape_to_literal_braces():
    assert expand_wildcards("{{x}}", random.Random(0)) == "{x}"
    assert expand_wildcards("{{a|b}} {c}", random.Random(0)) == "{a|b} c"
    opts = CaptionOptions(enable_wildcard=True)
    assert process_caption("style {{x}}, {y}", opts, random.Random(0)) == "style {x}, y"


def test_multiline_caption_random_line_with_wildcard():
    cap = "line one\nline two\nline three"
    outs = run_many(cap, CaptionOptions(enable_wildcard=True), n=200)
    assert set(outs) == {"line one", "line two", "line three"}


def test_multiline_caption_first_line_without_wildcard():
    cap = "line one\nline two\nline three"
    assert set(run_many(cap, CaptionOptions(), n=20)) == {"line one"}
    assert set(run_many(cap, CaptionOptions(shuffle_caption=True), n=20)) == {"line one"}


# ---------------------------------------------------------------------------------------------------------------------
# 3. keep_tokens, keep_tokens_separator, shuffle, tag dropout, secondary separator


def test_keep_tokens_fixed_under_shuffle():
    cap = "a, b, c, d, e, f"
    outs = run_many(cap, CaptionOptions(shuffle_caption=True, keep_tokens=2), n=100)
    for out in outs:
        t = tags(out)
        assert t[:2] == ["a", "b"]
        assert sorted(t[2:]) == ["c", "d", "e", "f"]
    assert len({tuple(tags(o)[2:]) for o in outs}) > 5  # it does shuffle


def test_shuffle_is_permutation_and_varies():
    cap = "a, b, c, d, e"
    outs = run_many(cap, CaptionOptions(shuffle_caption=True), n=200)
    assert all(sorted(tags(o)) == ["a", "b", "c", "d", "e"] for o in outs)
    assert all(", ".join(tags(o)) == o for o in outs)  # re-joined with ", "
    firsts = {tags(o)[0] for o in outs}
    assert firsts == {"a", "b", "c", "d", "e"}


def test_shuffle_with_custom_separator_rejoins_with_comma_space():
    outs = run_many("a; b; c", CaptionOptions(shuffle_caption=True, caption_separator=";"), n=50)
    assert all(sorted(o.split(", ")) == ["a", "b", "c"] for o in outs)


def test_keep_tokens_separator_prefix_middle_suffix():
    cap = "a, b ||| c, d, e, f ||| g, h"
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    outs = run_many(cap, opts, n=100)
    for out in outs:
        assert "|||" not in out
        t = tags(out)
        assert t[:2] == ["a", "b"]
        assert t[-2:] == ["g", "h"]
        assert sorted(t[2:-2]) == ["c", "d", "e", "f"]
    assert len({out for out in outs}) > 5


def test_keep_tokens_separator_only_prefix():
    cap = "a ||| b, c, d"
    outs = run_many(cap, CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||"), n=50)
    for out in outs:
        assert "|||" not in out
        t = tags(out)
        assert t[0] == "a" and sorted(t[1:]) == ["b", "c", "d"]


def test_keep_tokens_separator_overrides_keep_tokens():
    cap = "a ||| b, c, d"
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=3)
    outs = run_many(cap, opts, n=100)
    assert {tags(o)[0] for o in outs} == {"a"}
    assert {tags(o)[1] for o in outs} == {"b", "c", "d"}


def test_keep_tokens_separator_stripped_without_shuffle():
    opts = CaptionOptions(keep_tokens_separator="|||")
    assert process_caption("a, b ||| c, d ||| e", opts, random.Random(0)) == "a, b, c, d, e"
    assert process_caption("a ||| c", opts, random.Random(0)) == "a, c"
    # separator absent: caption untouched
    assert process_caption("a,b,  c", opts, random.Random(0)) == "a,b,  c"


def test_tag_dropout_one_drops_all_flexible_keeps_fixed():
    opts = CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert set(run_many("a, b, c, d", opts, n=20)) == {"a"}
    opts = CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens_separator="|||", shuffle_caption=True)
    assert set(run_many("a, b ||| c, d ||| e", opts, n=20)) == {"a, b, e"}
    opts = CaptionOptions(caption_tag_dropout_rate=1.0)
    assert set(run_many("a, b, c", opts, n=20)) == {""}


def test_tag_dropout_zero_point_five_drops_some_tags():
    opts = CaptionOptions(caption_tag_dropout_rate=0.5)
    outs = run_many("a, b, c, d, e, f, g, h", opts, n=100)
    lengths = [len(tags(o)) for o in outs]
    assert min(lengths) < 8 and max(lengths) > 0
    for o in outs:  # order kept without shuffle
        t = tags(o)
        assert t == sorted(t)


def test_secondary_separator_keeps_unit_together():
    cap = "a;;;b, c, d, e"
    opts = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    outs = run_many(cap, opts, n=200)
    positions = set()
    for out in outs:
        assert ";;;" not in out
        units = out.split(", ")
        assert sorted(units) == ["a,b", "c", "d", "e"]
        positions.add(units.index("a,b"))
    assert positions == {0, 1, 2, 3}


def test_secondary_separator_dropped_as_a_unit():
    opts = CaptionOptions(caption_tag_dropout_rate=0.5, secondary_separator=";;;")
    outs = run_many("a;;;b, c, d", opts, n=200)
    for out in outs:
        assert ("a,b" in out) == ("a" in out) == ("b" in out)
    assert any("a,b" in o for o in outs) and any("a" not in o for o in outs)


def test_secondary_separator_without_shuffle_uses_caption_separator():
    opts = CaptionOptions(secondary_separator=";;;", caption_separator="|")
    assert process_caption("a;;;b|c", opts, random.Random(0)) == "a|b|c"


# ---------------------------------------------------------------------------------------------------------------------
# 4. Token warm-up


NINE = ", ".join(f"t{i}" for i in range(9))


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 1),  # floor(0 * 8/10) + 1
        (1, 1),  # floor(0.8) + 1
        (2, 2),  # floor(1.6) + 1
        (5, 5),  # floor(5 * 8 / 10) + 1 = 4 + 1
        (9, 8),  # floor(7.2) + 1
        (10, 9),
        (11, 9),
        (1000, 9),
    ],
)
def test_token_warmup_counts(step, expected):
    opts = CaptionOptions(token_warmup_min=1, token_warmup_step=10)
    assert warmup_token_count(9, opts, step, 0) == expected
    out = process_caption(NINE, opts, random.Random(0), step=step)
    assert tags(out) == [f"t{i}" for i in range(expected)]


def test_token_warmup_min_three():
    opts = CaptionOptions(token_warmup_min=3, token_warmup_step=10)
    assert warmup_token_count(9, opts, 0, 0) == 3
    assert warmup_token_count(9, opts, 5, 0) == 6  # floor(5 * 6 / 10) + 3
    assert warmup_token_count(9, opts, 10, 0) == 9


def test_token_warmup_counts_only_flexible_tags():
    opts = CaptionOptions(token_warmup_min=1, token_warmup_step=10, keep_tokens=2)
    # 2 fixed + 7 flexible: at step 0 one flexible tag
    assert tags(process_caption(NINE, opts, random.Random(0), step=0)) == ["t0", "t1", "t2"]
    # step 5: floor(5 * 6 / 10) + 1 = 4 flexible
    assert tags(process_caption(NINE, opts, random.Random(0), step=5)) == ["t0", "t1", "t2", "t3", "t4", "t5"]


def test_token_warmup_with_shuffle_picks_first_tags_then_shuffles():
    opts = CaptionOptions(token_warmup_min=1, token_warmup_step=10, shuffle_caption=True)
    for seed in range(30):
        out = process_caption(NINE, opts, random.Random(seed), step=5)
        assert sorted(tags(out)) == ["t0", "t1", "t2", "t3", "t4"]


def test_token_warmup_fractional_step_is_fraction_of_max_train_steps():
    frac = CaptionOptions(token_warmup_min=1, token_warmup_step=0.5)
    whole = CaptionOptions(token_warmup_min=1, token_warmup_step=10)
    for step in range(0, 25):
        assert warmup_token_count(9, frac, step, 20) == warmup_token_count(9, whole, step, 0)
        assert process_caption(NINE, frac, random.Random(0), step=step, max_train_steps=20) == process_caption(
            NINE, whole, random.Random(0), step=step
        )


def test_token_warmup_off_keeps_all():
    assert warmup_token_count(9, CaptionOptions(), 0, 100) == 9


# ---------------------------------------------------------------------------------------------------------------------
# 5. Determinism and is_random


RICH = CaptionOptions(
    caption_prefix="sks",
    caption_dropout_rate=0.1,
    caption_tag_dropout_rate=0.2,
    enable_wildcard=True,
    shuffle_caption=True,
    keep_tokens=1,
    secondary_separator=";;;",
    token_warmup_step=5,
)
RICH_CAPTION = "dog, {red|blue} collar, grass, x;;;y, sky, tree\ncat, {big|small}, sofa, lamp"


def test_same_seed_same_output():
    for seed in range(30):
        a = process_caption(RICH_CAPTION, RICH, random.Random(seed), epoch=3, step=3, max_train_steps=100)
        random.seed(seed + 1234)  # the global random state must not matter
        b = process_caption(RICH_CAPTION, RICH, random.Random(seed), epoch=3, step=3, max_train_steps=100)
        assert a == b


def test_different_seeds_vary():
    outs = {process_caption(RICH_CAPTION, RICH, random.Random(s), step=10) for s in range(50)}
    assert len(outs) > 10


def test_rng_stream_is_consumed_deterministically():
    rng1, rng2 = random.Random(7), random.Random(7)
    seq1 = [process_caption(RICH_CAPTION, RICH, rng1, step=10) for _ in range(10)]
    seq2 = [process_caption(RICH_CAPTION, RICH, rng2, step=10) for _ in range(10)]
    assert seq1 == seq2


def test_is_random():
    assert not CaptionOptions().is_random()
    assert not CaptionOptions(caption_prefix="a", caption_suffix="b", keep_tokens=2).is_random()
    assert not CaptionOptions(keep_tokens_separator="|||", secondary_separator=";;;").is_random()
    assert not CaptionOptions(token_warmup_min=3).is_random()
    for change in [
        {"caption_dropout_rate": 0.1},
        {"caption_dropout_every_n_epochs": 3},
        {"caption_tag_dropout_rate": 0.1},
        {"shuffle_caption": True},
        {"token_warmup_step": 10},
        {"token_warmup_step": 0.5},
        {"enable_wildcard": True},
    ]:
        assert dataclasses.replace(CaptionOptions(), **change).is_random(), change


def test_non_random_options_do_not_consume_rng():
    rng = random.Random(3)
    state = rng.getstate()
    process_caption("a, b ||| c\nd", CaptionOptions(caption_prefix="p", keep_tokens_separator="|||"), rng)
    assert rng.getstate() == state


# ---------------------------------------------------------------------------------------------------------------------
# 6. parse_weighted_caption


def assert_weighted(got, expected):
    assert [t for t, _ in got] == [t for t, _ in expected], got
    assert [w for _, w in got] == pytest.approx([w for _, w in expected]), got


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a (b) c", [("a ", 1.0), ("b", 1.1), (" c", 1.0)]),
        ("[b]", [("b", 1 / 1.1)]),
        ("a [b] c", [("a ", 1.0), ("b", 1 / 1.1), (" c", 1.0)]),
        ("(b:1.5)", [("b", 1.5)]),
        ("a (b: 0.5 ) c", [("a ", 1.0), ("b", 0.5), (" c", 1.0)]),
        ("(b:.5)", [("b", 0.5)]),
        ("((b))", [("b", 1.21)]),
        ("[[b]]", [("b", 1 / 1.21)]),
        ("(a (b:2))", [("a ", 1.1), ("b", 2.2)]),
        ("((a:2) b)", [("a", 2.2), (" b", 1.1)]),
        ("([b])", [("b", 1.0)]),
        (r"\(b\)", [("(b)", 1.0)]),
        (r"a \[b\] c", [("a [b] c", 1.0)]),
        (r"(\(b\))", [("(b)", 1.1)]),
        (r"a\\b", [("a\\b", 1.0)]),
        ("(b", [("b", 1.1)]),
        ("a (b c", [("a ", 1.0), ("b c", 1.1)]),
        ("a [b c", [("a ", 1.0), ("b c", 1 / 1.1)]),
        ("a) b]", [("a) b]", 1.0)]),
        ("plain text, with commas", [("plain text, with commas", 1.0)]),
        ("a:b", [("a:b", 1.0)]),
        ("(a:b)", [("a:b", 1.1)]),
        ("x:1.5) y", [("x:1.5) y", 1.0)]),
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
        # neighbouring equal weights are merged
        ("(a)(b)", [("ab", 1.1)]),
        ("(a:1.1)(b)", [("ab", 1.1)]),
        ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
        ("a (b:1) c", [("a b c", 1.0)]),
    ],
)
def test_parse_weighted_caption(text, expected):
    assert_weighted(parse_weighted_caption(text), expected)


def test_parse_weighted_caption_returns_tuples_covering_text():
    text = "masterpiece, (best quality:1.2), [blurry], ((sharp)), a \\(parenthesised\\) word"
    got = parse_weighted_caption(text)
    assert all(isinstance(p, tuple) and len(p) == 2 for p in got)
    assert "".join(t for t, _ in got) == "masterpiece, best quality, blurry, sharp, a (parenthesised) word"
    for a, b in zip(got, got[1:]):
        assert a[1] != pytest.approx(b[1])
