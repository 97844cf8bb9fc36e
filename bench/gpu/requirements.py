"""Print what bench/gpu_check.sh installs besides torch, one requirement per line: Winnow's
dependencies from pyproject.toml and the part of the test extra the GPU tests import (the
linters, fuzzers and framework clients stay out).

Plain text parsing rather than tomllib, so that it runs on the Python 3.10 a bare host may have.
"""

from __future__ import annotations

import re
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
TEST_EXTRA = ("pytest", "httpx", "openai", "hypothesis", "triton", "accelerate")


def _array(text: str, key: str) -> list[str]:
    """The quoted strings of the TOML array `key = [...]` (comments skipped)."""
    match = re.search(rf"^{key} = \[(.*?)^\]", text, re.M | re.S)
    assert match, f"no {key} array in pyproject.toml"
    lines = [line.split("#")[0] for line in match.group(1).splitlines()]
    return re.findall(r'"([^"]+)"', "\n".join(lines))


def requirements() -> list[str]:
    text = PYPROJECT.read_text()
    wanted = [r for r in _array(text, "dependencies") if not r.startswith("torch")]
    for requirement in _array(text, "test"):
        if re.split(r"[<>=!~ ]", requirement)[0] in TEST_EXTRA:
            wanted.append(requirement)
    return wanted


if __name__ == "__main__":
    print("\n".join(requirements()))
