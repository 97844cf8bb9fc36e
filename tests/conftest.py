"""Shared fixtures: the built-in demo model, built once per session into a temporary cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from winnow.models import build_demo_model


@pytest.fixture(scope="session", autouse=True)
def winnow_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point WINNOW_CACHE_DIR at a session temp dir so no test writes to ~/.cache/winnow."""
    root = tmp_path_factory.mktemp("winnow-cache")
    previous = os.environ.get("WINNOW_CACHE_DIR")
    os.environ["WINNOW_CACHE_DIR"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("WINNOW_CACHE_DIR", None)
    else:
        os.environ["WINNOW_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def demo_model_dir(winnow_cache_dir: Path) -> Path:
    """The `demo` model directory (what `load_model("demo")` loads during the session)."""
    return build_demo_model("demo")
