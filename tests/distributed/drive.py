"""Drive a loaded model (whole or one rank's slice) through prefill and paged decode steps,
the way rank 0 and the workers do: flat step inputs through `run_step`."""

from __future__ import annotations

import random

import numpy as np
import torch

from winnow.distributed.step_input import flat_step, run_step
from winnow.models import LoadedModel, allocate_kv_cache

BLOCK_SIZE = 4


def prefill_then_decode(
    loaded: LoadedModel, prompts: list[list[int]], decode_steps: int
) -> list[torch.Tensor]:
    """Logits of every step: one prefill of all prompts (every prompt token sampled, so the
    whole prefill is compared), then `decode_steps` steps feeding each sequence a fixed
    token. Block tables come from a shuffled free list, so they are not contiguous."""
    model = loaded.model
    caches = allocate_kv_cache(model.layer_config, 64, BLOCK_SIZE, loaded.dtype, "cpu")
    free = list(range(1, 64))
    random.Random(0).shuffle(free)
    tables: list[list[int]] = [[] for _ in prompts]
    lens = [0 for _ in prompts]
    outputs = []

    def step(new_tokens: list[list[int]], sample_all: bool) -> torch.Tensor:
        for row, tokens in enumerate(new_tokens):
            while len(tables[row]) * BLOCK_SIZE < lens[row] + len(tokens):
                tables[row].append(free.pop())
        flat = flat_step(new_tokens, lens, tables, [True] * len(new_tokens), BLOCK_SIZE)
        if sample_all:
            flat.sample_rows = np.arange(len(flat.input_ids))
        for row, tokens in enumerate(new_tokens):
            lens[row] += len(tokens)
        return run_step(model, caches, flat, BLOCK_SIZE, torch.device("cpu"))

    outputs.append(step(prompts, sample_all=True))
    for index in range(decode_steps):
        outputs.append(step([[(7 * index + row + 3) % 90] for row in range(len(prompts))], False))
    return outputs
