"""SmolLM2-135M (9 heads, 3 KV heads, intermediate 1536) split over three ranks: its logits
for a prefill and paged decode steps equal the unsharded model's within the rounding bound.

Both sides run the torch reference kernels: packing SmolLM2 for the C kernels costs more than
the whole comparison, and the sharded C-kernel path is covered by test_tp_model's models."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tests.distributed.drive import prefill_then_decode
from tests.distributed.ranks import run_ranks
from tests.tolerances import assert_within, logit_tolerance
from winnow.distributed.group import TensorParallel
from winnow.models import load_model

PROMPTS = [[1, 4093, 314, 253, 1345, 28], [1, 22, 3126, 17, 9, 880, 5, 61, 12, 45]]
DECODE_STEPS = 2


def smollm2_logits(tp: TensorParallel | None, path: Path) -> list[torch.Tensor]:
    loaded = load_model(str(path), dtype="float32", device="cpu", cpu_kernels_enabled=False, tp=tp)
    return prefill_then_decode(loaded, PROMPTS, DECODE_STEPS)


def test_smollm2_at_tp3_equals_tp1(smollm2_dir: Path) -> None:
    sharded = run_ranks(3, smollm2_logits, smollm2_dir)
    reference = smollm2_logits(None, smollm2_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    bound = logit_tolerance(hf)
    for got, expected in zip(sharded, reference, strict=True):
        assert got.shape == expected.shape and got.shape[-1] == 49152
        assert_within(got, expected, bound)
