"""CUDA's fused Gumbel-max (winnow/kernels/triton/gumbel_max.py) against the torch expression of
the same pick: identical tokens and y over many seeds and awkward rows, the sampler's CUDA path
picking what its torch path picks, the fused step (penalties, logit_bias, bans, grammar bitmasks,
greedy rows and logprobs in the one launch) against the pipeline, the launch budget of those
steps, and the variants the sampler's warm-up compiles.

Without CUDA the kernel runs under Triton's interpreter on CPU tensors, which must be switched on
before the kernel is defined (at import); with CUDA the same tests run the compiled kernel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from tests.kernels.triton_launches import Launch, compile_for_sm90, recorded_launches  # noqa: E402
from winnow.kernels.triton import gumbel_max  # noqa: E402
from winnow.sampling import noise  # noqa: E402
from winnow.sampling.bitmask import TokenMasks, words_for  # noqa: E402
from winnow.sampling.params import SamplingParams  # noqa: E402
from winnow.sampling.sampler import Sampler  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOAT32_MAX = torch.finfo(torch.float32).max

if DEVICE.type == "cpu" and isinstance(gumbel_max._gumbel_argmax_kernel, triton.JITFunction):
    raise RuntimeError(
        "winnow.kernels.triton was imported before TRITON_INTERPRET=1 was set: "
        "set it in the environment of this test run"
    )

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def torch_pick(z: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor):
    """The sampler's torch expression: z loaded (NaN -> -inf, +inf -> max), y, Gumbel-max."""
    vocab = z.shape[1]
    z = torch.nan_to_num(z, nan=-torch.inf, neginf=-torch.inf)
    y = (z / temperature[:, None]).clamp_(max=FLOAT32_MAX)
    mixed = noise.token_mix(torch.arange(vocab, device=z.device))
    scratch = noise.NoiseScratch(vocab, z.device)
    return noise.gumbel_argmax(y, keys, mixed, None, scratch), y


@pytest.mark.parametrize("vocab", [4099, 1000, 7])
def test_picks_and_y_match_the_torch_reference(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    rows, picks = 8, 0
    for trial in range(6 if vocab > 7 else 20):
        z = torch.randn(rows, vocab, generator=generator) * (0.5 + 3 * trial)
        z[::5, : vocab // 2] = -torch.inf  # half the row banned
        z[1, -1] = FLOAT32_MAX  # clamps to float32 max once divided by T < 1
        z[2, vocab // 3], z[2, 0] = math.nan, math.inf  # NaN -> -inf, +inf -> max
        z[7] = -torch.inf  # nothing allowed: token 0
        temperature = torch.rand(rows, generator=generator) * 1.5 + 0.05
        temperature[:2] = 0.5
        temperature[3] = 1.0
        seeds = torch.randint(-(2**62), 2**62, (rows,), generator=generator)
        positions = torch.randint(0, 1 << 40, (rows,), generator=generator)
        z, temperature = z.to(DEVICE), temperature.to(DEVICE)
        seeds, positions = seeds.to(DEVICE), positions.to(DEVICE)
        keys = noise.row_keys(seeds, positions, noise.GUMBEL_STREAM)
        expected, y = torch_pick(z, temperature, keys)
        y_out = torch.full_like(z, math.nan)
        tokens = gumbel_max.gumbel_argmax(z, positions, seeds, temperature, y_out=y_out)
        assert torch.equal(tokens, expected)
        assert torch.equal(y_out, y)
        picks += rows
    assert int(expected[7]) == 0 and picks >= 48


def test_per_slot_tables_read_through_slots() -> None:
    """With `slots`, seeds and temperatures come from strided per-slot tables (the sampler's own),
    and the block written in place may be a strided view of a wider buffer."""
    generator = torch.Generator().manual_seed(2)
    table = torch.zeros(10, 2, dtype=torch.int64)
    table[:, 0] = torch.randint(-(2**62), 2**62, (10,), generator=generator)
    floats = torch.rand(10, 8, generator=generator) + 0.2
    slots = torch.tensor([7, 2, 9, 0])
    positions = torch.tensor([5, 0, 1 << 33, 12])
    work = torch.randn(6, 3000, generator=generator)
    z = work[1:5, :2500]
    keys = noise.row_keys(table[slots, 0], positions, noise.GUMBEL_STREAM)
    expected, y = torch_pick(z.clone(), floats[slots, 0], keys)
    outside = work[:, 2500:].clone()
    table, floats, work = table.to(DEVICE), floats.to(DEVICE), work.to(DEVICE)
    z = work[1:5, :2500]
    tokens = gumbel_max.gumbel_argmax(
        z, positions.to(DEVICE), table[:, 0], floats[:, 0], slots=slots.to(DEVICE), y_out=z
    )
    assert torch.equal(tokens.cpu(), expected)
    assert torch.equal(z.cpu(), y) and torch.equal(work[:, 2500:].cpu(), outside)


def make(
    params: list[SamplingParams],
    vocab: int,
    triton_gumbel: bool,
    seed: int = 1000,
    histories: list[tuple[list[int], list[int]]] | None = None,
    **sizes: int,
) -> Sampler:
    """A sampler with a row per params, seeded from `seed`; `histories`: each row's prompt and
    output ids so far (default: prompt [1, 2], no output)."""
    sampler = Sampler(
        vocab, len(params), DEVICE, eos_token_ids=[0], triton_gumbel=triton_gumbel, **sizes
    )
    for key, p in enumerate(params):
        prompt, output = histories[key] if histories else ([1, 2], [])
        sampler.add_row(key, p, seed=seed + key, prompt_token_ids=prompt, output_token_ids=output)
    return sampler


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=t) for t in (1.0, 0.4, 1.6)],
        [
            SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.3),
            SamplingParams(temperature=0.0),
            SamplingParams(temperature=0.8, top_p=0.9),
            SamplingParams(temperature=1.2, logprobs=True, logprobs_mode="processed"),
        ],
    ],
    ids=["temperature-only", "mixed-routes"],
)
def test_sampler_cuda_path_picks_what_the_torch_path_picks(params) -> None:
    """The sampler with the Triton Gumbel-max (the plain temperature step, the free route of
    the full pipeline, and -- with candidate slices too narrow for a top_p 0.9 nucleus -- the
    thresholded route's exact redo) against the same sampler on its torch expressions."""
    vocab = 2053
    narrow = {"open_candidates": 4, "wide_candidates": 8}
    fused, reference = make(params, vocab, True, **narrow), make(params, vocab, False, **narrow)
    generator = torch.Generator().manual_seed(9)
    keys = list(range(len(params)))
    redone = 0
    for step in range(8):
        logits = torch.randn(len(params), vocab, generator=generator) * 3
        if step % 2:
            logits[0, 3], logits[-1, 5] = math.nan, math.inf
        logits = logits.to(DEVICE)
        with recorded_launches() as launches:
            out = fused.sample(logits, keys)
        expected = reference.sample(logits, keys)
        assert torch.equal(out.token_ids, expected.token_ids)
        redone += len(launches) == 2  # the free rows' pass, then the top_p row's exact redo
        if expected.logprobs is not None:
            assert out.logprobs is not None
            torch.testing.assert_close(
                out.logprobs, expected.logprobs, rtol=0, atol=0, equal_nan=True
            )
    if DEVICE.type == "cpu" and any(p.top_p < 1 for p in params):
        assert redone > 0


# operations that launch nothing on a GPU: views, metadata, allocations
NO_LAUNCH = {
    "aten.lift_fresh", "aten.detach", "aten.select", "aten.slice", "aten.empty", "aten.view",
}  # fmt: skip


class _Dispatched(TorchDispatchMode):
    """The aten operations dispatched inside the block that launch work on a GPU (copies
    included), except those the interpreter itself dispatches while it runs a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.interpreting = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.interpreting and str(func.overloadpacket) not in NO_LAUNCH:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def counted() -> Iterator[tuple[list[Launch], _Dispatched]]:
    """Triton launches and the torch operations dispatched outside them, inside the block."""
    with recorded_launches() as launches, _Dispatched() as dispatched:
        record = InterpretedFunction.run

        def run(self: InterpretedFunction, *args: Any, **kwargs: Any) -> Any:
            dispatched.interpreting += 1
            try:
                return record(self, *args, **kwargs)
            finally:
                dispatched.interpreting -= 1

        InterpretedFunction.run = run  # type: ignore[method-assign]
        try:
            yield launches, dispatched
        finally:
            InterpretedFunction.run = record  # type: ignore[method-assign]


def test_default_sampling_step_stays_within_three_launches() -> None:
    """The OpenAI SDK's default request (temperature 1, nothing else) on the CUDA path: each step
    launches at most 3 operations -- torch ops that do work (here the index upload and the token
    download) plus Triton launches (one fused kernel over the vocabulary)."""
    batch, vocab = 4, 1000
    sampler = make([SamplingParams(temperature=1.0)] * batch, vocab, True)
    reference = make([SamplingParams(temperature=1.0)] * batch, vocab, False)
    generator = torch.Generator().manual_seed(1)
    keys = list(range(batch))
    for _ in range(3):
        logits = (torch.randn(batch, vocab, generator=generator) * 2).to(DEVICE)
        with counted() as (launches, dispatched):
            out = sampler.sample(logits, keys)
        assert torch.equal(out.token_ids, reference.sample(logits, keys).token_ids)
        if DEVICE.type == "cpu":  # the launch hook observes the interpreter
            assert [launch.kernel for launch in launches] == ["_gumbel_argmax_kernel"]
        assert len(dispatched.ops) + len(launches) <= 3, (dispatched.ops, launches)
        assert dispatched.ops == ["aten._to_copy.default"] * 2  # the counter sees the copies
    assert np.all(sampler._out_len[:batch] == 3)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="with CUDA the other tests compile the kernel")
def test_kernel_compiles_for_h100_without_spills() -> None:
    """The interpreter never compiles the kernel: every variant the sampler launches, built by the
    real GPU compiler for sm_90, spills nothing and divides by T with IEEE rounding."""
    lines = compile_for_sm90("tests.sampling.triton_gumbel_compile", timeout=600)
    # distinct variants: the fused step's four in float32 and bf16, the free route with and
    # without y (the exact redo and both block alignments at this vocabulary among them)
    assert len(lines) == 10 and all(line.endswith(" ok") for line in lines), lines


# Greedy rows and rows on the free route, with stages 1-2 and logprobs: the fused step's business.
EDITED = [
    SamplingParams(
        temperature=1.0,
        frequency_penalty=0.5,
        presence_penalty=0.3,
        logprobs=True,
        logprobs_mode="processed",
    ),
    SamplingParams(
        temperature=0.7, repetition_penalty=1.3, logprobs=True, logprobs_mode="processed"
    ),
    SamplingParams(
        temperature=1.2,
        logprobs=True,
        logprobs_mode="processed",
        repetition_penalty=0.8,
        frequency_penalty=-0.4,
        presence_penalty=0.6,
        logit_bias={3: 5.0, 10: -100.0, 7: 2.5, 2: 1.0},
    ),
    SamplingParams(temperature=0.9, logit_bias={5: 3.0, 0: 4.0}, min_tokens=3, stop_token_ids=(9,)),
    SamplingParams(temperature=1.0, logprobs=True, logprobs_mode="processed", logit_bias={4: 2}),
    SamplingParams(temperature=0.6, logprobs=True, repetition_penalty=1.5),  # raw logprobs
    SamplingParams(temperature=1.0, min_tokens=5, frequency_penalty=1.0),  # grammar wins
    SamplingParams(temperature=1.4, logprobs=True, logprobs_mode="processed"),  # grammar too
    SamplingParams(
        temperature=0.0, repetition_penalty=1.2, logprobs=True, logprobs_mode="processed"
    ),  # greedy: the argmax of z, its logprobs at temperature 1
    SamplingParams(temperature=0.0, logit_bias={1: 3.0}, frequency_penalty=0.7),  # grammar too
]
CONSTRAINED = np.array([6, 7, 9])  # batch rows under a grammar bitmask


def grammar(vocab: int, generator: torch.Generator) -> TokenMasks:
    """Random bitmasks (about half of each row allowed) for the CONSTRAINED rows."""
    words = words_for(vocab)
    bits = torch.randint(-(2**31), 2**31, (len(CONSTRAINED), words), generator=generator)
    return TokenMasks(CONSTRAINED, bits.to(torch.int32).to(DEVICE))


def logprob_tolerance(logits: torch.Tensor, lp: torch.Tensor, vocab: int) -> torch.Tensor:
    """How far two float32 logsumexps of the same values may be apart, and so the logprobs:
    each is m + ln(s), s = sum exp(v - m) over V terms in [0, 1], one of them 1. Every term is
    within (1 + |v - m|) eps of its own value relative (exp's argument and result roundings,
    weighted by the term: at most eps V in all), the sum within V eps relative whatever the
    order, and ln and the two subtractions round at |lse| and |lp|: so each is within
    eps (|lse| + |lp| + 2 V + 4) of the exact value, and the two within twice that. |lse| is
    at most max |z| / T + ln V; T >= 0.6 and the penalties at most double that (bias +5)."""
    eps = torch.finfo(torch.float32).eps
    finite = logits.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().amax().item()
    lse = 2 * finite / 0.6 + 5 + math.log(vocab)
    return 2 * eps * (lse + lp.abs().nan_to_num(0.0) + 2 * vocab + 4)


def torch_only(sampler: Sampler) -> Sampler:
    """The sampler on its torch expressions alone (no C kernels where they could load)."""
    sampler._routes.fused_cpu, sampler._routes.mix_table = False, None
    return sampler


def history_tables(sampler: Sampler) -> tuple[int, int]:
    return sampler._history.output.data.data_ptr(), sampler._history.counts.data.data_ptr()


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fused_step_edits_and_logprobs_match_the_pipeline(seed: int) -> None:
    """Penalties, logit_bias, the min_tokens ban and grammar bitmasks applied inside the fused
    pass (one launch per step) pick what the pipeline on its torch expressions picks, step after
    step, so the history the kernel records matches the pipeline's; logprobs agree to float32
    summation."""
    vocab, batch = 2500, len(EDITED)  # two blocks of the pass
    generator = torch.Generator().manual_seed(seed)
    histories = [
        (
            torch.randint(0, vocab, (int(n),), generator=generator).tolist() + [3, 3, 5],
            torch.randint(0, 12, (int(m),), generator=generator).tolist(),
        )
        for n, m in torch.randint(0, 40, (batch, 2), generator=generator)
    ]
    fused = make(EDITED, vocab, True, seed=seed * 100, histories=histories)
    reference = torch_only(make(EDITED, vocab, False, seed=seed * 100, histories=histories))
    steps, grown = 6, 0
    for step in range(steps):
        keys = torch.randperm(batch, generator=generator).tolist()  # batch rows != slots
        logits = torch.randn(batch, vocab, generator=generator) * 3
        logits[:, :12] += 2  # the outputs' ids are likely: penalties and bias decide
        if step % 2:
            logits[0, 3], logits[2, 5], logits[4, 7] = math.nan, math.inf, -math.inf
        masks = grammar(vocab, generator) if step < steps - 1 else None
        logits = logits.to(DEVICE)
        tables = history_tables(fused)
        with counted() as (launches, dispatched):
            out = fused.sample(logits, keys, masks)
        expected = reference.sample(logits, keys, masks)
        assert torch.equal(out.token_ids, expected.token_ids), step
        if DEVICE.type == "cpu":
            assert [launch.kernel for launch in launches] == ["_gumbel_argmax_kernel"]
        if history_tables(fused) == tables:  # else the tables doubled: a copy each, amortised
            assert len(dispatched.ops) + len(launches) <= 3, (dispatched.ops, launches)
        else:
            grown += 1
        assert out.logprobs is not None and expected.logprobs is not None
        asked = np.array([EDITED[key].logprobs for key in keys])
        assert torch.isnan(out.logprobs[~asked]).all()
        ours, theirs = out.logprobs[asked].double(), expected.logprobs[asked].double()
        tolerance = logprob_tolerance(logits, theirs, vocab)
        assert ((ours - theirs).abs() <= tolerance).all(), (ours, theirs, tolerance)
        assert out.top_token_ids is not None and out.top_token_ids.shape == (batch, 0)
    assert grown <= 1
    for table in ("output", "counts"):  # the history the kernel recorded, as record() keeps it
        ours, theirs = getattr(fused._history, table), getattr(reference._history, table)
        assert np.array_equal(ours.lengths, theirs.lengths)
        width = int(ours.lengths.max())
        assert torch.equal(ours.data[:, :width].cpu(), theirs.data[:, :width].cpu())
    assert fused._touched is not None and not fused._touched.any()  # marks cleared


@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")  # ln 0: row 3
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # -inf - -inf
def test_fused_step_bans_what_it_must() -> None:
    """Cases the random test may miss: a bias of -100 on the likeliest token, a min_tokens ban
    on a token the logits all but force, a grammar that allows one token, a row whose every
    token is banned (token 0, logprob floored), all in one step, against the pipeline."""
    vocab = 300
    params = [
        SamplingParams(temperature=1.0, logit_bias={17: -100.0}),
        SamplingParams(temperature=1.0, min_tokens=2, logprobs=True),
        SamplingParams(temperature=1.0, logprobs=True, logprobs_mode="processed"),
        SamplingParams(temperature=0.5, logprobs=True, logprobs_mode="processed"),
        SamplingParams(
            temperature=1.0, repetition_penalty=3.0, logprobs=True, logprobs_mode="processed"
        ),
    ]
    fused, reference = make(params, vocab, True), torch_only(make(params, vocab, False))
    logits = torch.zeros(5, vocab)
    logits[:, 17] = 50.0
    logits[1, 0] = 80.0  # EOS, banned by min_tokens
    logits[4] = -30.0
    logits[4, 1:4] = torch.tensor([1.5, -1.0, 0.0])  # prompt ids 1, 2 penalised: 0.5, -3.0
    bits = torch.zeros(2, words_for(vocab), dtype=torch.int32)
    bits[0, 40 // 32] = 1 << (40 % 32)  # row 2: token 40 only
    masks = TokenMasks(np.array([2, 3]), bits.to(DEVICE))  # row 3: nothing allowed
    logits = logits.to(DEVICE)
    out = fused.sample(logits, list(range(5)), masks)
    expected = reference.sample(logits, list(range(5)), masks)
    assert torch.equal(out.token_ids, expected.token_ids)
    assert out.token_ids.tolist()[2:4] == [40, 0] and out.token_ids[0] != 17
    assert out.token_ids[1] != 0
    assert out.logprobs is not None and expected.logprobs is not None
    assert out.logprobs[2] == 0.0 and out.logprobs[3] == expected.logprobs[3] == -9999.0
    # tokens 1, 2, 3 at 0.5, -3, 0 (the rest e^-30 below): each logprob within a few ulps
    penalised = torch.tensor([0.5, -3.0, 0.0], dtype=torch.float64)
    exact = (penalised - penalised.logsumexp(0))[int(out.token_ids[4]) - 1]
    assert abs(float(out.logprobs[4]) - float(exact)) <= 1e-5
    assert abs(float(out.logprobs[4]) - float(expected.logprobs[4])) <= 1e-5


def test_a_sampler_launches_only_variants_its_warm_up_compiled() -> None:
    """Sampler.warm_up (run by the engine before it serves) launches every variant a run then
    uses -- the fused step with and without edits and logprobs, the pipeline's free route on
    blocks of the work buffer at any row offset (an odd vocabulary: offsets change alignment),
    y written or not, and the exact redo -- counted with Triton's sm_90 specialisation."""
    vocab = 2053
    mixed = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=1.1, logprobs=True, logprobs_mode="processed", top_k=3),
        SamplingParams(temperature=1.0, frequency_penalty=0.5),
        SamplingParams(temperature=0.7, logprobs=True, logprobs_mode="processed"),
        SamplingParams(temperature=1.3),
    ]
    narrow = {"open_candidates": 4, "wide_candidates": 8}
    samplers = [
        (make(EDITED, vocab, True), [None, "grammar"]),
        (make([SamplingParams(temperature=1.0)] * 3, vocab, True), [None]),
        (make(mixed, vocab, True, **narrow), [None]),
        (make(mixed[2:], vocab, True, **narrow), [None]),  # free rows from another offset
    ]
    with recorded_launches() as warm:
        samplers[0][0].warm_up()
    warmed = {(launch.kernel, launch.variant) for launch in warm}
    assert len(warmed) == len(warm) == 8
    generator = torch.Generator().manual_seed(4)
    served: list[Launch] = []
    for sampler, grammars in samplers:
        batch = len(sampler._slots)
        for masks in grammars:
            logits = (torch.randn(batch, vocab, generator=generator) * 3).to(DEVICE)
            bitmasks = grammar(vocab, generator) if masks else None
            with recorded_launches() as launches:
                sampler.sample(logits, list(range(batch)), bitmasks)
            served += launches
    variants = {(launch.kernel, launch.variant) for launch in served}
    assert variants <= warmed
    assert len(variants) >= 3  # the plain step, edits with logprobs, the free route's y
