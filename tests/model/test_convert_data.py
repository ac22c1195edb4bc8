"""Text of `kvserve convert`: which docstrings it trains on, how sequences are split and ordered,
and the held-out texts (docs, prose) with their perplexity."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import PRESETS
from model.convert.data import TrainingText, stdlib_docstrings
from model.convert.heldout import docs_text, first_tokens, heldout_texts, perplexity, prose_text
from model.tokenizer import byte_tokenizer
from model.transformer import random_transformer


def test_docstrings_skip_the_evaluation_text_tests_and_packages(tmp_path):
    files = {
        "alpha.py": '"""Alpha module."""\ndef f():\n    """Eff."""\nclass C:\n    """Cee."""\n    def m(self):\n        """Alpha module."""\n',
        "pydoc_data/topics.py": '"""Held-out evaluation text."""\ntopics = {}\n',
        "test/test_alpha.py": '"""A test suite."""\n',
        "site-packages/pkg/__init__.py": '"""An installed package."""\n',
        "email/broken.py": 'def (:\n    """Never parsed."""\n',
        "email/parser.py": '"""Parse email."""\n',
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    # sorted file order, each file's module docstring first, duplicates kept once
    assert stdlib_docstrings(tmp_path) == ["Alpha module.", "Eff.", "Cee.", "Parse email."]


def test_split_is_fixed_and_batches_are_a_function_of_seed_and_step():
    tokens = list(range(50 * 8))  # 50 distinct sequences of 8 tokens
    data = TrainingText(tokens, 8, n_val=5)
    again = TrainingText(tokens, 8, n_val=5)
    assert torch.equal(data.val, again.val) and data.val.shape == (5, 8) and data.train.shape == (45, 8)
    starts = lambda rows: {int(r[0]) for r in rows}  # noqa: E731
    assert not starts(data.val) & starts(data.train)
    # one epoch of batches of 5 visits each training sequence once; the next epoch reorders them
    epoch = [data.batch(step, 5, seed=3) for step in range(9)]
    assert sorted(int(r[0]) for b in epoch for r in b) == sorted(starts(data.train))
    assert torch.equal(data.batch(4, 5, seed=3), again.batch(4, 5, seed=3))
    assert not torch.equal(data.batch(4, 5, seed=3), data.batch(4, 5, seed=4))
    assert not torch.equal(torch.cat(epoch), torch.cat([data.batch(s, 5, seed=3) for s in range(9, 18)]))


def test_heldout_texts_are_python_docs_and_english_prose_that_is_not_documentation():
    texts = heldout_texts()
    assert texts["docs"] == docs_text() and "statement" in texts["docs"]
    prose = prose_text()
    assert prose is not None and texts["prose"] == prose  # apache-tvm-ffi, a dependency, ships it
    assert prose.startswith("SIR ISAAC NEWTON'S ADVERTISEMENTS") and "_" not in prose
    assert "Refractions" in prose[:5000] and "def " not in prose and ">>>" not in prose
    ids = first_tokens(byte_tokenizer(), prose, 700)
    assert len(ids) == 700 and prose.startswith(byte_tokenizer().decode(ids))


def test_perplexity_scores_every_token_after_its_windows_first():
    model = random_transformer(PRESETS["tiny"], seed=1)
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (1100,), generator=torch.Generator().manual_seed(0)).tolist()
    nll, count = 0.0, 0
    for window in (ids[0:512], ids[512:1024], ids[1024:1100]):  # each window predicts its tokens 1..end
        x = torch.tensor(window)
        with torch.no_grad():
            logits = model(x[None])[0]
        nll += float(F.cross_entropy(logits[:-1], x[1:], reduction="sum"))
        count += len(window) - 1
    assert perplexity(model, ids, window=512) == pytest.approx(math.exp(nll / count), rel=1e-5)
