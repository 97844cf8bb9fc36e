"""Engine-side state of a request and of each of its choices (sequences)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from winnow.engine.request import GenerationRequest

if TYPE_CHECKING:
    from winnow.engine.output_processor import RequestText
    from winnow.structured.backend import CompiledGrammar, GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One choice being generated: its tokens, its KV blocks and its stop state.

    `num_computed_tokens` counts tokens whose KV is in the cache; a sequence needs
    `num_tokens - num_computed_tokens` more tokens of forward work before it can sample.
    `stop_ids` (stop token ids, and EOS unless ignored) and `max_output` (max_tokens, or the
    room left in the context) are what the engine checks after each token.
    """

    seq_id: int
    request: RequestState
    index: int
    seed: int
    stop_ids: frozenset[int] = frozenset()
    max_output: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    has_sampler_row: bool = False
    # the grammar's matcher, while the sequence has a sampler row (rebuilt after preemption)
    matcher: GrammarMatcher | None = None
    # the prompt never changes: its length is read for every sequence in every step
    num_prompt_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.request.prompt_token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens at absolute positions [start, end) across prompt and output."""
        prompt = self.request.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return self.output_token_ids[start - len(prompt) : end - len(prompt)]
        return prompt[start:] + self.output_token_ids[: end - len(prompt)]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(eq=False)
class RequestState:
    """A submitted request: its resolved limits and its n sequences."""

    request: GenerationRequest
    seed: int
    max_tokens: int
    deadline: float | None
    grammar: CompiledGrammar | None = None
    sequences: list[Sequence] = field(default_factory=list)
    # the output processor's state (its thread alone reads and writes it)
    text: RequestText | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)
