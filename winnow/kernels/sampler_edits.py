"""What the sampler's fused CUDA step (winnow/kernels/triton/gumbel_max.py) reads besides the
logits: the layout of its per-row plan and the tables it edits with. Kept apart from the kernel so
the sampler can name them where triton is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# rows of RowEdits.info, one column per row of the batch
(
    REP_PROMPT,  # prompt ids the repetition penalty reads (0: none)
    REP_OUTPUT,  # output ids it reads (0: none)
    HISTORY,  # the row's output history length: frequency/presence and recording (-1: none)
    BIAS,  # logit_bias entries
    BAN,  # min_tokens ban entries (0 while the ban is off)
    MASK_ROW,  # row of the grammar bitmasks (-1: unconstrained)
    LOGPROB_MODE,  # 0: none, 1: processed, 2: raw
    GREEDY_ROW,  # 1: the row takes the argmax of its edited logits, no noise (ADJUST variant)
) = range(8)
INFO_FIELDS = 8
PROCESSED_MODE, RAW_MODE = 1, 2


@dataclass(frozen=True)
class RowEdits:
    """Stages 1-2 and logprobs for the fused step, on the device. Per-slot tables are read at
    each row's slot; `info` [INFO_FIELDS, b] int64 says how much of each a row takes.

    prompt [S, *] / output [S, *] int64 and counts [S, *] int32: the penalty history (each
    distinct output id's count at its first occurrence); the token picked is recorded at column
    info[HISTORY]. bias_ids / bias_values / ban_ids [S, *]: -1-padded. penalties [S] (stride of
    the temperature table): repetition, with frequency and presence the next two columns.
    bitmask [R, ceil(V/32)] int32. touched [>= b, ceil(V/32)] int32, zero between calls, and
    work [>= b, V] float32: scratch. `adjust`: run the ADJUST variant (greedy rows, stages 1-2,
    bitmask); lp_out [b] float64: the logprobs (the LOGPROBS variant, when given).
    """

    info: torch.Tensor
    prompt: torch.Tensor
    output: torch.Tensor
    counts: torch.Tensor
    bias_ids: torch.Tensor
    bias_values: torch.Tensor
    ban_ids: torch.Tensor
    penalties: torch.Tensor
    bitmask: torch.Tensor
    touched: torch.Tensor
    work: torch.Tensor
    adjust: bool
    lp_out: torch.Tensor | None = None
