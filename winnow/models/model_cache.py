"""The cache of models Winnow builds itself (demo models, the converted default model).

Each build goes to a temporary sibling directory that is renamed into place when complete, so a
crashed or concurrent build never leaves a half-written model at the final path. Two processes
racing both build; the first rename wins and the other's copy is discarded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """`$WINNOW_CACHE_DIR`, else `~/.cache/winnow`."""
    return Path(os.environ.get("WINNOW_CACHE_DIR") or "~/.cache/winnow").expanduser()


def build_once(target: Path, marker: str, version: int, write: Callable[[Path], None]) -> Path:
    """Return `target`, first calling `write(staging_dir)` to build it unless a build of
    `version` is already there (`target/marker` holds the version of the build that wrote it)."""
    if is_built(target, marker, version):
        return target
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=root))
    try:
        write(staging)
        (staging / marker).write_text(f"{version}\n")
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        if is_built(target, marker, version):  # another process finished first
            return target
        if target.exists():  # a stale build from an older recipe
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=root))
            target.rename(stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            if not is_built(target, marker, version):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def is_built(path: Path, marker: str, version: int) -> bool:
    marker_file = path / marker
    return marker_file.is_file() and marker_file.read_text().strip() == str(version)
