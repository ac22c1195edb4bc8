"""IncrementalDetokenizer with a real byte-level BPE (trained here) that splits multi-byte
characters across tokens; the reference is the tokenizer's own full decode."""
from __future__ import annotations

from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.tokenizer import byte_tokenizer
from service.engine.detokenizer import IncrementalDetokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve façade, jalapeño piñata.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji time 😀🎉👍🏽 and flags 🇫🇷 with family 👨‍👩‍👧.",
    "Ünïcödé strings: ÅÆØ ßẞ Ωμέγα Привет мир",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>"]


class BPEAdapter:
    """The tokenizer interface the detokenizer relies on, over a `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self.eos_token_id = tok.token_to_id(SPECIALS[0])
        self.special_token_ids = [tok.token_to_id(s) for s in SPECIALS]
        self.vocab_size = tok.get_vocab_size()
        self.decode_lengths: list[int] = []  # ids per decode call, to check the window stays small

    def decode(self, ids, *, skip_special_tokens=False) -> str:
        self.decode_lengths.append(len(ids))
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids


@cache
def _trained() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return tok


def bpe() -> BPEAdapter:
    return BPEAdapter(_trained())


# any character but surrogates (not encodable) and U+FFFD itself (so a U+FFFD in the output can
# only come from a split character)
unicode_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=40)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.push([i]) for i in ids]


def test_tokenizer_splits_characters():
    tok = bpe()
    ids = tok.encode("".join(SENTENCES))
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test tokenizer must split characters"
    assert tok.decode(ids) == "".join(SENTENCES)


def test_sentences_stream_without_replacement_characters():
    tok = bpe()
    for sentence in SENTENCES:
        ids = tok.encode(sentence)
        detok = IncrementalDetokenizer(tok)
        pieces = stream(detok, ids)
        assert not any("\ufffd" in p for p in pieces)
        assert "".join(pieces) + detok.flush() == sentence == detok.text
        assert detok.output_ids == ids


@settings(max_examples=150, deadline=None, derandomize=True)
@given(unicode_text)
def test_random_text_streams_exactly_and_as_early_as_possible(text):
    tok = bpe()
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    emitted = ""
    for t, i in enumerate(ids, 1):
        piece = detok.push([i])
        assert "\ufffd" not in piece
        emitted += piece
        # everything complete is out; only the incomplete last character is held back
        assert emitted == tok.decode(ids[:t]).rstrip("\ufffd")
    assert emitted + detok.flush() == tok.decode(ids) == text


@settings(max_examples=60, deadline=None, derandomize=True)
@given(unicode_text)
def test_random_text_with_the_tiny_models_byte_tokenizer(text):
    tok = byte_tokenizer()  # one token per byte: every multi-byte character is split
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = stream(detok, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) + detok.flush() == tok.decode(ids, skip_special_tokens=True) == text


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 299), max_size=30), st.lists(st.integers(1, 4), min_size=1),
       st.booleans(), st.lists(st.integers(0, 299), max_size=8))
def test_arbitrary_ids_any_chunking_concatenate_to_full_decode(ids, chunk_sizes, skip, prompt):
    # arbitrary ids: invalid UTF-8, stray continuation bytes, special tokens, a prompt that ends
    # in the middle of a character
    tok = bpe()
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip)
    out, pos, k = [], 0, 0
    while pos < len(ids):
        n = chunk_sizes[k % len(chunk_sizes)]
        out.append(detok.push(ids[pos:pos + n]))
        pos, k = pos + n, k + 1
    out.append(detok.flush())
    assert "".join(out) == tok.decode(ids, skip_special_tokens=skip) == detok.text


def test_special_tokens_skipped_or_kept():
    tok = bpe()
    ids = tok.encode("Café") + [tok.eos_token_id] + tok.encode(" 東京")
    for skip, expected in [(True, "Café 東京"), (False, "Café<|endoftext|> 東京")]:
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        assert "".join(stream(detok, ids)) + detok.flush() == expected


def test_flush_releases_an_incomplete_character():
    tok = bpe()
    ids = tok.encode("ab😀")
    cut = next(t for t in range(len(ids), 0, -1) if tok.decode(ids[:t]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tok)
    assert "".join(stream(detok, ids[:cut])) == "ab"
    assert detok.flush() == tok.decode(ids[:cut])[2:]  # the held bytes, as U+FFFD
    assert detok.flush() == ""


def test_prompt_gives_context_but_is_not_emitted():
    tok = bpe()
    prompt, output = tok.encode("Привет "), tok.encode("мир 😀 naïve")
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(stream(detok, output)) + detok.flush() == "мир 😀 naïve"
    assert detok.output_ids == output


def test_decode_window_stays_small_on_long_streams():
    tok = bpe()
    ids = tok.encode(" ".join(SENTENCES) * 20)
    detok = IncrementalDetokenizer(tok, prompt_ids=ids[:50])
    tok.decode_lengths.clear()
    stream(detok, ids)
    # the window holds at most the tokens of the last incomplete character plus one settled
    # chunk: independent of the 1000+ tokens already decoded
    assert len(ids) > 1000
    assert max(tok.decode_lengths) <= 8
    assert sum(tok.decode_lengths) <= 8 * len(ids)


def test_prompt_context_keeps_the_leading_space_of_a_sentencepiece_style_tokenizer():
    # Metaspace (SentencePiece-style) decoding drops the leading space of a string, so the first
    # generated word needs the prompt as left context to keep its space.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["Hello world, hello there. The world is wide."] * 3,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False))
    adapter = BPEAdapter(tok)
    prompt, output = adapter.encode("Hello"), adapter.encode(" world is wide")
    detok = IncrementalDetokenizer(adapter, prompt_ids=prompt)
    streamed = "".join(stream(detok, output)) + detok.flush()
    full = adapter.decode(prompt + output)
    assert streamed == full[len(adapter.decode(prompt)):] == " world is wide"


def test_a_prompt_ending_inside_a_character_lends_no_bytes_to_the_output():
    tok = byte_tokenizer()  # id = 3 + byte
    prompt = [3 + 0x61, 3 + 0xE2]         # "a" and the first byte of a 3-byte character
    output = [3 + 0x80, 3 + 0xA2, 3 + 0x62]  # its other two bytes, then "b"
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    text = "".join(detok.push([t]) for t in output) + detok.flush()
    assert text == tok.decode(output, skip_special_tokens=True) == "\ufffd\ufffdb"
