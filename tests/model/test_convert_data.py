"""Training text of `kvserve convert`: which docstrings are read, and how sequences are split and ordered."""
from __future__ import annotations

import torch

from model.convert.data import TrainingText, stdlib_docstrings


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
