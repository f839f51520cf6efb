"""Test-session settings: one torch thread, so timings do not depend on test order or load
(tiny models gain nothing from a second thread and lose a lot when cores are shared)."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

torch.set_num_threads(1)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, restoring the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """For tests that train: one intra-op thread."""
    with torch_threads(1):
        yield


@pytest.fixture
def four_threads() -> Iterator[None]:
    """For tests of code that splits work between torch's threads."""
    with torch_threads(4):
        yield
