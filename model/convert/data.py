"""Training text for `kvserve convert`: the docstrings of the Python standard library.

Every Python ships them, so a conversion needs no download. They are read from the source files
with `ast` (nothing is imported), in sorted path order, de-duplicated, and joined by blank lines.
`pydoc_data` (the evaluation text of `kvserve bench variants`) and the test suites are left out.
The token stream is cut into fixed-length sequences; a fixed slice of them (the same whatever the
training seed) is held out to measure the distillation loss on text it never trained on.
"""
from __future__ import annotations

import ast
import sysconfig
import warnings
from pathlib import Path

import torch
from torch import Tensor

# Directories of the standard library whose text is not documentation prose, or is the held-out
# evaluation text (pydoc_data).
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data",
                           "__pycache__", "lib2to3"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if not EXCLUDED_DIRS.intersection(parts[:-1]):
            files.append(path)
    return files


def _docstrings(source: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules
        tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
    return [doc for node in nodes if (doc := ast.get_docstring(node, clean=True))]


def stdlib_docstrings(root: Path | None = None) -> list[str]:
    """Every distinct module, class and function docstring of the standard library, in file order."""
    seen: dict[str, None] = {}
    for path in _source_files(root or stdlib_root()):
        try:
            docs = _docstrings(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this Python cannot parse contributes nothing
        seen.update(dict.fromkeys(docs))
    return list(seen)


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The texts tokenized one by one (no special tokens), each followed by a blank line, concatenated."""
    encodings = tokenizer.backend.encode_batch([text + "\n\n" for text in texts], add_special_tokens=False)
    return [token for encoding in encodings for token in encoding.ids]


class TrainingText:
    """A token stream cut into `seq_len`-token sequences, split into a training and a held-out set.

    The held-out set is the first `n_val` sequences of a permutation fixed by `split_seed`, so it
    does not move with the training seed. `batch(step, size, seed)` is the training batch of a
    step: epochs walk the training set in an order drawn from (seed, epoch), so a step's batch
    depends on nothing but its arguments and a resumed run sees exactly what an uninterrupted one
    would have.
    """

    def __init__(self, tokens: list[int], seq_len: int, n_val: int, split_seed: int = 0):
        n = len(tokens) // seq_len
        if n < n_val + 1:
            raise ValueError(f"{len(tokens)} tokens make {n} sequences of {seq_len}: need more than {n_val} "
                             f"(the held-out ones); use a shorter --seq-len")
        sequences = torch.tensor(tokens[:n * seq_len]).view(n, seq_len)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
        self.val = sequences[order[:n_val]]  # (n_val, seq_len)
        self.train = sequences[order[n_val:]]  # (n_train, seq_len)
        self.seq_len = seq_len

    @property
    def train_tokens(self) -> int:
        return self.train.numel()

    def batch(self, step: int, size: int, seed: int) -> Tensor:
        """(size, seq_len) token ids for training step `step` (0-based)."""
        n = len(self.train)
        rows = []
        for position in range(step * size, (step + 1) * size):
            epoch, index = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            rows.append(int(order[index]))
        return self.train[rows]
