"""The synchronous engine: admit requests, run steps, turn sampled tokens into deltas."""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from winnow.config import EngineConfig, ResolvedEngineConfig
from winnow.distributed.step_input import Stop
from winnow.engine.block_manager import BlockManager, block_hash
from winnow.engine.memory_plan import (
    KVCachePlan,
    agree_on_blocks,
    gpu_kv_budget,
    plan_kv_cache,
)
from winnow.engine.model_runner import ModelRunner
from winnow.engine.output_processor import OutputProcessor
from winnow.engine.outputs import RequestOutput
from winnow.engine.request import GenerationRequest, RequestFailed, RequestRejected
from winnow.engine.scheduler import Scheduler
from winnow.engine.sequence import RequestState, Sequence, SequenceStatus
from winnow.engine.step_result import Finish, StepResult
from winnow.limits import InvalidRequest
from winnow.models import LoadedModel, kv_cache_bytes_per_block, resolve_kv_cache_dtype
from winnow.sampling.bitmask import TokenMasks, words_for
from winnow.sampling.noise import child_seed, random_seed
from winnow.sampling.params import SamplingParamError, SamplingParams
from winnow.sampling.sampler import Sampler, SamplerOutput
from winnow.structured.backend import CompiledGrammar, GrammarBackend
from winnow.structured.llguidance_backend import LLGuidanceBackend
from winnow.structured.spec import GrammarSpec

if TYPE_CHECKING:
    from winnow.distributed.launcher import WorkerGroup

logger = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    num_requests: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_cached: int
    preemptions: int
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0


def as_rejection(exc: Exception) -> InvalidRequest:
    """One request's failure as its own 400; the engine itself carries on."""
    if isinstance(exc, InvalidRequest):
        return exc
    return RequestRejected(f"The request cannot be served: {exc!r}")


class LLMEngine:
    """Owns the scheduler, the KV cache and the sampler. Not thread-safe: one thread drives it."""

    def __init__(
        self, loaded: LoadedModel, config: EngineConfig, workers: WorkerGroup | None = None
    ) -> None:
        device = next(loaded.model.parameters()).device
        self.config = config = config.for_device(device.type)
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        self.tokenizer = loaded.tokenizer
        self.vocab_size = loaded.config.vocab_size
        self.sampling_defaults = check_sampling_defaults(loaded.sampling_defaults)
        self.eos_token_ids = frozenset(loaded.tokenizer.eos_token_ids)
        kv_dtype = resolve_kv_cache_dtype(
            config.kv_cache_dtype, next(loaded.model.parameters()).dtype
        )
        self.runner = ModelRunner(loaded, config.block_size, kv_dtype)
        plan = plan_kv_cache_for(config, loaded, self.runner, device, kv_dtype)
        self.workers = workers
        if loaded.model.tp is not None:
            plan = agree_on_blocks(
                plan, loaded.model.tp.min_int(plan.num_blocks), config.block_size
            )
        num_blocks, self.max_model_len = plan.num_blocks, plan.max_model_len
        self.runner.allocate_kv_cache(num_blocks)
        self.runner.size_block_tables(config.max_num_seqs, self.max_model_len)
        # tensor parallel: each worker rank makes the same calls (winnow.distributed.worker)
        self.runner.start(
            loaded.kernels.decode_graphs,
            config.enforce_eager,
            config.max_num_seqs,
            self.max_model_len,
        )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.sampler = Sampler(
            self.vocab_size, config.max_num_seqs, device, sorted(self.eos_token_ids)
        )
        self.sampler.warm_up()
        self.output_processor = OutputProcessor(loaded.tokenizer)
        self._grammar_backend: GrammarBackend | None = None
        self._grammar_backend_lock = threading.Lock()
        self._bitmask_buffer = np.empty(
            (config.max_num_seqs, words_for(self.vocab_size)), dtype=np.int32
        )
        self.requests: dict[str, RequestState] = {}
        self._timed: dict[RequestState, None] = {}  # the requests with a time limit, in order
        self._seq_ids = itertools.count()
        self._preemptions = 0
        self.failures: list[tuple[str, InvalidRequest | RequestFailed]] = []
        # --seed: unseeded requests draw their seeds from this generator, so a restarted server
        # that is sent the same requests in the same order answers the same.
        self._seed_source = None if config.seed is None else random.Random(config.seed)
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %s), max_model_len %d",
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
            str(kv_dtype).removeprefix("torch."),
            self.max_model_len,
        )

    def validate(self, request: GenerationRequest) -> int:
        """Check that the request can ever be served (max_model_len never exceeds the KV pool, so
        fitting the context means fitting the pool); returns its resolved max_tokens.

        Only reads immutable configuration, so any thread may call it.
        """
        params = request.params
        params.check_vocab(self.vocab_size)
        prompt_len = len(request.prompt_token_ids)
        if prompt_len == 0:
            raise RequestRejected("the prompt is empty", param="messages")
        room = self.max_model_len - prompt_len
        if params.max_tokens is not None and params.max_tokens > room or room < 1:
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {prompt_len + (params.max_tokens or 1)} tokens "
                f"({prompt_len} in the messages, {params.max_tokens or 1} in the completion).",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = params.max_tokens or room
        if params.min_tokens > max_tokens:
            raise RequestRejected(
                f"min_tokens ({params.min_tokens}) leaves no room in the context: at most "
                f"{max_tokens} tokens can follow this prompt",
                param="min_tokens",
            )
        if params.n > self.config.max_n:
            raise RequestRejected(f"n must be at most {self.config.max_n}", param="n")
        capacity = self.config.max_num_seqs + self.config.max_queue
        if params.n > capacity:  # would wait for room that never comes: not a 429
            raise RequestRejected(
                f"n={params.n} can never be admitted: this server holds at most {capacity} "
                "sequences, running and queued",
                param="n",
            )
        if params.top_logprobs > self.config.max_logprobs:
            raise RequestRejected(
                f"top_logprobs must be at most {self.config.max_logprobs} on this server",
                param="top_logprobs",
            )
        return max_tokens

    @property
    def grammar_backend(self) -> GrammarBackend:
        """Built on first use (it indexes the whole vocabulary); any thread may ask."""
        with self._grammar_backend_lock:
            if self._grammar_backend is None:
                self._grammar_backend = LLGuidanceBackend(
                    self.tokenizer.hf, self.vocab_size, sorted(self.eos_token_ids)
                )
            return self._grammar_backend

    def compile_grammar(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile a request's grammar (GrammarError if it cannot be enforced). Any thread may
        call it, and the server does, off the engine thread, before it submits the request."""
        return self.grammar_backend.compile(spec)

    def add_request(
        self, request: GenerationRequest, grammar: CompiledGrammar | None = None
    ) -> None:
        """`grammar`: `request.grammar` compiled already; compiled here when missing."""
        if request.request_id in self.requests:
            raise RequestRejected(f"duplicate request id {request.request_id!r}")
        max_tokens = self.validate(request)
        if request.grammar is not None and grammar is None:
            grammar = self.compile_grammar(request.grammar)
        params = request.params
        seed = params.seed if params.seed is not None else self._draw_seed()
        deadline = (
            request.arrival_time + params.time_limit_ms / 1000.0
            if params.time_limit_ms is not None
            else None
        )
        state = RequestState(request, seed, max_tokens, deadline, grammar)
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_token_ids
        max_output = min(max_tokens, self.max_model_len - len(request.prompt_token_ids))
        for index in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request=state,
                index=index,
                seed=self._choice_seed(params.choice_seeds, seed, index, params.n),
                stop_ids=stop_ids,
                max_output=max_output,
            )
            state.sequences.append(seq)
        self.requests[request.request_id] = state
        if deadline is not None:
            self._timed[state] = None
        for seq in state.sequences:
            self.scheduler.add(seq)

    def _draw_seed(self) -> int:
        if self._seed_source is None:
            return random_seed()
        return self._seed_source.getrandbits(63)

    @staticmethod
    def _choice_seed(choice_seeds: tuple[int, ...], seed: int, index: int, n: int) -> int:
        if choice_seeds:
            return choice_seeds[index]
        return seed if n == 1 else child_seed(seed, index)

    def abort(self, request_id: str) -> None:
        state = self.requests.get(request_id)
        if state is None:
            return
        for seq in state.sequences:
            if not seq.is_finished:
                self._release(seq)

    def stop_sequences(self, seqs: list[Sequence]) -> None:
        """End sequences whose text the output processor ended (a stop string). On its own
        thread it finds one a step after the token, so the engine may have finished them since."""
        for seq in seqs:
            if not seq.is_finished:
                self._release(seq)

    def close(self, clean: bool) -> None:
        """Stop the worker ranks (tensor parallel): `clean` tells them to leave their loop
        first; else (a rank failed) they are killed."""
        if self.workers is not None:
            self.workers.stop(clean, Stop.of(self.runner.decode_graphs))

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            num_requests=len(self.requests),
            kv_blocks_total=self.block_manager.num_usable_blocks,
            kv_blocks_free=self.block_manager.num_free_blocks,
            kv_blocks_cached=self.block_manager.num_cached_blocks,
            preemptions=self._preemptions,
            prefix_queried_tokens=self.block_manager.prefix_queried_tokens,
            prefix_hit_tokens=self.block_manager.prefix_hit_tokens,
        )

    def step(self) -> list[RequestOutput]:
        """Run one step and turn it into text here (tests, benches; the server runs
        `output_processor` on its own thread): a delta for every request that advanced."""
        outputs, stopped, failed = self.output_processor.process(self.step_tokens())
        self.stop_sequences(stopped)
        for request_id, error in failed:
            self.abort(request_id)
            self.failures.append((request_id, error))
        return outputs

    def step_tokens(self) -> StepResult:
        """Run one scheduling step: the tokens each sequence sampled, and the sequences that
        ended for reasons token ids decide. No text: see `OutputProcessor`."""
        step = StepResult()
        self._expire_deadlines(step)
        plan = self.scheduler.schedule()
        if plan.preempted:
            self._preemptions += len(plan.preempted)
            logger.warning(
                "KV cache full: preempted %d sequence(s) for recompute (%d in total)",
                len(plan.preempted),
                self._preemptions,
            )
        for seq in plan.preempted:
            self._drop_sampler_row(seq)
            self.runner.release(seq.seq_id)
        failed = self._add_sampler_rows([item.seq for item in plan.scheduled if item.samples])
        if failed:
            plan.scheduled = [i for i in plan.scheduled if i.seq.request.request_id not in failed]
            step.expired = [s for s in step.expired if s.request.request_id not in failed]
        if plan.scheduled:
            sampling = [item.seq for item in plan.scheduled if item.samples]
            logits = self.runner.execute(plan.scheduled)
            # after the forward is queued: on an accelerator the masks are filled meanwhile
            bitmasks = self._grammar_bitmasks(sampling)
            block_size = self.block_manager.block_size
            for seq, num_new, _ in plan.scheduled:
                computed = seq.num_computed_tokens = seq.num_computed_tokens + num_new
                if computed // block_size > len(seq.block_hashes):
                    self._register_full_blocks(seq)
            if sampling:
                result = self.sampler.sample(logits, [seq.seq_id for seq in sampling], bitmasks)
                self._append_tokens(sampling, result, step)
        return step

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Offer each newly completed block of `seq` to the prefix cache."""
        size = self.block_manager.block_size
        for index in range(len(seq.block_hashes), seq.num_computed_tokens // size):
            parent = seq.block_hashes[-1] if seq.block_hashes else b""
            hash_ = block_hash(parent, seq.token_ids_slice(index * size, (index + 1) * size))
            self.block_manager.register(seq.block_table[index], hash_)
            seq.block_hashes.append(hash_)

    def _add_sampler_rows(self, seqs: list[Sequence]) -> set[str]:
        """Give each sequence about to be sampled its sampler row. A request whose row cannot be
        added (a parameter the sampler cannot hold) is aborted and queued in `failures`, so it
        ends with its own error and the step goes on without it; returns the failed ids."""
        failed: set[str] = set()
        for seq in [seq for seq in seqs if not seq.has_sampler_row]:
            request_id = seq.request.request_id
            if request_id in failed:
                continue
            try:
                grammar = seq.request.grammar
                if grammar is not None and seq.matcher is None:  # new, or resumed after preemption
                    seq.matcher = grammar.new_matcher(seq.output_token_ids)
                self.sampler.add_row(
                    seq.seq_id,
                    seq.request.request.params,
                    seq.seed,
                    seq.prompt_token_ids,
                    seq.output_token_ids,
                )
            except Exception as exc:
                logger.warning("request %s failed to start sampling", request_id, exc_info=True)
                failed.add(request_id)
                self.abort(request_id)
                self.failures.append((request_id, as_rejection(exc)))
                continue
            seq.has_sampler_row = True
        return failed

    def take_failures(self) -> list[tuple[str, InvalidRequest | RequestFailed]]:
        """Requests that failed inside step() since the last call (see _add_sampler_rows;
        `step()` adds those whose output failed)."""
        failures, self.failures = self.failures, []
        return failures

    def _grammar_bitmasks(self, sampling: list[Sequence]) -> TokenMasks | None:
        """The next-token bitmasks of the sequences with a grammar, or None if none has one."""
        constrained = [
            (row, seq.matcher) for row, seq in enumerate(sampling) if seq.matcher is not None
        ]
        if not constrained:
            return None
        rows = [row for row, _ in constrained]
        matchers = [matcher for _, matcher in constrained]
        self.grammar_backend.fill_bitmasks(matchers, self._bitmask_buffer)
        bits = torch.from_numpy(self._bitmask_buffer[: len(rows)]).to(self.sampler.device)
        return TokenMasks(np.array(rows, dtype=np.int64), bits)

    def _drop_sampler_row(self, seq: Sequence) -> None:
        if seq.has_sampler_row:
            self.sampler.remove_row(seq.seq_id)
            seq.has_sampler_row = False
        seq.matcher = None

    def _append_tokens(self, seqs: list[Sequence], result: SamplerOutput, step: StepResult) -> None:
        """Append each sampled token and end the sequences that token ids end: a stop token id,
        EOS, max_tokens or the context, the grammar's end. Stop strings are the output
        processor's (they need the text)."""
        step.seqs = seqs
        step.token_ids = token_ids = result.token_ids.tolist()
        if result.logprobs is not None:
            step.logprobs = result.logprobs.tolist()
            if result.top_token_ids is not None and result.top_logprobs is not None:
                step.top_token_ids = result.top_token_ids.tolist()
                step.top_logprobs = result.top_logprobs.tolist()
        for seq, token_id in zip(seqs, token_ids, strict=True):
            output = seq.output_token_ids
            output.append(token_id)
            if seq.matcher is not None:
                self._advance_grammar(seq, token_id, step)
            elif token_id in seq.stop_ids:
                self._finish_on_stop_id(seq, token_id, step)
            elif len(output) >= seq.max_output:
                self._finish(seq, step, Finish("length", None, True))

    def _finish_on_stop_id(self, seq: Sequence, token_id: int, step: StepResult) -> None:
        stop_token_ids = seq.request.request.params.stop_token_ids
        stop_reason = token_id if token_id in stop_token_ids else None  # else EOS
        self._finish(seq, step, Finish("stop", stop_reason, False))

    def _advance_grammar(self, seq: Sequence, token_id: int, step: StepResult) -> None:
        matcher = seq.matcher
        assert matcher is not None
        if not matcher.consume(token_id):
            logger.error(
                "sequence %d: token %d breaks its grammar; ending it", seq.seq_id, token_id
            )
        if token_id in seq.stop_ids:
            self._finish_on_stop_id(seq, token_id, step)
        elif len(seq.output_token_ids) >= seq.max_output:
            self._finish(seq, step, Finish("length", None, True))
        elif matcher.is_finished:
            self._finish(seq, step, Finish("stop", None, True))

    def _expire_deadlines(self, step: StepResult) -> None:
        if not self._timed:
            return
        now = time.monotonic()
        for state in [s for s in self._timed if s.deadline is not None and now >= s.deadline]:
            for seq in state.sequences:
                if not seq.is_finished:
                    self._release(seq)
                    step.expired.append(seq)

    def _finish(self, seq: Sequence, step: StepResult, finish: Finish) -> None:
        step.finishes[seq] = finish
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Free the sequence's blocks and row; the engine forgets its request once every
        sequence of it has ended."""
        self.scheduler.remove(seq)
        self._drop_sampler_row(seq)
        self.runner.release(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        state = seq.request
        if len(state.sequences) == 1 or state.is_finished:
            if self.requests.get(state.request.request_id) is state:
                del self.requests[state.request.request_id]
            self._timed.pop(state, None)


def plan_kv_cache_for(
    config: ResolvedEngineConfig,
    loaded: LoadedModel,
    runner: ModelRunner,
    device: torch.device,
    dtype: torch.dtype,
) -> KVCachePlan:
    """Blocks that fit this rank's memory budget (on CUDA measured around a profiling forward
    of the largest step), capped at what max_num_seqs full contexts need, and the longest
    sequence they hold."""
    per_block = kv_cache_bytes_per_block(loaded.model.layer_config, config.block_size, dtype)
    if config.num_kv_blocks is not None:
        budget = max(2, config.num_kv_blocks) * per_block
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        peak = runner.profile_activation_bytes(config.max_num_batched_tokens, config.max_num_seqs)
        budget = gpu_kv_budget(total, free, peak, config.gpu_memory_utilization)
        logger.info(
            "memory: %.2f GiB of %.2f GiB in use after loading, %.2f GiB peak activations "
            "(profiled at %d tokens), %.2f GiB left for the KV cache",
            (total - free) / GIB,
            total / GIB,
            peak / GIB,
            config.max_num_batched_tokens,
            budget / GIB,
        )
    else:
        budget = int(config.kv_cache_memory_gib * GIB)
    plan = plan_kv_cache(
        budget,
        per_block,
        config.block_size,
        loaded.config.max_position_embeddings,
        config.max_model_len,
        config.max_num_seqs if config.num_kv_blocks is None else None,
    )
    if plan.capped:
        wanted = config.max_model_len or loaded.config.max_position_embeddings
        log = logger.warning if config.max_model_len else logger.info
        log("max_model_len %d: what the KV cache holds for one sequence (of %d wanted)",
            plan.max_model_len, wanted)  # fmt: skip
    return plan


def check_sampling_defaults(defaults: dict[str, float]) -> dict[str, float]:
    """A model's sampling defaults no request could send refuse to start, rather than turn every
    request that leaves the field out into a 400."""
    try:
        SamplingParams(**defaults)  # type: ignore[arg-type]
    except (SamplingParamError, TypeError) as exc:
        raise ValueError(f"unusable sampling defaults {defaults}: {exc}") from None
    return defaults
