"""Held-out evaluation of a conversion on two kinds of text it never trained on.

- docs: Python's documentation topics (`pydoc_data.topics`, every key in sorted order), the text
  `kvserve bench variants` measures; the training text (standard-library docstrings) is in the same
  domain, so this figure alone would flatter a conversion.
- prose: plain English prose that is not documentation: Isaac Newton's *Opticks* (4th edition,
  1730; public domain, Project Gutenberg's transcription), which libbacktrace keeps as test data and
  the `apache-tvm-ffi` wheel (a kvserve dependency) ships as
  `tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt`. It is found with
  `importlib.util.find_spec` (nothing imported), read from its first advertisement (the
  transcribers' header skipped) with the `_italics_` marks removed. Absent, the prose row is left out.

Perplexity is exp(mean next-token NLL) of the first `n_tokens` tokens, in non-overlapping windows
of `WINDOW` tokens (each window's first token is context only).
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

WINDOW = 512
_PROSE_FILE = Path("3rdparty", "libbacktrace", "Isaac.Newton-Opticks.txt")
_PROSE_START = "SIR ISAAC NEWTON'S ADVERTISEMENTS"


def docs_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def prose_path() -> Path | None:
    spec = importlib.util.find_spec("tvm_ffi")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _PROSE_FILE
    return path if path.is_file() else None


def prose_text() -> str | None:
    path = prose_path()
    if path is None:
        return None
    text = path.read_text(encoding="utf-8")
    return text[max(0, text.find(_PROSE_START)):].replace("_", "")


def heldout_texts() -> dict[str, str]:
    """{kind: text} for each held-out text present on this machine."""
    texts = {"docs": docs_text()}
    if (prose := prose_text()) is not None:
        texts["prose"] = prose
    return texts


def first_tokens(tokenizer, text: str, n_tokens: int) -> list[int]:
    """The first `n_tokens` tokens of `text` (encoding only as much of it as needed)."""
    chars = 8 * n_tokens
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if len(ids) > n_tokens or chars >= len(text):
            return ids[:n_tokens]
        chars *= 2


@torch.no_grad()
def perplexity(model, ids: list[int], window: int = WINDOW) -> float:
    """exp(mean NLL) of every token of `ids` after the first of its window, windows of `window` tokens."""
    window = min(window, model.config.max_seq_len)
    total, count = 0.0, 0
    for begin in range(0, len(ids) - 1, window):
        x = torch.tensor(ids[begin:begin + window], device=model.device)
        if len(x) < 2:
            break
        logp = torch.log_softmax(model(x[None])[0, :-1].float(), dim=-1)  # (T-1, V)
        total -= float(logp.gather(1, x[1:, None]).double().sum())
        count += len(x) - 1
    return math.exp(total / count)
