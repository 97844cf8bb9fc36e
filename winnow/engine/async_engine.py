"""The engine's public door: an engine thread stepping the LLMEngine, and per-request async
streams of RequestOutput deltas for the server."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Literal, Self

from winnow.config import EngineConfig
from winnow.distributed.group import TensorParallel
from winnow.engine.engine import EngineStats, LLMEngine, as_rejection
from winnow.engine.outputs import RequestOutput
from winnow.engine.request import (
    EngineDeadError,
    EngineDraining,
    EngineOverloaded,
    GenerationRequest,
)
from winnow.engine.step_result import StepResult
from winnow.models import LoadedModel, Tokenizer, load_model
from winnow.structured.backend import CompiledGrammar
from winnow.structured.spec import GrammarSpec

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5

# Steps the engine thread may run ahead of the output thread. One overlaps the text of step k
# with step k + 1 and bounds what a stop string found late costs: at most one more token.
_STEPS_AHEAD = 1

EngineState = Literal["loading", "ready", "draining", "dead"]


def _load(config: EngineConfig, tp: TensorParallel | None) -> LoadedModel:
    return load_model(
        config.model,
        dtype=config.dtype,
        device=config.device,
        trust_remote_code=config.trust_remote_code,
        chat_template=config.chat_template,
        cpu_kernels_enabled=config.cpu_kernels,
        kernels=config.kernels,
        tokenizer=config.tokenizer,
        revision=config.revision,
        download_dir=config.download_dir,
        generation_config=config.generation_config,
        tp=tp,
    )


class RequestStream:
    """Async iterator over one request's deltas; ends after the delta with finished=True."""

    def __init__(self, request_id: str, num_sequences: int = 1) -> None:
        self.request_id = request_id
        self.num_sequences = num_sequences
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._done = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item


class AsyncEngine:
    """Runs `LLMEngine.step_tokens()` in one background thread, turns its tokens into text
    (`OutputProcessor`), and routes outputs to request streams.

    The engine thread owns the LLMEngine; other threads only enqueue commands (a stop string
    found in the text is one: "stop"). Outputs reach the event loop with one
    `call_soon_threadsafe` per step.

    `output_thread`: the text is made on a thread of its own (`winnow-outputs`, which owns the
    requests' text state) while the engine thread runs the next step. That overlap needs the
    next step to leave the GIL and a core free, as a GPU forward does while the engine thread
    waits for it; on a CPU the forward's OpenMP team wants every core, so by default the text is
    made on the engine thread there, after each step (BENCHMARKS.md has both).

    The model is loaded and the LLMEngine built on the engine thread too, so that no other
    thread ever runs an OpenMP parallel region: once two threads own worker pools, libgomp
    counts more threads than cores and stops letting idle workers spin, and every region of a
    decode step then waits for a futex wake-up (BENCHMARKS.md has the cost on 2 cores).

    With `wait=False` the constructor returns while the model loads, so a server can answer
    (503, "loading") meanwhile; `tokenizer` and the limits exist once `state` leaves "loading".
    """

    def __init__(
        self,
        build: Callable[[], LLMEngine],
        model_name: str,
        *,
        wait: bool = True,
        output_thread: bool | None = None,
    ) -> None:
        self.model_name = model_name
        self._threaded = output_thread
        self._commands: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._built = threading.Event()
        self._started = threading.Event()
        self._stopping = threading.Event()
        self._draining = False
        self._dead_error: BaseException | None = None
        self._build_error: BaseException | None = None
        self._handoff: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._ahead = threading.Semaphore(_STEPS_AHEAD)
        self._output_thread = threading.Thread(
            target=self._output_main, name="winnow-outputs", daemon=True
        )
        self._thread = threading.Thread(
            target=self._thread_main, args=(build,), name="winnow-engine", daemon=True
        )
        self._thread.start()
        if wait:
            self._built.wait()
            if self._build_error is not None:
                raise self._build_error

    @classmethod
    def from_config(
        cls, config: EngineConfig, *, wait: bool = True, output_thread: bool | None = None
    ) -> AsyncEngine:
        """With `config.tensor_parallel_size` > 1 the build also starts this node's worker
        ranks; a worker that dies ends the engine (`fail`). `output_thread`: see `AsyncEngine`
        (None: by the model's device)."""
        started: list[AsyncEngine] = []
        early: list[BaseException] = []

        def worker_died(error: BaseException) -> None:
            if started:
                started[0].fail(error)
            else:
                early.append(error)

        def build() -> LLMEngine:
            workers, tp = None, None
            if config.tensor_parallel_size > 1:
                from winnow.distributed.launcher import start_tensor_parallel

                workers, tp = start_tensor_parallel(config, worker_died)
            try:
                return LLMEngine(_load(config, tp), config, workers)
            except BaseException:
                if workers is not None:
                    workers.stop(clean=False)
                raise

        engine = cls(build, config.model, wait=wait, output_thread=output_thread)
        started.append(engine)
        for error in early:
            engine.fail(error)
        return engine

    def fail(self, error: BaseException) -> None:
        """From any thread: the engine is dead (a worker rank failed). Every stream ends with
        an error, /health turns 503 and the server exits non-zero."""
        if self._dead_error is None:
            self._dead_error = error
        self._commands.put(("wake", None))
        if self._loop is not None:
            self._deliver_error(EngineDeadError(f"the engine failed: {error}"))

    def start(self) -> None:
        """Start stepping (once); call from inside the running event loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._started.set()

    def shutdown(self) -> None:
        self._stopping.set()
        self._started.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=10)

    @property
    def _sequences_in_flight(self) -> int:
        """Sequences of admitted requests not finished yet: running and queued (loop thread)."""
        return sum(stream.num_sequences for stream in self._streams.values())

    @property
    def is_ready(self) -> bool:
        """Built, stepping, and not shutting down."""
        return (
            self._built.is_set()
            and self._started.is_set()
            and self._thread.is_alive()
            and not self.is_dead
            and not self._draining
        )

    @property
    def is_dead(self) -> bool:
        """The engine loop died, or the model failed to load."""
        return self._dead_error is not None or self._build_error is not None

    @property
    def state(self) -> EngineState:
        if self.is_dead:
            return "dead"
        if self._draining:
            return "draining"
        return "ready" if self.is_ready else "loading"

    @property
    def load_error(self) -> BaseException | None:
        return self._build_error

    @property
    def requests_in_flight(self) -> int:
        """Admitted requests not finished yet (loop thread)."""
        return len(self._streams)

    def begin_drain(self) -> None:
        """Admit nothing more; requests in flight go on (loop thread)."""
        self._draining = True

    def end_in_flight(self) -> None:
        """End every request in flight with EngineDraining and abort it (loop thread)."""
        for request_id in list(self._streams):
            self._commands.put(("abort", request_id))
        self._fail_all(EngineDraining("the server is shutting down"))

    @property
    def admission_capacity(self) -> int:
        """Sequences that may be in flight at once, running and queued."""
        return self.engine.config.max_num_seqs + self.engine.config.max_queue

    def stats(self) -> EngineStats:
        """Counts as of the end of the last engine step."""
        return self._stats

    def compile_grammar(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile a grammar for this model (GrammarError if it cannot be enforced). Blocking
        and thread-safe: call it in a worker thread, then pass the result to `submit`."""
        return self.engine.compile_grammar(spec)

    def submit(
        self, request: GenerationRequest, grammar: CompiledGrammar | None = None
    ) -> RequestStream:
        """Admit a request or raise RequestRejected / EngineOverloaded / EngineDeadError /
        EngineDraining.

        `grammar`: `request.grammar` compiled by `compile_grammar`, so that the engine thread
        never compiles."""
        if self._draining:
            raise EngineDraining("the server is shutting down")
        if not self.is_ready:
            raise EngineDeadError("the engine is not running")
        self.engine.validate(request)
        if self._sequences_in_flight + request.params.n > self.admission_capacity:
            raise EngineOverloaded("the admission queue is full")
        stream = RequestStream(request.request_id, request.params.n)
        self._streams[request.request_id] = stream
        self._commands.put(("add", (request, grammar)))
        return stream

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(("abort", request_id))

    def _thread_main(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = build()
            self.tokenizer: Tokenizer = self.engine.tokenizer
            self.max_model_len = self.engine.max_model_len
            self.vocab_size = self.engine.vocab_size
            config = self.engine.config
            self.max_n = min(config.max_n, config.max_num_seqs + config.max_queue)
            self.sampling_defaults = self.engine.sampling_defaults
            self._stats = self.engine.stats()
        except BaseException as exc:
            self._build_error = exc
            return
        finally:
            self._built.set()
        self._started.wait()
        if not self._stopping.is_set():
            if self._threaded is None:
                self._threaded = self.engine.runner.device.type != "cpu"
            if self._threaded:
                self._output_thread.start()
            self._run()
        else:
            self.engine.close(clean=True)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._dead_error is not None:
                    raise self._dead_error
                self._drain_commands(block=not self.engine.has_work)
                if not self.engine.has_work:
                    self._stats = self.engine.stats()  # aborts may have freed everything
                    continue
                step = self.engine.step_tokens()
                self._stats = self.engine.stats()
                for failure in self.engine.take_failures():
                    self._hand_off("fail", failure)
                if step:
                    self._hand_off("step", step)
        except BaseException as exc:
            logger.exception("engine loop died")
            self._dead_error = self._dead_error or exc
            self._end(EngineDeadError(f"the engine failed: {exc!r}"))
            self.engine.close(clean=False)
            return
        self._end(EngineDeadError("the server is shutting down"))
        self.engine.close(clean=True)

    def _hand_off(self, kind: str, payload: object) -> None:
        """To the output thread, in order: ("step", StepResult), ("fail", (request id, error)),
        ("end", the error every stream left ends with); handled at once without one."""
        if not self._threaded:
            self._handle(kind, payload)
            return
        if kind == "step":  # at most `_STEPS_AHEAD` steps ahead of the text
            while not self._ahead.acquire(timeout=_IDLE_WAIT_S):
                if self._dead_error is not None:
                    raise self._dead_error
        self._handoff.put((kind, payload))

    def _end(self, error: BaseException) -> None:
        """End every stream with `error` after the outputs handed off before it."""
        self._hand_off("end", error)
        if self._threaded:
            self._output_thread.join(timeout=10)
        self._deliver_error(error)  # done already, unless the output thread died

    def _output_main(self) -> None:
        """The output thread: each step's text, in step order, then the end."""
        try:
            kind = ""
            while kind != "end":
                kind, payload = self._handoff.get()
                self._handle(kind, payload)
        except BaseException as exc:
            logger.exception("output thread died")
            self.fail(exc)

    def _handle(self, kind: str, payload: object) -> None:
        if kind == "step":
            assert isinstance(payload, StepResult)
            outputs, stopped, failed = self.engine.output_processor.process(payload)
            if stopped:  # before the engine may run another step
                self._commands.put(("stop", stopped))
            for request_id, error in failed:  # the request only: the engine goes on
                self._commands.put(("abort", request_id))
                self._deliver_request_error(request_id, error)
            if self._threaded:
                self._ahead.release()
            if outputs:
                self._deliver(outputs)
        elif kind == "fail":
            assert isinstance(payload, tuple)
            self._deliver_request_error(*payload)
        else:
            assert isinstance(payload, BaseException)
            self._deliver_error(payload)

    def _drain_commands(self, block: bool) -> None:
        try:
            command, payload = (
                self._commands.get(timeout=_IDLE_WAIT_S) if block else (self._commands.get_nowait())
            )
        except queue.Empty:
            return
        while True:
            if command == "add":
                assert isinstance(payload, tuple)
                request, grammar = payload
                try:
                    self.engine.add_request(request, grammar)
                except Exception as exc:
                    logger.warning("request %s not admitted: %r", request.request_id, exc)
                    self._deliver_request_error(request.request_id, as_rejection(exc))
            elif command == "abort":
                assert isinstance(payload, str)
                self.engine.abort(payload)
            elif command == "stop":
                assert isinstance(payload, list)
                self.engine.stop_sequences(payload)
            try:
                command, payload = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.request_id]
            stream.put(output)

    def _deliver_request_error(self, request_id: str, error: BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._fail_stream, request_id, error)

    def _fail_stream(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)

    def _deliver_error(self, error: BaseException) -> None:
        assert self._loop is not None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_all, error)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)
