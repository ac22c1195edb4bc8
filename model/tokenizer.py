"""The tokenizer: a `tokenizers.Tokenizer` plus what serving needs around it.

Adds the special-token facts a checkpoint carries beside its vocabulary (BOS, EOS, every token
that ends generation), its chat template (rendered by `model.chat_template`), and token strings
for OpenAI-style logprobs. Built by the loaders (`model.gguf_loader`, `model.hf_loader`) or, for
the tiny test model, by `byte_tokenizer()`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any, Protocol

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from model.chat_template import render_chat_template, render_with_content_spans

# Token texts llama.cpp also treats as end of generation when a vocabulary has them as control
# tokens (its "EOG" set): a base model ends a document with these, a chat model a turn.
END_OF_GENERATION_TEXTS = frozenset({
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
    "<|end_of_text|>", "</s>",
})

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece byte fallback


class Tokenizer(Protocol):
    """What the engine, the API and offline generation need of a tokenizer (the one interface they
    type against); `HFTokenizer` below is the implementation every loader returns."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_token_ids(self) -> frozenset[int]: ...
    @property
    def special_token_ids(self) -> frozenset[int]: ...
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str: ...
    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]: ...
    def token_bytes(self, ids: Iterable[int]) -> list[bytes]: ...
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                            **variables: Any) -> str: ...
    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, **variables: Any) -> list[int]: ...


# Inputs at least this long go through the tokenizers library's batch entry points: those release
# the GIL while they work, the single-input ones were measured holding it for the whole call inside
# the server (6 s for 4 MiB of text), stalling its event loop although the call ran on another thread.
LONG_INPUT = 4096


def _encode(backend: BackendTokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) < LONG_INPUT:
        return backend.encode(text, add_special_tokens=add_special_tokens).ids
    return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def _cut_after(text: str, final: str) -> str:
    """`text` up to the end of the last occurrence of `final` (all of it when `final` is empty)."""
    end = text.rfind(final) if final else -1
    return text[:end + len(final)] if end >= 0 else text


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {char: b for b, char in bytes_to_unicode().items()}


def _is_byte_level(backend: BackendTokenizer) -> bool:
    if backend.decoder is None:
        return False
    decoder = json.loads(backend.decoder.__getstate__())  # the decoder alone, not the whole vocabulary
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


class HFTokenizer:
    """Encode, decode and chat-format text for one checkpoint.

    `special_tokens` maps template variable names (`bos_token`, `eos_token`, `unk_token`,
    `pad_token`) to token strings; `eos_token` is required. `extra_eos_token_ids` are further
    tokens that end generation (e.g. from generation_config.json).
    """

    __slots__ = ("backend", "_special_tokens", "_chat_template", "_eos_token_ids", "_special_ids",
                 "_byte_level", "_added", "_special_text", "_data_backend")

    def __init__(self, backend: BackendTokenizer, *, special_tokens: Mapping[str, str],
                 chat_template: str | None = None, extra_eos_token_ids: Iterable[int] = ()):
        self.backend = backend
        if "eos_token" not in special_tokens:
            raise ValueError("a tokenizer needs an eos_token")
        for name, text in special_tokens.items():
            if backend.token_to_id(text) is None:
                raise ValueError(f"{name}={text!r} is not in the vocabulary")
        self._special_tokens = dict(special_tokens)
        self._chat_template = chat_template
        self._added = {token_id: tok.content for token_id, tok in backend.get_added_tokens_decoder().items()}
        self._special_ids = frozenset(token_id for token_id, tok in backend.get_added_tokens_decoder().items()
                                      if tok.special)
        vocab_size = self.vocab_size
        for token_id in extra_eos_token_ids:
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"eos token id {token_id} is out of range: must be in [0, {vocab_size})")
        eog = {token_id for token_id in self._special_ids if self._added[token_id] in END_OF_GENERATION_TEXTS}
        self._eos_token_ids = frozenset({self.eos_token_id, *extra_eos_token_ids, *eog})
        self._byte_level = _is_byte_level(backend)
        specials = sorted((self._added[i] for i in self._special_ids), key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._data_backend: BackendTokenizer | None = None  # a copy that reads control tokens as text

    # -- facts ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        bos = self._special_tokens.get("bos_token")
        return None if bos is None else self.backend.token_to_id(bos)

    @property
    def eos_token_id(self) -> int:
        token_id = self.backend.token_to_id(self._special_tokens["eos_token"])
        if token_id is None:  # __init__ checked every special token: unreachable
            raise ValueError("eos_token is not in the vocabulary")
        return token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every token that ends generation: EOS, generation_config's, and end-of-turn/text controls."""
        return self._eos_token_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the special (control) tokens: what `skip_special_tokens` drops."""
        return self._special_ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """Template variable name -> token string (`bos_token`, `eos_token`, ...)."""
        return dict(self._special_tokens)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def with_chat_template(self, template: str) -> HFTokenizer:
        """The same tokenizer with another chat template (`kvserve serve --chat-template FILE`)."""
        return HFTokenizer(self.backend, special_tokens=self._special_tokens, chat_template=template,
                           extra_eos_token_ids=self._eos_token_ids)

    # -- text <-> ids --------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the checkpoint adds (e.g. a BOS)."""
        return _encode(self.backend, text, add_special_tokens)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if len(ids) < LONG_INPUT:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.backend.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]  # see _encode

    def token_bytes(self, ids: Iterable[int]) -> list[bytes]:
        """The raw bytes each token stands for (OpenAI logprobs' `bytes` field)."""
        out = []
        for token_id in ids:
            token = self.backend.id_to_token(token_id)
            if token is None:
                raise ValueError(f"token id {token_id} is out of range: must be in [0, {self.vocab_size})")
            out.append(self._bytes_of(token_id, token))
        return out

    def _bytes_of(self, token_id: int, token: str) -> bytes:
        if token_id in self._added:
            return token.encode("utf-8")
        if self._byte_level:
            table = _unicode_to_byte()
            if all(char in table for char in token):
                return bytes(table[char] for char in token)
            return token.encode("utf-8")
        if match := _BYTE_TOKEN.match(token):
            return bytes([int(match.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")  # sentencepiece's word-start marker

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Readable token strings as OpenAI logprobs show them: the token's text, or, for a token
        that is only part of a UTF-8 character, its bytes written `bytes:\\xe2\\x80`."""
        out = []
        for raw in self.token_bytes(ids):
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("bytes:" + "".join(f"\\x{b:02x}" for b in raw))
        return out

    # -- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """The prompt text for `messages` (encode it with add_special_tokens=False)."""
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template; send a plain prompt instead")
        return render_chat_template(self._chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self._special_tokens, **variables)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, **variables: Any) -> list[int]:
        """Token ids of the chat prompt for `messages`, with message content kept as data: only the
        template's own markers become control tokens. A user who writes `<|im_end|>` in a message
        gets the tokens of that text, never the control token (which would let them forge a turn).

        When no content spells a control token (the usual case) this is exactly
        `encode(apply_chat_template(...), add_special_tokens=False)`, as transformers tokenizes it.
        Otherwise the control tokens are found in the rendered text as usual, those inside a
        message's content are dropped from the split, and the text between the remaining ones is
        encoded with control-token parsing off, so the tokens around a content boundary merge
        exactly as they would in the plain case.

        `continue_final_message`: the text ends right after the last message's content (no end of
        turn), so the model continues that message.
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **variables)
        contents = [m.get("content") for m in messages if isinstance(m, Mapping)]
        final = str(contents[-1] or "") if continue_final_message and contents else ""
        if self._special_text is None or not any(isinstance(c, str) and self._special_text.search(c) for c in contents):
            return self.encode(_cut_after(text, final), add_special_tokens=False)
        text, spans = render_with_content_spans(self._chat_template or "", messages,
                                                add_generation_prompt=add_generation_prompt,
                                                special_tokens=self._special_tokens, **variables)
        text = _cut_after(text, final)
        markers = [(start, end, token_id) for token_id, (start, end) in
                   zip(*self._ids_and_offsets(text)) if token_id in self._special_ids
                   and not any(start < b and a < end for a, b in spans)]
        data = self._data()
        ids: list[int] = []
        done = 0
        for start, end, token_id in markers:
            ids += _encode(data, text[done:start], False)
            ids.append(token_id)
            done = end
        return ids + _encode(data, text[done:], False)

    def _ids_and_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.backend.encode_batch([text], add_special_tokens=False)[0]
        return encoding.ids, encoding.offsets

    def _data(self) -> BackendTokenizer:
        """The backend's twin that encodes control-token text as plain text (a copy, so the shared
        backend's setting never changes under a concurrent encode)."""
        if self._data_backend is None:
            twin = BackendTokenizer.from_str(self.backend.to_str())
            twin.encode_special_tokens = True
            self._data_backend = twin
        return self._data_backend


def bos_eos_post_processor(bos: str | None, bos_id: int | None, eos: str | None = None,
                           eos_id: int | None = None) -> processors.TemplateProcessing:
    """A post-processor adding BOS and/or EOS, as transformers builds it from add_bos/add_eos_token."""
    single = " ".join(p for p in (f"{bos}:0" if bos else "", "$A:0", f"{eos}:0" if eos else "") if p)
    pair = single + " " + " ".join(p for p in (f"{bos}:1" if bos else "", "$B:1", f"{eos}:1" if eos else "") if p)
    specials = [(text, token_id) for text, token_id in ((bos, bos_id), (eos, eos_id)) if text]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: Iterable[str],
                   pre_tokenizer: pre_tokenizers.PreTokenizer | None = None) -> BackendTokenizer:
    """A byte-level BPE backend (GPT-2 family): vocabulary spelled in `bytes_to_unicode` characters."""
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(text, normalized=False, special=True) for text in special_tokens])
    return backend


def byte_tokenizer() -> HFTokenizer:
    """The tiny model's tokenizer: 3 specials then one token per byte (id = 3 + byte), no merges.

    Ids: 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>` (EOS); vocab 259 like PRESETS["tiny"].
    """
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {text: i for i, text in enumerate(specials)}
    vocab.update({char: len(specials) + b for b, char in bytes_to_unicode().items()})
    backend = byte_level_bpe(vocab, [], specials)
    backend.post_processor = bos_eos_post_processor(None, None)
    return HFTokenizer(backend, special_tokens={"eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"},
                     chat_template=CHATML_TEMPLATE)
