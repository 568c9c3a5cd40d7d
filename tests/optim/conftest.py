"""Optimizer tests run single-threaded.

Their tensors are tiny, so a second OpenMP thread buys nothing, and on a loaded 2-core machine the
threads spin-wait on each other (measured here: the same 20-step test took 0.8 s with one thread and 27 s
with two while other jobs ran). The previous thread count is restored after each test.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
