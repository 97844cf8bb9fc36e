"""Fixtures for the models room's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """The test models are tiny: one intra-op thread is faster than two, and it keeps the
    timings sane when other processes compete for the cores (OpenMP barriers then stall)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
