"""Text on its own thread: a stop string found a step or more after the engine decoded it must
give the client exactly what finding it at once gives, and free the sequence's blocks. A request
whose text fails ends alone; the engine and the other requests go on."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from winnow.config import EngineConfig
from winnow.engine.async_engine import AsyncEngine
from winnow.engine.engine import LLMEngine
from winnow.engine.outputs import PositionLogprobs, RequestOutput
from winnow.engine.request import EngineDeadError, GenerationRequest, RequestFailed
from winnow.models import LoadedModel, load_model
from winnow.sampling.params import SamplingParams
from winnow.text import Detokenizers
from winnow.text.detokenizer import Detokenizer

PROMPT = [1, 3, 100, 4, 250, 17]
MAX_TOKENS = 40
FAULT_MARK = 777  # a prompt token that marks the request whose detokeniser raises
FAULT_AFTER = 3  # tokens it detokenises first


@pytest.fixture(scope="module")
def loaded(demo_model_dir: Path) -> LoadedModel:
    return load_model(str(demo_model_dir))


def make_engine(loaded: LoadedModel) -> LLMEngine:
    return LLMEngine(loaded, EngineConfig(model="demo", max_num_seqs=4, num_kv_blocks=64))


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class Result:
    choices: dict[int, Choice] = field(default_factory=dict)
    completion_tokens: int = 0
    finished: int = 0  # outputs that said finished: exactly one, the last


def collect(outputs: list[RequestOutput], result: Result) -> None:
    for output in outputs:
        assert result.finished == 0, "an output after the finished one"
        for delta in output.choices:
            choice = result.choices.setdefault(delta.index, Choice())
            assert choice.finish_reason is None, "a delta after the choice finished"
            choice.text += delta.text
            choice.token_ids += delta.token_ids
            choice.logprobs += delta.logprobs or []
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
        result.completion_tokens = output.completion_tokens
        result.finished += output.finished


def assert_same(late: Result, inline: Result) -> None:
    """Equal, but for the logprobs of choices other than 0 (the one the stop string ends) after
    choice 0's stop: the late run decoded them alongside choice 0's extra tokens, a batch one
    larger, which moves logits by float rounding. Their tokens and text must not move."""
    assert late.choices[0] == inline.choices[0]
    assert (late.completion_tokens, late.finished) == (inline.completion_tokens, inline.finished)
    assert late.choices.keys() == inline.choices.keys()
    for index, choice in inline.choices.items():
        other = late.choices[index]
        assert (other.text, other.token_ids) == (choice.text, choice.token_ids)
        assert (other.finish_reason, other.stop_reason) == (
            choice.finish_reason,
            choice.stop_reason,
        )
        assert [p.sampled.token_id for p in other.logprobs] == choice.token_ids


def params(n: int = 1, logprobs: bool = True, **fields: object) -> SamplingParams:
    return SamplingParams(
        n=n, temperature=1.0, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=logprobs,
        top_logprobs=2 if logprobs else 0, **fields,  # type: ignore[arg-type]
    )  # fmt: skip


def run_inline(engine: LLMEngine, sampling: SamplingParams) -> Result:
    """Text made in the same step as the tokens (`LLMEngine.step`)."""
    result = Result()
    engine.add_request(GenerationRequest("r", PROMPT, sampling))
    while engine.has_work:
        collect(engine.step(), result)
    return result


def run_lagging(engine: LLMEngine, sampling: SamplingParams, lag: int) -> tuple[Result, int]:
    """The text of step k made after the engine ran step k + `lag`, as an output thread that
    falls behind does; returns the result and the tokens the engine decoded past what it kept."""
    result = Result()
    engine.add_request(GenerationRequest("r", PROMPT, sampling))
    sequences = engine.requests["r"].sequences
    steps: deque = deque()
    while engine.has_work or steps:
        if engine.has_work:
            steps.append(engine.step_tokens())
        if len(steps) > lag or not engine.has_work:
            outputs, stopped, failed = engine.output_processor.process(steps.popleft())
            assert not failed
            engine.stop_sequences(stopped)
            for seq in stopped:  # stopped by its text: its blocks and row are free at once
                assert seq.is_finished and not seq.block_table and not seq.has_sampler_row
            collect(outputs, result)
    decoded = sum(len(seq.output_token_ids) for seq in sequences)
    return result, decoded - result.completion_tokens


@pytest.fixture(scope="module")
def unstopped(loaded: LoadedModel) -> dict[int, str]:
    """Choice 0's text without stop strings, for n = 1 and n = 2 (other seeds)."""
    return {n: run_inline(make_engine(loaded), params(n)).choices[0].text for n in (1, 2)}


def a_stop_string(text: str) -> str:
    """Three characters from the middle of `text`."""
    assert len(text) > 8, text
    return text[len(text) // 2 :][:3]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_a_stop_found_late_sends_what_one_found_at_once_sends(
    loaded: LoadedModel, unstopped: dict[int, str], n: int, include: bool
) -> None:
    stop = a_stop_string(unstopped[n])
    sampling = params(n, stop=(stop,), include_stop_str_in_output=include)
    inline = run_inline(make_engine(loaded), sampling)
    cut = unstopped[n].index(stop) + (len(stop) if include else 0)
    assert inline.choices[0].text == unstopped[n][:cut]
    assert inline.choices[0].finish_reason == "stop"
    assert inline.choices[0].stop_reason == stop
    assert inline.completion_tokens == sum(len(c.token_ids) for c in inline.choices.values())
    assert inline.finished == 1
    for lag in (1, 2):
        late, extra = run_lagging(make_engine(loaded), sampling, lag)
        assert_same(late, inline)
        assert extra >= lag  # the engine did decode past the stop; those tokens were dropped


def test_a_choice_stopped_late_stops_decoding_and_frees_its_blocks(
    loaded: LoadedModel, unstopped: dict[int, str]
) -> None:
    stop = a_stop_string(unstopped[1])
    engine = make_engine(loaded)
    total = engine.stats().kv_blocks_total
    result, extra = run_lagging(engine, params(stop=(stop,)), lag=2)
    assert len(result.choices[0].token_ids) < MAX_TOKENS - 2
    assert extra == 2  # decoding ended with the stop, not at max_tokens
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.num_requests) == (0, 0, 0)
    assert stats.kv_blocks_free == total


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("threaded", [True, False])
async def test_the_async_engine_sends_what_the_inline_path_sends(
    loaded: LoadedModel, unstopped: dict[int, str], demo_model_dir: Path, threaded: bool
) -> None:
    stop = a_stop_string(unstopped[2])
    sampling = params(2, stop=(stop,))
    inline = run_inline(make_engine(loaded), sampling)
    config = EngineConfig(model=str(demo_model_dir), max_num_seqs=4)
    engine = AsyncEngine.from_config(config, output_thread=threaded)
    engine.start()
    try:
        streamed = Result()
        async for output in engine.submit(GenerationRequest("r", PROMPT, sampling)):
            collect([output], streamed)
        assert_same(streamed, inline)
    finally:
        await asyncio.to_thread(engine.shutdown)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("threaded", [True, False])
async def test_failing_text_ends_the_engine(demo_model_dir: Path, threaded: bool) -> None:
    config = EngineConfig(model=str(demo_model_dir), max_num_seqs=4)
    engine = AsyncEngine.from_config(config, output_thread=threaded)

    def fail(step: object) -> None:
        raise RuntimeError("detokeniser failed")

    engine.engine.output_processor.process = fail  # type: ignore[method-assign,assignment]
    engine.start()
    try:
        stream = engine.submit(GenerationRequest("r", PROMPT, params()))
        with pytest.raises(EngineDeadError, match="detokeniser failed"):
            async for _ in stream:
                pass
        assert engine.is_dead and engine.state == "dead"
    finally:
        await asyncio.to_thread(engine.shutdown)


class _FailingDetokenizer:
    def __init__(self, inner: Detokenizer) -> None:
        self._inner = inner
        self._tokens = 0

    def append(self, token_id: int) -> str:
        self._tokens += 1
        if self._tokens > FAULT_AFTER:
            raise RuntimeError("injected detokeniser fault")
        return self._inner.append(token_id)

    def flush(self) -> str:
        return self._inner.flush()


class _MarkedRequestFails:
    """The engine's detokenisers, but a prompt holding FAULT_MARK (the text's context, as for
    legacy completions) gets one that raises at its token FAULT_AFTER + 1."""

    def __init__(self, inner: Detokenizers) -> None:
        self._inner = inner

    def new(self, prompt_token_ids: list[int]) -> Detokenizer:
        detokenizer = self._inner.new(prompt_token_ids)
        return _FailingDetokenizer(detokenizer) if FAULT_MARK in prompt_token_ids else detokenizer


def marked(request_id: str, logprobs: bool = True) -> GenerationRequest:
    return GenerationRequest(
        request_id, [*PROMPT, FAULT_MARK], params(logprobs=logprobs), text_continues_prompt=True
    )


@pytest.mark.parametrize("logprobs", [True, False])  # the general path and the short one
def test_a_request_whose_text_fails_ends_alone_and_frees_its_blocks(
    loaded: LoadedModel, unstopped: dict[int, str], logprobs: bool
) -> None:
    engine = make_engine(loaded)
    processor = engine.output_processor
    processor.detokenizers = _MarkedRequestFails(processor.detokenizers)  # type: ignore[assignment]
    total = engine.stats().kv_blocks_total
    engine.add_request(GenerationRequest("good", PROMPT, params()))
    engine.add_request(marked("bad", logprobs))
    bad = engine.requests["bad"].sequences[0]
    good, failed_tokens = Result(), 0
    while engine.has_work:
        outputs = engine.step()
        collect([o for o in outputs if o.request_id == "good"], good)
        failed_tokens += sum(
            len(c.token_ids) for o in outputs if o.request_id == "bad" for c in o.choices
        )
        failures = engine.take_failures()
        if failures:
            assert [(rid, type(error)) for rid, error in failures] == [("bad", RequestFailed)]
            assert bad.is_finished and not bad.block_table and "bad" not in engine.requests
            assert good.finished == 0  # the good request is still running
    assert failed_tokens == FAULT_AFTER
    assert good.choices[0].text == unstopped[1] and good.finished == 1
    assert good.completion_tokens == MAX_TOKENS
    stats = engine.stats()
    assert (stats.running, stats.num_requests, stats.kv_blocks_free) == (0, 0, total)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("threaded", [True, False])
async def test_the_async_engine_ends_only_the_failing_stream(
    demo_model_dir: Path, unstopped: dict[int, str], threaded: bool
) -> None:
    config = EngineConfig(model=str(demo_model_dir), max_num_seqs=4)
    engine = AsyncEngine.from_config(config, output_thread=threaded)
    processor = engine.engine.output_processor
    processor.detokenizers = _MarkedRequestFails(processor.detokenizers)  # type: ignore[assignment]
    engine.start()

    async def consume(request: GenerationRequest) -> Result:
        result = Result()
        async for output in engine.submit(request):
            collect([output], result)
        return result

    try:
        good = asyncio.ensure_future(consume(GenerationRequest("good", PROMPT, params())))
        bad = Result()
        with pytest.raises(RequestFailed):
            async for output in engine.submit(marked("bad")):
                collect([output], bad)
        assert len(bad.choices[0].token_ids) == FAULT_AFTER
        while engine.stats().running != 1:  # aborted: it leaves the batch before the good one
            assert not good.done(), "the failed request was decoded to the end"
            await asyncio.sleep(0.001)
        assert (await good).choices[0].text == unstopped[1]
        later = await consume(GenerationRequest("later", PROMPT, params()))
        assert later.choices[0].text == unstopped[1] and later.finished == 1
        assert engine.state == "ready"
        for _ in range(100):  # the loop thread publishes stats after each command it drains
            stats = engine.stats()
            if stats.num_requests == 0:
                break
            await asyncio.sleep(0.05)
        assert (stats.running, stats.num_requests) == (0, 0)
        assert stats.kv_blocks_free == stats.kv_blocks_total
    finally:
        await asyncio.to_thread(engine.shutdown)


def run_steps(engine: LLMEngine, requests: list[GenerationRequest]) -> list[list[RequestOutput]]:
    """Each step's outputs, checked to come in the order of each request's first row (time
    limits first, as the step lists them)."""
    for request in requests:
        engine.add_request(request)
    steps = []
    while engine.has_work:
        step = engine.step_tokens()
        outputs, stopped, failed = engine.output_processor.process(step)
        assert not failed
        engine.stop_sequences(stopped)
        rows = [seq.request.request.request_id for seq in [*step.expired, *step.seqs]]
        sent = [output.request_id for output in outputs]
        assert sent == [rid for rid in dict.fromkeys(rows) if rid in sent]
        steps.append(outputs)
    return steps


def fields(steps: list[list[RequestOutput]], request_id: str) -> list[tuple[object, ...]]:
    """A request's outputs, step by step, all but the logprobs."""
    return [
        (
            output.prompt_tokens,
            output.cached_tokens,
            output.completion_tokens,
            output.finished,
            output.seed,
            [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in choices],
        )
        for outputs in steps
        for output in outputs
        if output.request_id == request_id
        for choices in [output.choices]
    ]


def test_the_short_path_sends_what_the_general_path_sends(
    loaded: LoadedModel, unstopped: dict[int, str]
) -> None:
    """n = 1 without stop strings or logprobs takes `process`'s short path; asking for logprobs
    sends the same request down the general one. Every step's output must be the same, ending
    at max_tokens (the last token is text) or at a stop token id (it is not), next to requests
    with n = 2 and a stop string in the same batch."""
    tokens = run_inline(make_engine(loaded), params(logprobs=False)).choices[0].token_ids
    stop_token = tokens[len(tokens) // 2]
    cut = tokens.index(stop_token)

    def requests(logprobs: bool) -> list[GenerationRequest]:
        return [
            GenerationRequest("max", PROMPT, params(logprobs=logprobs)),
            GenerationRequest("id", PROMPT, params(logprobs=logprobs, stop_token_ids=[stop_token])),
            GenerationRequest("n2", PROMPT, params(2)),
            GenerationRequest("stop", PROMPT, params(stop=(a_stop_string(unstopped[1]),))),
        ]

    short = run_steps(make_engine(loaded), requests(logprobs=False))
    general = run_steps(make_engine(loaded), requests(logprobs=True))
    for request_id in ("max", "id", "n2", "stop"):
        assert fields(short, request_id) == fields(general, request_id)
    by_step = fields(short, "max")
    assert len(by_step) == MAX_TOKENS and by_step[-1][3] and by_step[-1][5][0][3] == "length"
    assert "".join(step[5][0][1] for step in by_step) == unstopped[1]
    stopped = fields(short, "id")
    assert [step[5][0][2] for step in stopped] == [[t] for t in tokens[: cut + 1]]
    assert stopped[-1][5][0][3:] == ("stop", stop_token) and stopped[-1][2] == cut + 1
