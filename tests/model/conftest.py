"""Fixtures of the model tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def threads():
    """Set torch's thread count inside a test; put it back after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
