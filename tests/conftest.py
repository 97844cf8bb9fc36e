"""Shared fixtures: the built-in demo model, built once per session into a temporary cache, and
the default model (SmolLM2-135M-Instruct), converted once per machine into the user's cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from winnow.models import build_demo_model
from winnow.models.default_model import default_model_dir
from winnow.models.model_cache import cache_root

# Read before `winnow_cache_dir` redirects WINNOW_CACHE_DIR: converting the default model takes
# a while, so tests reuse the conversion that `winnow serve` made or will make anyway.
USER_CACHE_ROOT = cache_root()


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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted default model's directory in the user's cache (converted on first use)."""
    return default_model_dir(USER_CACHE_ROOT)
