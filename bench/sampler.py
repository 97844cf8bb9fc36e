"""Sampler micro-benchmark: winnow's batched pipeline vs a Hugging Face LogitsProcessorList chain.

Both sides get the same float32 logits on the same device, timed in the same run; each side's
time is the median of several repeats of one full step (winnow: `Sampler.sample`, including its
device->host copy and state update; HF: the processor chain, softmax and torch.multinomial).

    .venv/bin/python bench/sampler.py            # batch {1, 8, 64, 256} x vocab {32768, 131072}
    .venv/bin/python bench/sampler.py --quick    # a small subset
    .venv/bin/python bench/sampler.py --decode-step  # pipeline vs a demo-large decode step, B=64
    .venv/bin/python bench/sampler.py --targets  # B {64, 256}, V 131072: the stages issue 21 bounds
    .venv/bin/python bench/sampler.py --targets --threads 1 --clock thread  # CPU time of the step
    .venv/bin/python bench/sampler.py --stage "t=.7 p=.95 lp5" --threads 1 --clock thread

`--clock thread` times each step by the calling thread's CPU time instead of the wall clock: on a
machine shared with other busy processes a step that outlasts a scheduler slice also waits for
the others' slices, which inflates long steps more than short ones (with `--threads 1` every
kernel runs on the calling thread, so its CPU time is the step's work).

Every row also prints its time over greedy's for the same batch and vocabulary, measured in the
same run (greedy first), so loaded-machine noise mostly cancels in the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import winnow
from winnow.models import AttentionMetadata, allocate_kv_cache, load_model
from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler

PROMPT_LEN, HISTORY_LEN = 512, 128
CPU = torch.device("cpu")
BIAS = {11: 5.0, 12: -5.0, 13: 100.0, 14: -100.0, 15: 1.5}
# 20 biased ids spread over the vocabulary, up and down
SPREAD_BIAS = {1000 * i + 7: 2.0 if i % 2 else -3.0 for i in range(20)}

# stage -> (winnow parameters, HF processors); None: HF has no equivalent
STAGES: dict[str, tuple[dict, Callable[[], list[LogitsProcessor]] | None]] = {
    "all stages": (
        dict(
            repetition_penalty=1.1,
            frequency_penalty=0.2,
            presence_penalty=0.1,
            logit_bias=BIAS,
            temperature=0.8,
            top_k=50,
            top_p=0.9,
            min_p=0.05,
            xtc_probability=0.5,
            xtc_threshold=0.1,
        ),
        lambda: [
            RepetitionPenaltyLogitsProcessor(1.1),
            TemperatureLogitsWarper(0.8),
            TopKLogitsWarper(50),
            TopPLogitsWarper(0.9),
            MinPLogitsWarper(0.05),
        ],
    ),
    "greedy": (dict(temperature=0.0), None),
    "penalties": (
        dict(repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1),
        lambda: [RepetitionPenaltyLogitsProcessor(1.1)],
    ),
    "logit_bias": (
        dict(logit_bias=BIAS),
        lambda: [SequenceBiasLogitsProcessor([[[t], b] for t, b in BIAS.items()])],
    ),
    "temperature": (dict(temperature=0.8), lambda: [TemperatureLogitsWarper(0.8)]),
    "top_k": (dict(top_k=50), lambda: [TopKLogitsWarper(50)]),
    "top_p": (dict(top_p=0.9), lambda: [TopPLogitsWarper(0.9)]),
    "min_p": (dict(min_p=0.05), lambda: [MinPLogitsWarper(0.05)]),
    "xtc": (dict(xtc_probability=0.5, xtc_threshold=0.1), None),
    "t=1": (dict(temperature=1.0), lambda: []),
    "t=.7 p=.95": (
        dict(temperature=0.7, top_p=0.95),
        lambda: [TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.95)],
    ),
    "t=1 freq/pres": (dict(frequency_penalty=0.2, presence_penalty=0.1), None),
    # min_tokens far beyond the run: the ban on EOS and the stop ids holds at every step
    "t=1 bias": (dict(logit_bias=SPREAD_BIAS, min_tokens=10**6, stop_token_ids=[3, 4]), None),
    "t=.7 p=.95 lp5": (
        dict(temperature=0.7, top_p=0.95, logprobs=True, top_logprobs=5, logprobs_mode="processed"),
        None,
    ),
    "t=.7 p=.95 lp5 raw": (
        dict(temperature=0.7, top_p=0.95, logprobs=True, top_logprobs=5, logprobs_mode="raw"),
        None,
    ),
    "t=1 lp5": (dict(temperature=1.0, logprobs=True, top_logprobs=5), None),
    "t=1 lp5 proc": (
        dict(temperature=1.0, logprobs=True, top_logprobs=5, logprobs_mode="processed"),
        None,
    ),
    "greedy lp5": (dict(temperature=0.0, logprobs=True, top_logprobs=5), None),
    "t=.7 k=50 lp5": (
        dict(temperature=0.7, top_k=50, logprobs=True, top_logprobs=5, logprobs_mode="processed"),
        None,
    ),
}
# issue 21's targets: each of these within 2x greedy, all stages within 4x
TARGET_STAGES = ("greedy", "t=1", "t=.7 p=.95", "t=1 freq/pres", "all stages")


def llm_like_logits(batch: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """A flat bulk plus a few dozen strong candidates per row, roughly like an LM head."""
    logits = torch.randn(batch, vocab, generator=generator) * 1.5
    strong = torch.randint(0, vocab, (batch, 32), generator=generator)
    boost = 9.0 + 2.5 * torch.randn(batch, 32, generator=generator)
    return logits.scatter_(1, strong, boost)


def median_ms_host(run: Callable[[], object], repeats: int, budget_s: float) -> float:
    run()  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def median_ms(
    run: Callable[[], object], repeats: int, budget_s: float, device: torch.device
) -> float:
    def synced() -> None:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return median_ms_host(synced, repeats, budget_s)


def sampler_step(
    batch: int, vocab: int, stage: str, device: torch.device
) -> tuple[Callable[[], object], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One `Sampler.sample` call on LM-like logits for rows of `stage` (repeatable), and the
    logits, prompts and histories it uses."""
    generator = torch.Generator().manual_seed(batch * 7 + vocab)
    logits = llm_like_logits(batch, vocab, generator).to(device)
    prompt = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=generator)
    history = torch.randint(0, vocab, (batch, HISTORY_LEN), generator=generator)
    sampler = Sampler(vocab, batch, device, eos_token_ids=[2])
    for row in range(batch):
        sampler.add_row(
            row,
            SamplingParams(**STAGES[stage][0]),
            seed=row,
            prompt_token_ids=prompt[row].tolist(),
            output_token_ids=history[row].tolist(),
        )
    keys = list(range(batch))
    return lambda: sampler.sample(logits, keys), logits, prompt, history


def ratio_to_greedy(
    batch: int,
    vocab: int,
    stage: str,
    repeats: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float, float]:
    """(stage ms, greedy ms, median of per-pair ratios), the two steps timed alternately so
    that a loaded machine's slow spells hit both."""
    steps = [sampler_step(batch, vocab, name, device)[0] for name in (stage, "greedy")]
    times: list[list[float]] = [[], []]
    for step in steps:
        step()
    for _ in range(repeats):
        for step, spent in zip(steps, times, strict=True):
            start = clock()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            spent.append(1e3 * (clock() - start))
    ratios = [a / b for a, b in zip(*times, strict=True)]
    medians = [statistics.median(t) for t in times]
    return medians[0], medians[1], statistics.median(ratios)


def bench_case(
    batch: int, vocab: int, stage: str, repeats: int, device: torch.device = CPU
) -> tuple[float, float | None]:
    hf_chain = STAGES[stage][1]
    step, logits, prompt, history = sampler_step(batch, vocab, stage, device)
    ours = median_ms(step, repeats, 10.0, device)
    if hf_chain is None:
        return ours, None
    chain = LogitsProcessorList(hf_chain())
    input_ids = torch.cat([prompt, history], dim=1).to(device)

    def hf_step() -> torch.Tensor:
        scores = chain(input_ids, logits)
        return torch.multinomial(torch.softmax(scores, dim=-1), 1)

    return ours, median_ms(hf_step, repeats, 20.0, device)


def decode_step_ms(batch: int, context: int, repeats: int) -> tuple[float, int]:
    """Median ms of one demo-large decode forward (logits included) for `batch` sequences of
    `context` cached tokens, and the model's vocabulary size."""
    loaded = load_model("demo-large", dtype="float32", device="cpu")
    block_size = 16
    blocks_per_seq = -(-(context + 1) // block_size)
    caches = allocate_kv_cache(
        loaded.config, batch * blocks_per_seq + 1, block_size, torch.float32, torch.device("cpu")
    )
    tables = [
        list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)) for i in range(batch)
    ]
    input_ids = torch.randint(1000, loaded.config.vocab_size, (batch,))
    positions = torch.full((batch,), context)

    def step() -> torch.Tensor:
        attn = AttentionMetadata.build([1] * batch, [context + 1] * batch, tables, block_size)
        with torch.inference_mode():
            hidden = loaded.model(input_ids, positions, caches, attn)
            return loaded.model.compute_logits(hidden)

    return median_ms_host(step, repeats, budget_s=30.0), loaded.config.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="where logits and sampler live (cuda)")
    parser.add_argument("--targets", action="store_true", help="issue 21's bounded stages")
    parser.add_argument(
        "--stage", action="append", choices=tuple(STAGES), help="--targets' table for this stage"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (0: keep)")
    parser.add_argument(
        "--clock", choices=("wall", "thread"), default="wall", help="--targets: what times a step"
    )
    parser.add_argument(
        "--decode-step", action="store_true", help="all stages vs a demo-large decode step, B=64"
    )
    args = parser.parse_args()
    if args.decode_step:
        forward, vocab = decode_step_ms(64, 256, args.repeats)
        sampling, _ = bench_case(64, vocab, "all stages", args.repeats)
        print(
            f"demo-large decode forward, B=64, 256-token contexts: {forward:.1f} ms; sampler, "
            f"all stages: {sampling:.2f} ms = {100 * sampling / forward:.1f}% of the forward"
        )
        return
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.targets or args.stage:
        clock = time.thread_time if args.clock == "thread" else time.perf_counter
        targets(device, args.repeats, clock, args.stage or TARGET_STAGES[1:])
        return
    if args.quick:
        cases = [(64, 131072, s) for s in ("all stages", "greedy", "temperature", "top_p")]
        cases += [(b, v, "all stages") for b, v in ((1, 32768), (8, 131072), (256, 32768))]
    else:
        cases = [
            (batch, vocab, stage)
            for vocab in (32768, 131072)
            for batch in (1, 8, 64, 256)
            for stage in STAGES
        ]
    print(f"torch {torch.__version__}, {where(device)}, float32 logits on {device.type}")
    print("| batch |  vocab | stage       | winnow ms |     HF ms |  HF / winnow |")
    print("|------:|-------:|:------------|----------:|----------:|-------------:|")
    for batch, vocab, stage in cases:
        ours, theirs = bench_case(batch, vocab, stage, args.repeats, device)
        hf = f"{theirs:9.2f}" if theirs is not None else f"{'-':>9}"
        ratio = f"{theirs / ours:11.1f}x" if theirs is not None else f"{'-':>12}"
        row = f"| {batch:>5} | {vocab:>6} | {stage:<11} | {ours:9.2f} | {hf} | {ratio} |"
        print(row, flush=True)


def where(device: torch.device) -> str:
    return f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)


def targets(
    device: torch.device, repeats: int, clock: Callable[[], float], stages: Sequence[str]
) -> None:
    """Issue 21's table: each stage against greedy, timed alternately in this run."""
    print(f"torch {torch.__version__}, {where(device)}, float32 logits on {device.type}")
    print(f"clock: {clock.__name__}; winnow from {Path(winnow.__file__).parent.parent}")
    print("| batch |  vocab | stage         |  ms | greedy ms | median ratio | target |")
    print("|------:|-------:|:--------------|----:|----------:|-------------:|-------:|")
    for batch in (64, 256):
        for stage in stages:
            ours, greedy, ratio = ratio_to_greedy(batch, 131072, stage, repeats, device, clock)
            bound = 4 if stage == "all stages" else 2
            target = f"<= {bound}x" if stage in TARGET_STAGES else "-"
            row = f"| {batch:>5} | 131072 | {stage:<13} | {ours:.2f} | {greedy:.2f} | "
            print(row + f"{ratio:.2f}x | {target} |", flush=True)


if __name__ == "__main__":
    main()
