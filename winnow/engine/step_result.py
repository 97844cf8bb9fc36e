"""What one engine step hands the output processor: token ids, raw logprobs and the finishes the
engine decided from ids alone (EOS, stop token ids, max_tokens, grammar, time limit).

Row-aligned lists rather than an object per sequence: the engine thread only appends the
sampler's lists and records the few sequences that finished. Text (detokenisation, stop
strings, logprob token strings) is the output processor's work, on its own thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from winnow.engine.outputs import FinishReason

if TYPE_CHECKING:
    from winnow.engine.sequence import Sequence


class Finish(NamedTuple):
    """`token_is_text`: the sequence's last token belongs to its text (max_tokens, a grammar's
    end); an EOS or stop token id ends the text before it."""

    reason: FinishReason
    stop_reason: str | int | None
    token_is_text: bool


@dataclass
class StepResult:
    """`seqs[row]` sampled `token_ids[row]`; the logprob lists are row-aligned too, present when
    some row asked for logprobs. `expired`: sequences ended by their time limit, which sampled
    nothing this step."""

    seqs: list[Sequence] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    finishes: dict[Sequence, Finish] = field(default_factory=dict)
    expired: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs or self.expired)
