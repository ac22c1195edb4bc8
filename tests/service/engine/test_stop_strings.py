"""StopStringMatcher against a from-the-definition reference on every prefix of the stream, alone
and behind the IncrementalDetokenizer with a byte-level BPE that splits characters."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_detokenizer import bpe  # the trained byte-level BPE (merges split multi-byte characters)

from model.tokenizer import byte_tokenizer
from service.engine.detokenizer import IncrementalDetokenizer
from service.engine.stop_strings import StopStringMatcher


def reference(chunks: list[str], stops: tuple[str, ...]) -> tuple[list[str], str, bool]:
    """What must have been shown after each chunk, the final text, and whether a stop matched.

    Works on the whole text so far at every step: it stops at the first chunk after which some
    stop string occurs, cutting before the earliest occurrence; before that, everything is shown
    except the suffix starting at the first position p where text[p:] could still grow into a
    stop string.
    """
    shown: list[str] = []
    text = ""
    for chunk in chunks:
        text += chunk
        starts = [text.find(s) for s in stops if s in text]
        if starts:
            return shown, text[:min(starts)], True
        pending = next((p for p in range(len(text)) if any(s.startswith(text[p:]) for s in stops)), len(text))
        shown.append(text[:pending])
    return shown, text, False


def run(matcher: StopStringMatcher, chunks: list[str]) -> tuple[list[str], str, bool]:
    """Feed chunks until a match; returns the shown text after each non-final push, final text, matched."""
    shown, total = [], ""
    for chunk in chunks:
        out, matched = matcher.push(chunk)
        total += out
        if matched:
            return shown, total, True
        shown.append(total)
    return shown, total + matcher.flush(), False


def test_stop_split_across_pushes_is_cut_and_never_shown():
    m = StopStringMatcher(("world",))
    assert m.push("Hello wo") == ("Hello ", False)
    assert m.push("rl") == ("", False)
    assert m.push("d! more") == ("", True)
    assert m.matched == "world" and m.finished
    assert m.push("later") == ("", True) and m.flush() == ""


def test_false_start_is_released_when_ruled_out():
    m = StopStringMatcher(("abc",))
    assert m.push("xab") == ("x", False)
    assert m.push("ab") == ("ab", False)   # "abab": the first "ab" can no longer start "abc"
    assert m.push("d") == ("abd", False)
    assert m.push("a") == ("", False)
    assert m.flush() == "a" and m.flush() == ""
    assert not m.finished


def test_earliest_starting_stop_wins_whatever_the_order():
    for stops in [("world", "o w"), ("o w", "world")]:
        m = StopStringMatcher(stops)
        assert m.push("Hello world") == ("Hell", True)
        assert m.matched == "o w"


def test_first_completed_stop_ends_the_stream():
    # "c" completes before "abcd" could: generation stops there
    m = StopStringMatcher(("abcd", "c"))
    assert [m.push(ch) for ch in "abc"] == [("", False), ("", False), ("ab", True)]


def test_no_stop_strings_pass_text_through_and_empty_ones_are_refused():
    m = StopStringMatcher(())
    assert m.push("anything") == ("anything", False) and m.flush() == ""
    with pytest.raises(ValueError, match="must not be empty"):
        StopStringMatcher(("ok", ""))


ALPHABET = "ab é東😀"
small_text = st.text(ALPHABET, max_size=30)
stop_sets = st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3).map(tuple)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(small_text, stop_sets, st.lists(st.integers(0, 5), min_size=1).filter(any))
def test_matches_reference_on_every_prefix_for_any_chunking(text, stops, sizes):
    # chunk sizes cycle; a 0 is an empty push
    chunks, pos, k = [], 0, 0
    while pos < len(text):
        chunks.append(text[pos:pos + sizes[k % len(sizes)]])
        pos, k = pos + sizes[k % len(sizes)], k + 1
    assert run(StopStringMatcher(stops), chunks) == reference(chunks, stops)


WORDS = ["Café", " crème", " brûlée", " 東京", "は", " 😀", "👍🏽", " the", " fox", "."]
words = st.lists(st.sampled_from(WORDS), max_size=12).map("".join)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(words, st.data())
def test_through_the_detokenizer_with_split_characters(text, data):
    # a stop string taken from the text itself (so it matches, often across a split character)
    # or from the alphabet (so it often does not)
    if text and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(text) - 1))
        stop = text[i:i + data.draw(st.integers(1, 4))]
    else:
        stop = data.draw(st.text("é東😀 .", min_size=1, max_size=3))
    tok = bpe()
    ids = tok.encode(text)
    detok, matcher = IncrementalDetokenizer(tok), StopStringMatcher((stop,))
    pieces, shown, total, matched = [], [], "", False
    for token_id in ids:
        piece = detok.push([token_id])
        pieces.append(piece)
        out, matched = matcher.push(piece)
        total += out
        if matched:
            break
        shown.append(total)
    if not matched:
        out, matched = matcher.push(detok.flush())
        total += out if matched else out + matcher.flush()
    # one stop string: the first completed occurrence is the first occurrence
    assert total == (text[:text.find(stop)] if stop in text else text)
    assert matched == (stop in text)
    # every intermediate state agrees with the reference on the detokenizer's own text stream
    assert shown == reference(pieces, (stop,))[0][:len(shown)]


def test_with_the_tiny_models_byte_tokenizer():
    tok = byte_tokenizer()  # one token per byte: every multi-byte character is split
    text = "naïve 東京 stop😀here and more"
    detok, matcher = IncrementalDetokenizer(tok), StopStringMatcher(("😀h", "zzz"))
    total = ""
    for token_id in tok.encode(text, add_special_tokens=False):
        out, matched = matcher.push(detok.push([token_id]))
        total += out
        if matched:
            break
    assert matched and total == "naïve 東京 stop"


def test_a_push_costs_its_text_not_the_number_of_stop_strings():
    # 50,000 stop strings: scanning each per push (as before) took ~40 ms a push, ~20 s here;
    # walking the automaton takes microseconds. The bound is 1,000x what this needs.
    import random
    import time

    rng = random.Random(0)
    stops = tuple("".join(rng.choice("abcdefgh") for _ in range(8)) + "!" for _ in range(50_000))
    matcher = StopStringMatcher(stops)
    text = "".join(rng.choice("abcdefgh") for _ in range(500))
    started = time.perf_counter()
    shown = "".join(matcher.push(ch)[0] for ch in text)
    elapsed = time.perf_counter() - started
    assert not matcher.finished and shown + matcher.flush() == text
    assert elapsed < 2.0, f"500 one-character pushes took {elapsed:.2f}s with 50,000 stop strings"
    out, matched = matcher.push(stops[123])  # and it still matches one of them
    assert matched and matcher.matched == stops[123]
