"""Offline engine throughput vs Hugging Face `generate` on the same workload, in one run.

    .venv/bin/python bench/throughput.py --model demo-large --num-requests 32 \
        --input-len 128 --output-len 128 --runs 3

Prints output tokens/s of the Winnow engine (continuous batching, all requests submitted at once)
and of one batched `generate` call over the same prompts, their ratio, and single-stream decode
tokens/s of both. Medians over `--runs`; every run draws fresh prompts, so that no run is served
from the prefix cache the one before filled.

    .venv/bin/python bench/throughput.py --model smollm2 --temperature 1 --skip-hf --runs 5

`--temperature T` also times the engine sampling at T (each run alternating with a greedy run
on other fresh prompts of the same shape) and prints the median ratio of their throughputs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

from winnow.config import EngineConfig
from winnow.engine.engine import LLMEngine
from winnow.engine.request import GenerationRequest
from winnow.models import load_model
from winnow.sampling.params import SamplingParams


def make_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1000, vocab, (count, length), generator=generator).tolist()


def winnow_run(
    engine: LLMEngine, prompts: list[list[int]], output_len: int, temperature: float = 0.0
) -> float:
    """Seconds to generate `output_len` tokens for every prompt with continuous batching."""
    params = SamplingParams(temperature=temperature, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(f"bench-{start}-{i}", prompt, params))
    while engine.has_work:
        engine.step()
    return time.perf_counter() - start


def hf_run(model: torch.nn.Module, prompts: list[list[int]], output_len: int) -> float:
    """Seconds for one batched greedy `generate` over the same prompts (equal lengths, no pad)."""
    inputs = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(  # type: ignore[operator]
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=0,
        )
    return time.perf_counter() - start


def median_rate(
    run: Callable[[list[list[int]]], float], prompt_sets: list[list[list[int]]], tokens: int
) -> float:
    return statistics.median(tokens / run(prompts) for prompts in prompt_sets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo-large")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--single-output-len", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--temperature", type=float, help="also time sampling at T vs greedy")
    args = parser.parse_args()

    loaded = load_model(args.model, dtype="float32", device="cpu")
    config = EngineConfig(model=args.model, max_num_seqs=max(args.num_requests, 1))
    engine = LLMEngine(loaded, config)
    vocab = loaded.config.vocab_size
    prompt_sets = [
        make_prompts(args.num_requests, args.input_len, vocab, seed=run) for run in range(args.runs)
    ]
    warmup = make_prompts(2, args.input_len, vocab, seed=args.runs)
    singles = [prompts[:1] for prompts in prompt_sets]
    batch_tokens = args.num_requests * args.output_len
    single_tokens = args.single_output_len

    winnow_run(engine, warmup, 4)
    ours = median_rate(lambda p: winnow_run(engine, p, args.output_len), prompt_sets, batch_tokens)
    ours_single = median_rate(
        lambda p: winnow_run(engine, p, single_tokens), singles, single_tokens
    )
    print(f"model {args.model}, {torch.get_num_threads()} threads, medians of {args.runs} runs")
    print(
        f"winnow: {ours:8.1f} output tok/s ({args.num_requests} requests x "
        f"{args.input_len} in / {args.output_len} out); single stream {ours_single:6.1f} tok/s"
    )
    if args.temperature is not None:
        ratios = []
        for run in range(args.runs):
            prompts = make_prompts(args.num_requests, args.input_len, vocab, seed=1000 + run)
            sampled = winnow_run(engine, prompts, args.output_len, args.temperature)
            greedy = winnow_run(engine, [p[::-1] for p in prompts], args.output_len)
            ratios.append(greedy / sampled)
        print(
            f"winnow at temperature {args.temperature:g} / greedy throughput: "
            f"{statistics.median(ratios):.3f} (median of {args.runs} alternating runs)"
        )
    if args.skip_hf:
        return
    hf_model = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=torch.float32).eval()
    hf_run(hf_model, warmup, 4)
    theirs = median_rate(lambda p: hf_run(hf_model, p, args.output_len), prompt_sets, batch_tokens)
    theirs_single = median_rate(
        lambda p: hf_run(hf_model, p, single_tokens), singles, single_tokens
    )
    print(f"HF generate: {theirs:8.1f} output tok/s; single stream {theirs_single:6.1f} tok/s")
    single_ratio = ours_single / theirs_single
    print(f"ratio winnow / HF: batch {ours / theirs:.2f}x, single stream {single_ratio:.2f}x")


if __name__ == "__main__":
    main()
