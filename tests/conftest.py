"""Test-session settings: one torch thread, so timings do not depend on test order or load
(tiny models gain nothing from a second thread and lose a lot when cores are shared)."""

from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """For tests that train: one intra-op thread, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
