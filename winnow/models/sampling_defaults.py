"""A model's own sampling defaults, from its `generation_config.json` (vLLM's
`--generation-config auto`): what a request that leaves a field out gets instead of OpenAI's
default."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# The generation_config.json keys vLLM reads, under the request fields they stand in for.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_sampling_defaults(source: str, model_dir: Path) -> dict[str, float]:
    """`source` "vllm": none; "auto": the model directory's file; else a directory holding one."""
    if source == "vllm":
        return {}
    folder = model_dir if source == "auto" else Path(source).expanduser()
    path = folder / "generation_config.json"
    if not path.is_file():
        if source == "auto":
            return {}
        raise FileNotFoundError(f"--generation-config {source}: no generation_config.json there")
    config = json.loads(path.read_text())
    defaults = {
        key: config[key]
        for key in SAMPLING_KEYS
        if isinstance(config.get(key), int | float) and not isinstance(config[key], bool)
    }
    if defaults:
        logger.info("sampling defaults from %s: %s", path, defaults)
    return defaults
