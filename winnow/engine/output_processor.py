"""Token ids -> the deltas the server sends: detokenisation, stop strings, logprob entries.

The engine thread only appends token ids and ends sequences on what ids alone decide; this turns
each step's `StepResult` into `RequestOutput`s: on a thread of its own under `AsyncEngine` on an
accelerator (so the text of step k overlaps step k + 1), else right after the step (the
engine thread's loop on a CPU, `LLMEngine.step()`).

A stop string is found here, possibly after the engine has already decoded one more token of
that choice: the choice ends at the token that completed the stop string, later tokens are
dropped (not sent, not counted in `completion_tokens`, no logprobs), and `process` returns the
sequence so that the engine thread stops it and frees its KV blocks.

An exception while making one request's output (a detokeniser, stop-string or logprob bug) fails
that request only: it is logged with its traceback, the request gets no more outputs, and
`process` returns it with a `RequestFailed` so that the engine aborts it (freeing its blocks)
and its stream ends with that error; the other requests of the step go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from winnow.engine.outputs import (
    ChoiceDelta,
    FinishReason,
    PositionLogprobs,
    RequestOutput,
    TokenLogprob,
)
from winnow.engine.request import RequestFailed
from winnow.engine.sequence import RequestState, Sequence
from winnow.engine.step_result import StepResult
from winnow.text import (
    Detokenizer,
    Detokenizers,
    TextStream,
    TextTokenizer,
    build_token_bytes,
    token_text,
)

logger = logging.getLogger(__name__)


class ChoiceText:
    """One choice as the client sees it: its text (a `TextStream` when it has stop strings to
    match, else the bare detokeniser, whose text is the delta), the tokens it kept, and whether
    it ended (the engine may still be decoding it for a step)."""

    __slots__ = ("detokenizer", "finished", "num_tokens", "stream")

    def __init__(self, detokenizer: Detokenizer, stream: TextStream | None) -> None:
        self.detokenizer = detokenizer
        self.stream = stream
        self.num_tokens = 0
        self.finished = False

    def flush(self) -> str:
        """The text held back, final now."""
        return self.detokenizer.flush() if self.stream is None else self.stream.flush()


@dataclass(eq=False)
class RequestText:
    """The output processor's state of one request, kept on its `RequestState.text`; `failed`:
    making its output raised, it gets no more. `plain`: the only choice of an n = 1 request with
    no stop strings and no logprobs, whose steps take `process`'s short path."""

    choices: list[ChoiceText]
    failed: bool = False
    plain: ChoiceText | None = None
    request_id: str = ""
    prompt_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(choice.finished for choice in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(choice.num_tokens for choice in self.choices)


class OutputProcessor:
    """Owns every request's text state; one thread at a time calls `process`."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_bytes = build_token_bytes(tokenizer)
        self.token_texts = [token_text(raw) for raw in self.token_bytes]  # logprobs' `token`
        self.detokenizers = Detokenizers(tokenizer)

    def process(
        self, step: StepResult
    ) -> tuple[list[RequestOutput], list[Sequence], list[tuple[str, RequestFailed]]]:
        """The step's deltas, one RequestOutput per request that advanced (in the order its
        first choice did); the sequences this step's text ended that the engine must stop; the
        requests whose output failed, with the error their stream ends with.

        A row of a `plain` choice that did not finish makes its RequestOutput at once; the
        others go through `_advance` and `_add`, and their outputs are completed at the end."""
        outputs: list[RequestOutput] = []
        pending: dict[RequestState, RequestOutput] = {}
        stopped: list[Sequence] = []
        failed: list[tuple[str, RequestFailed]] = []
        for seq in step.expired:
            try:
                choice = self._choice(seq)
                if choice is None or choice.finished:
                    continue
                expired = ChoiceDelta(seq.index)
                self._finish(choice, expired, "length", "time_limit")
            except Exception as exc:
                self._fail(seq.request, exc, outputs, pending, failed)
                continue
            _add(outputs, pending, seq.request, expired)
        finishes = step.finishes
        for row, (seq, token_id) in enumerate(zip(step.seqs, step.token_ids, strict=True)):
            state = seq.request
            try:
                text = state.text
                if text is None:
                    text = self._start(state)
                plain = text.plain
                if plain is not None and not plain.finished and seq not in finishes:
                    plain.num_tokens += 1
                    delta = ChoiceDelta(0, plain.detokenizer.append(token_id), [token_id])
                    outputs.append(
                        RequestOutput(  # positional: once per row
                            text.request_id,
                            [delta],
                            text.prompt_tokens,
                            seq.num_cached_prompt_tokens,
                            plain.num_tokens,
                            False,
                            state.seed,
                        )
                    )
                    continue
                advanced = self._advance(step, row, seq, token_id, stopped)
            except Exception as exc:
                self._fail(state, exc, outputs, pending, failed)
                continue
            if advanced is not None:
                _add(outputs, pending, state, advanced)
        for state, output in pending.items():
            _complete(state, output)
        return outputs, stopped, failed

    def _advance(
        self, step: StepResult, row: int, seq: Sequence, token_id: int, stopped: list[Sequence]
    ) -> ChoiceDelta | None:
        """The delta of one sampled token; None for a choice that ended already (decoded past
        a stop string, or failed): its token is dropped."""
        choice = self._choice(seq)
        if choice is None or choice.finished:
            return None
        choice.num_tokens += 1
        delta = ChoiceDelta(seq.index, "", [token_id])
        params = seq.request.request.params
        if step.logprobs is not None and params.logprobs:
            delta.logprobs = [self._position_logprobs(step, row, params.top_logprobs)]
        finish = step.finishes.get(seq) if step.finishes else None
        if finish is None or finish.token_is_text:
            stream = choice.stream
            if stream is None:
                delta.text = choice.detokenizer.append(token_id)
            else:
                text = stream.append(token_id)
                delta.text = text.text
                if text.stop_string is not None:
                    choice.finished = True
                    delta.finish_reason, delta.stop_reason = "stop", text.stop_string
                    if finish is None:
                        stopped.append(seq)
        if finish is not None and not choice.finished:
            self._finish(choice, delta, finish.reason, finish.stop_reason)
        return delta

    def _choice(self, seq: Sequence) -> ChoiceText | None:
        """The sequence's choice; None once its request failed."""
        text = seq.request.text
        if text is None:
            text = self._start(seq.request)
        elif text.failed:
            return None
        return text.choices[seq.index]

    def _start(self, state: RequestState) -> RequestText:
        """The request's first output: its choices' text is set up on this thread."""
        request = state.request
        params = request.params
        context = request.prompt_token_ids if request.text_continues_prompt else ()
        choices = []
        for _ in state.sequences:
            detokenizer = self.detokenizers.new(context)
            stream = (
                TextStream(detokenizer, params.stop, params.include_stop_str_in_output)
                if params.stop
                else None
            )
            choices.append(ChoiceText(detokenizer, stream))
        text = state.text = RequestText(
            choices, request_id=request.request_id, prompt_tokens=len(request.prompt_token_ids)
        )
        if len(choices) == 1 and not params.logprobs and choices[0].stream is None:
            text.plain = choices[0]
        return text

    @staticmethod
    def _fail(
        state: RequestState,
        exc: Exception,
        outputs: list[RequestOutput],
        pending: dict[RequestState, RequestOutput],
        failed: list[tuple[str, RequestFailed]],
    ) -> None:
        """End one request whose output raised (dropping what this step gave it); the step's
        other requests go on."""
        request_id = state.request.request_id
        logger.error("making the output of request %s failed", request_id, exc_info=exc)
        state.text = RequestText([], failed=True)
        dropped = pending.pop(state, None)
        if dropped is not None:
            outputs[:] = [output for output in outputs if output is not dropped]
        failed.append(
            (request_id, RequestFailed("The server had an error while generating the response."))
        )

    @staticmethod
    def _finish(
        choice: ChoiceText, delta: ChoiceDelta, reason: FinishReason, stop_reason: str | int | None
    ) -> None:
        """End the choice for a reason the engine decided; the text it held back is final now,
        and may complete a stop string."""
        delta.text += choice.flush()
        if choice.stream is not None and choice.stream.stop_string is not None:
            reason, stop_reason = "stop", choice.stream.stop_string
        choice.finished = True
        delta.finish_reason, delta.stop_reason = reason, stop_reason

    def _position_logprobs(self, step: StepResult, row: int, k: int) -> PositionLogprobs:
        """The sampled token's entry and its top k; an id past the vocabulary (an embedding's
        padding row) has no bytes."""
        assert step.logprobs is not None
        ids = [step.token_ids[row]]
        logprobs = [step.logprobs[row]]
        if k and step.top_token_ids is not None and step.top_logprobs is not None:
            ids += step.top_token_ids[row][:k]
            logprobs += step.top_logprobs[row][:k]
        token_bytes, texts, vocab = self.token_bytes, self.token_texts, len(self.token_bytes)
        entries = [
            TokenLogprob(t, texts[t], lp, list(token_bytes[t]))
            if t < vocab
            else TokenLogprob(t, "", lp, [])
            for t, lp in zip(ids, logprobs, strict=True)
        ]
        return PositionLogprobs(entries[0], entries[1:])


def _add(
    outputs: list[RequestOutput],
    pending: dict[RequestState, RequestOutput],
    state: RequestState,
    delta: ChoiceDelta,
) -> None:
    """A delta off the short path: into its request's output of this step, opened in place (so
    that outputs keep the order of their first choice) and completed by `_complete`."""
    output = pending.get(state)
    if output is None:
        text = state.text
        assert text is not None
        output = RequestOutput(
            text.request_id,
            [delta],
            text.prompt_tokens,
            state.sequences[0].num_cached_prompt_tokens,
            0,  # completion_tokens and finished: `_complete`
            False,
            state.seed,
        )
        pending[state] = output
        outputs.append(output)
    else:
        output.choices.append(delta)


def _complete(state: RequestState, output: RequestOutput) -> None:
    text = state.text
    assert text is not None
    if len(text.choices) == 1:  # the common n = 1: no sums or sorts over choices
        only = text.choices[0]
        output.finished, output.completion_tokens = only.finished, only.num_tokens
    else:
        output.finished, output.completion_tokens = text.finished, text.completion_tokens
        output.choices.sort(key=_choice_index)


def _choice_index(choice: ChoiceDelta) -> int:
    return choice.index
