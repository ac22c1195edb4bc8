"""`auto` dtype per machine, and dtype names."""
from __future__ import annotations

import pytest
import torch

from model import dtypes


@pytest.mark.parametrize("capability,bf16,expected", [
    ("AVX512", True, "bfloat16"), ("AMX", True, "bfloat16"), ("AVX512", False, "float32"),
    ("AVX2", True, "float32"), ("DEFAULT", False, "float32"),
])
def test_auto_dtype_on_cpu(capability, bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(dtypes, "cpu_has_bf16", lambda: bf16)
    assert dtypes.auto_dtype("cpu") == expected


def test_auto_dtype_on_cuda_follows_bf16_support(monkeypatch):
    for supported, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert dtypes.auto_dtype("cuda") == expected


def test_parse_dtype_names_the_choices():
    assert dtypes.parse_dtype("bfloat16") is torch.bfloat16
    assert dtypes.parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        dtypes.parse_dtype("int8")
