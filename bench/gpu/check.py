"""GPU check parts, one per process (run by bench/gpu_check.sh; `--device cpu --dry-run` runs the
same code tiny on a CPU). Each part writes one JSON file.

    python bench/gpu/check.py correctness --device cuda --out results/correctness.json
    python bench/gpu/check.py speed --shape llama-3.1-8b --device cuda --out results/speed.json
    python bench/gpu/check.py offline --shape qwen2.5-0.5b --device cuda --out results/off.json
    python bench/gpu/check.py sampler --device cuda --out results/sampler.json
    python bench/gpu/check.py long_context --shape qwen2.5-0.5b --device cuda --out lc.json

Every JSON names its `device`; bench/gpu/report.py judges each part PASS / FAIL / MISSING.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from shapes import build_hf, hf_config, native_from, parameter_count, random_prompts

from winnow.config import EngineConfig
from winnow.engine.engine import LLMEngine
from winnow.engine.outputs import PositionLogprobs
from winnow.engine.request import GenerationRequest
from winnow.models import AttentionMetadata, LoadedModel, allocate_kv_cache
from winnow.sampling.params import SamplingParams
from winnow.sampling.sampler import Sampler

BF16_UNIT_ROUNDOFF = 2.0**-8
# A seeded run that parts from itself at another batch size, where rounding alone gave it less
# than this chance to, is a bug (a test at the 0.1% level).
DIVERGENCE_ALPHA = 1e-3


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_for(loaded: LoadedModel, **overrides: object) -> LLMEngine:
    return LLMEngine(loaded, EngineConfig(model="random", **overrides))  # type: ignore[arg-type]


def graphs_captured(engine: LLMEngine) -> bool:
    """Whether decode steps replay CUDA graphs (not the same buffers run eagerly)."""
    graphs = engine.runner.decode_graphs
    return graphs is not None and graphs.capture


def run_requests(
    engine: LLMEngine, requests: list[GenerationRequest], time_limit: float = float("inf")
) -> tuple[dict[str, list[int]], float]:
    """All requests submitted at once, stepped to the end (or the time limit): tokens per
    request and seconds taken."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    start = time.perf_counter()
    for request in requests:
        engine.add_request(request)
    while engine.has_work and time.perf_counter() - start < time_limit:
        for output in engine.step():
            for choice in output.choices:
                tokens[output.request_id].extend(choice.token_ids)
    elapsed = time.perf_counter() - start
    for request in requests:
        if request.request_id in engine.requests:
            engine.abort(request.request_id)
    return tokens, elapsed


# --------------------------------------------------------------------------- correctness


def native_logits(loaded: LoadedModel, prompt: list[int], decoded: list[int]) -> torch.Tensor:
    """Prefill `prompt`, then decode `decoded` one token at a time (teacher forcing) on a paged
    cache: float32 logits [len(prompt) + len(decoded), vocab] on the CPU."""
    device, block = loaded.device, 16
    total = len(prompt) + len(decoded)
    table = list(range(1, 2 + total // block))
    caches = allocate_kv_cache(loaded.config, len(table) + 1, block, loaded.dtype, device)
    rows = []
    steps = [prompt] + [[t] for t in decoded]
    done = 0
    for chunk in steps:
        end = done + len(chunk)
        attn = AttentionMetadata.build([len(chunk)], [end], [table], block, device)
        ids = torch.tensor(chunk, device=device)
        positions = torch.arange(done, end, device=device)
        hidden = loaded.model(ids, positions, caches, attn)
        rows.append(loaded.model.compute_logits(hidden).cpu())
        done = end
    return torch.cat(rows)


def correctness(args: argparse.Namespace) -> dict[str, object]:
    shape, device = args.shape, args.device
    layers = int(hf_config(shape).num_hidden_layers)
    # a layer rounds about ten activations to bf16 (q/k/v, attention, o_proj, residual, norm,
    # gate/up, activation, down, residual), each off by at most u relative; independent errors
    # add in quadrature over 10 L + 1 (the logits) roundings; x2 for the weights' own rounding
    tolerance = 2 * BF16_UNIT_ROUNDOFF * (10 * layers + 1) ** 0.5
    reference = build_hf(shape, "cpu", torch.float32, seed=1)
    tokens = random_prompts(1, [48], reference.config.vocab_size, seed=2)[0]
    prompt, decoded = tokens[:40], tokens[40:]
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[0].float()
    hf_gpu = reference.to(device=device, dtype=torch.bfloat16)
    ours = native_from(hf_gpu, device, torch.bfloat16)
    got = native_logits(ours, prompt, decoded)
    rel_rms = float((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt())
    top1 = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    logits = {
        "rel_rms_error": rel_rms,
        "tolerance": tolerance,
        "top1_agreement": top1,
        "pass": rel_rms <= tolerance,
    }

    # greedy: Winnow's engine vs HF generate, both on the device in bf16, same weights
    new_tokens = 8 if args.dry_run else 32
    with torch.no_grad():
        hf_out = hf_gpu.generate(
            torch.tensor([prompt], device=device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    hf_tokens = hf_out.sequences[0, len(prompt) :].tolist()
    engine = engine_for(ours, max_num_seqs=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ours_tokens = run_requests(engine, [GenerationRequest("g", prompt, greedy)])[0]["g"]
    same = next(
        (i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens, strict=True)) if a != b), None
    )
    near_tie = None
    if same is not None:  # a bf16 near-tie at the first divergence is not an error
        scores = hf_out.scores[same][0].float()
        top2 = scores.topk(2).values
        near_tie = float((top2[0] - top2[1]) / scores.pow(2).mean().sqrt()) <= tolerance
    greedy_result = {
        "tokens": new_tokens,
        "first_divergence": same,
        "divergence_at_near_tie": near_tie,
        "pass": same is None or bool(near_tie),
    }

    # seeded sampling at batch 1 and batch 8: identical, or parted where rounding could part them
    seeded = SamplingParams(
        temperature=1.0,
        seed=1234,
        max_tokens=new_tokens,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=20,
    )
    alone = run_logprobs(engine, [GenerationRequest("s", prompt, seeded)])["s"]
    others = [
        GenerationRequest(
            f"o{i}",
            random_prompts(1, [20 + 7 * i], ours.config.vocab_size, seed=10 + i)[0],
            SamplingParams(temperature=1.0, seed=i, max_tokens=new_tokens, ignore_eos=True),
        )
        for i in range(7)
    ]
    mixed = run_logprobs(
        engine, others[:3] + [GenerationRequest("s", prompt, seeded)] + others[3:]
    )["s"]
    invariant = seeded_invariance(alone, mixed)
    return {
        "shape": shape,
        "kernels": ours.kernels.description,
        "logits_vs_cpu_fp32": logits,
        "greedy_vs_hf_generate": greedy_result,
        "seeded_batch_invariant": invariant,
    }


def run_logprobs(
    engine: LLMEngine, requests: list[GenerationRequest]
) -> dict[str, list[PositionLogprobs]]:
    """All requests at once, stepped to the end: the logprobs of each position per request
    (empty lists for requests that did not ask)."""
    positions: dict[str, list[PositionLogprobs]] = {r.request_id: [] for r in requests}
    for request in requests:
        engine.add_request(request)
    while engine.has_work:
        for output in engine.step():
            for choice in output.choices:
                positions[output.request_id].extend(choice.logprobs or [])
    return positions


def seeded_invariance(
    alone: list[PositionLogprobs], mixed: list[PositionLogprobs]
) -> dict[str, object]:
    """Compare one seeded request decoded alone and among 7 others.

    cuBLAS picks other kernels for 1 and 8 rows, so bf16 logits differ in the last bits and a
    sample may legitimately part where two tokens' cumulative probabilities straddle the
    seeded draw. With shared randomness, a step whose distributions p, q differ parts with
    chance at most 2 TV(p, q) = sum |p - q|; from the top 20 logprobs that sum is bounded by
    the top tokens' differences plus both runs' mass outside them. A parting whose summed bound
    up to it is below DIVERGENCE_ALPHA is not rounding: it fails.
    """
    tokens_alone = [p.sampled.token_id for p in alone]
    tokens_mixed = [p.sampled.token_id for p in mixed]
    parted = next(
        (i for i, (a, b) in enumerate(zip(tokens_alone, tokens_mixed, strict=True)) if a != b),
        None,
    )
    last = len(alone) - 1 if parted is None else parted
    bound = 0.0
    gap = 0.0
    for a, b in zip(alone[: last + 1], mixed[: last + 1], strict=True):
        pa = {t.token_id: math.exp(t.logprob) for t in a.top}
        pb = {t.token_id: math.exp(t.logprob) for t in b.top}
        bound += sum(abs(pa.get(k, 0.0) - pb.get(k, 0.0)) for k in pa.keys() | pb.keys())
        bound += max(0.0, 1.0 - sum(pa.values())) + max(0.0, 1.0 - sum(pb.values()))
        gap = max(gap, abs(a.sampled.logprob - b.sampled.logprob))
    return {
        "tokens": len(alone),
        "identical": parted is None,
        "first_divergence": parted,
        "divergence_chance_bound": min(bound, 1.0),
        "alpha": DIVERGENCE_ALPHA,
        "max_sampled_logprob_gap": gap,
        "pass": len(alone) == len(mixed) and (parted is None or bound >= DIVERGENCE_ALPHA),
    }


# --------------------------------------------------------------------------- speed


def device_peaks(device: str) -> dict[str, float]:
    """Measured here, in the same run: copy bandwidth (bytes read + written per second) and
    dense bf16 matmul FLOP/s."""
    size = (1 << 30) if device.startswith("cuda") else (1 << 24)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    src = torch.empty(size // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), device, 10)
    n = 8192 if device.startswith("cuda") else 512
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    mm_s = median_seconds(lambda: a @ b, device, 10)
    return {"copy_bytes_per_s": 2 * size / copy_s, "matmul_flop_per_s": 2 * n**3 / mm_s}


def median_seconds(run: Callable[[], object], device: str, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(args: argparse.Namespace) -> dict[str, object]:
    shape, device = args.shape, args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    peaks = device_peaks(device)
    params = parameter_count(shape)
    hf = build_hf(shape, device, dtype)
    loaded = native_from(hf, device, dtype)
    del hf
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    vocab, element = loaded.config.vocab_size, torch.empty((), dtype=dtype).element_size()
    engine = engine_for(loaded, max_num_seqs=8 if args.dry_run else 256)

    # single stream: bytes read per token are about the weights (the embedding row aside)
    out_len = 16 if args.dry_run else 256
    params_single = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    prompt = random_prompts(1, [128], vocab, seed=3)[0]
    engine.add_request(GenerationRequest("warm", prompt, params_single))
    while engine.has_work:
        engine.step()
    engine.add_request(GenerationRequest("one", prompt, params_single))
    engine.step()  # prefill and first token
    start = time.perf_counter()
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    single_tok_s = steps / (time.perf_counter() - start)
    weight_bytes = (params - loaded.config.vocab_size * loaded.config.hidden_size) * element
    if loaded.config.tie_word_embeddings:
        weight_bytes += loaded.config.vocab_size * loaded.config.hidden_size * element
    roofline_tok_s = peaks["copy_bytes_per_s"] / weight_bytes

    # concurrent decodes: time decode-only steps once every request has its first token
    batch = 8 if args.dry_run else 256
    out_len = 12 if args.dry_run else 64
    requests = [
        GenerationRequest(
            f"c{i}",
            random_prompts(1, [128], vocab, seed=100 + i)[0],
            SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True),
        )
        for i in range(batch)
    ]
    for request in requests:
        engine.add_request(request)
    started: set[str] = set()
    while len(started) < batch:
        started.update(output.request_id for output in engine.step())
    timed = out_len // 2
    start = time.perf_counter()
    for _ in range(timed):
        engine.step()
    step_s = (time.perf_counter() - start) / timed
    while engine.has_work:
        engine.step()
    matmul_params = params - (
        0 if loaded.config.tie_word_embeddings else vocab * loaded.config.hidden_size
    )
    context = 128 + out_len // 2
    attention_flop = (
        4 * loaded.config.num_layers * loaded.config.num_heads * loaded.config.head_dim * context
    )
    step_flop = batch * (2 * matmul_params + attention_flop)
    return {
        "shape": shape,
        "parameters": params,
        "kernels": loaded.kernels.description,
        "decode_graphs": graphs_captured(engine),
        "peaks": peaks,
        "single_stream": {
            "tok_per_s": single_tok_s,
            "bandwidth_roofline_tok_per_s": roofline_tok_s,
            "fraction_of_roofline": single_tok_s / roofline_tok_s,
        },
        "concurrent_decode": {
            "batch": batch,
            "step_ms": 1e3 * step_s,
            "tok_per_s": batch / step_s,
            "fraction_of_compute_roofline": step_flop / step_s / peaks["matmul_flop_per_s"],
        },
    }


def long_context(args: argparse.Namespace) -> dict[str, object]:
    """Single-stream decode with 8k, 16k and 32k tokens of context against 128 (the dry run:
    a few hundred): tok/s at each. Decode attention that does not split a long context over
    the SMs runs it several times slower than its KV bytes explain."""
    shape, device = args.shape, args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    contexts = [128, 256, 512] if args.dry_run else [128, 8192, 16384, 32000]
    out_len = 8 if args.dry_run else 64
    hf = build_hf(shape, device, dtype)
    loaded = native_from(hf, device, dtype)
    del hf
    engine = engine_for(loaded, max_num_seqs=4, max_model_len=contexts[-1] + out_len + 1)
    vocab = loaded.config.vocab_size
    rates: dict[str, float] = {}
    for context in [contexts[0], *contexts]:  # the first run warms up; the second counts
        prompt = random_prompts(1, [context], vocab, seed=context)[0]
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        engine.add_request(GenerationRequest(f"lc{context}", prompt, params))
        while not any(o.request_id == f"lc{context}" for o in engine.step()):
            pass  # prefill, chunked, until the first token
        sync(device)
        start = time.perf_counter()
        steps = 0
        while engine.has_work:
            engine.step()
            steps += 1
        rates[str(context)] = steps / (time.perf_counter() - start)
    short, longest = rates[str(contexts[0])], rates[str(contexts[-1])]
    return {
        "shape": shape,
        "kernels": loaded.kernels.description,
        "decode_graphs": graphs_captured(engine),
        "tok_per_s_by_context": rates,
        "longest_vs_shortest": longest / short,
    }


def offline(args: argparse.Namespace) -> dict[str, object]:
    """nano-vllm's workload: 256 requests, input and output lengths drawn from 100..1024,
    ignore_eos; Winnow's engine on all of it, HF generate on a padded batch of the first ones
    (both under a time limit; tokens past it are not counted)."""
    shape, device = args.shape, args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    count, low, high = (8, 10, 40) if args.dry_run else (256, 100, 1024)
    rng = random.Random(0)
    in_lens = [rng.randint(low, high) for _ in range(count)]
    out_lens = [rng.randint(low, high) for _ in range(count)]
    hf = build_hf(shape, device, dtype)
    loaded = native_from(hf, device, dtype)
    prompts = random_prompts(count, in_lens, loaded.config.vocab_size, seed=5)
    requests = [
        GenerationRequest(
            f"n{i}", p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        )
        for i, (p, n) in enumerate(zip(prompts, out_lens, strict=True))
    ]
    engine = engine_for(loaded)
    run_requests(engine, requests[:2])  # warm-up
    tokens, seconds = run_requests(engine, requests, time_limit=args.time_limit)
    ours = sum(len(t) for t in tokens.values()) / seconds

    hf_count = min(count, 8 if args.dry_run else 64)
    width = max(in_lens[:hf_count])
    padded = torch.zeros(hf_count, width, dtype=torch.long)
    mask = torch.zeros(hf_count, width, dtype=torch.long)
    for row, prompt in enumerate(prompts[:hf_count]):
        padded[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(
            padded.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max(out_lens[:hf_count]),
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            max_time=args.time_limit / 2,
        )
    sync(device)
    hf_seconds = time.perf_counter() - start
    generated = out.shape[1] - width
    hf_tokens = sum(min(n, generated) for n in out_lens[:hf_count])
    return {
        "shape": shape,
        "kernels": loaded.kernels.description,
        "requests": count,
        "winnow": {
            "output_tokens": sum(len(t) for t in tokens.values()),
            "of": sum(out_lens),
            "seconds": seconds,
            "tok_per_s": ours,
        },
        "hf_generate": {
            "requests": hf_count,
            "output_tokens": hf_tokens,
            "seconds": hf_seconds,
            "tok_per_s": hf_tokens / hf_seconds,
        },
        "ratio": ours / (hf_tokens / hf_seconds),
    }


def sampler(args: argparse.Namespace) -> dict[str, object]:
    """The full sampler step (`Sampler.sample`, host copy included) at B x V."""
    device = torch.device(args.device)
    batch, vocab = (16, 4096) if args.dry_run else (256, 131072)
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, vocab, generator=generator) * 2).to(device)
    cases = {
        "greedy": dict(temperature=0.0),
        "temperature": dict(temperature=0.8),
        "temperature_1": dict(temperature=1.0),  # the OpenAI SDK's default; issue 21: <= 0.15 ms
        "temperature_penalties": dict(temperature=1.0, frequency_penalty=0.5, presence_penalty=0.3),
        "top_k_top_p": dict(temperature=0.8, top_k=50, top_p=0.9),
        "all_stages": dict(
            temperature=0.8,
            top_k=50,
            top_p=0.9,
            min_p=0.05,
            repetition_penalty=1.1,
            frequency_penalty=0.2,
            presence_penalty=0.1,
        ),
    }
    result: dict[str, object] = {"batch": batch, "vocab": vocab}
    for name, params in cases.items():
        engine_sampler = Sampler(vocab, batch, device, eos_token_ids=[2])
        for row in range(batch):
            engine_sampler.add_row(
                row,
                SamplingParams(**params),  # type: ignore[arg-type]
                seed=row,
                prompt_token_ids=list(range(3, 515)),
                output_token_ids=list(range(600, 728)),
            )
        keys = list(range(batch))
        result[name + "_ms"] = 1e3 * median_seconds(
            lambda s=engine_sampler, k=keys: s.sample(logits, k),
            args.device,
            3 if args.dry_run else 20,
        )
    result["temperature_1_distribution"] = temperature_one(device, batch, vocab)
    return result


def temperature_one(device: torch.device, batch: int, vocab: int) -> dict[str, object]:
    """Seeded draws at temperature 1 on the device follow softmax(logits): four likely tokens
    (the rest e^-30 below them) drawn batch x 64 times, each token's frequency within 5
    standard errors sqrt(p (1 - p) / draws) of its probability."""
    likely = torch.tensor([1.0, 0.5, 0.0, -0.5], dtype=torch.float64)
    ids = [7, 11, 13, 17]  # none of them the EOS below
    row = torch.full((vocab,), -30.0, dtype=torch.float64)
    row[ids] = likely
    expected = torch.softmax(row, 0)[ids]
    logits = row.to(torch.float32).expand(batch, vocab).contiguous().to(device)
    engine_sampler = Sampler(vocab, batch, device, eos_token_ids=[2])
    for key in range(batch):
        engine_sampler.add_row(key, SamplingParams(temperature=1.0), seed=key, prompt_token_ids=[])
    counts = torch.zeros(vocab, dtype=torch.float64)
    rounds = 64
    for _ in range(rounds):
        drawn = engine_sampler.sample(logits, list(range(batch))).token_ids.cpu()
        counts += torch.bincount(drawn, minlength=vocab).double()
    draws = batch * rounds
    frequency = counts[ids] / draws
    standard_error = (expected * (1 - expected) / draws).sqrt()
    worst = float(((frequency - expected).abs() / standard_error).max())
    return {
        "draws": draws,
        "expected": expected.tolist(),
        "observed": frequency.tolist(),
        "outside_likely": float(draws - counts[ids].sum()),
        "worst_standard_errors": worst,
        "pass": worst <= 5.0 and float(counts[ids].sum()) == draws,
    }


PARTS = {
    "correctness": correctness,
    "speed": speed,
    "offline": offline,
    "sampler": sampler,
    "long_context": long_context,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU check)")
    parser.add_argument("--time-limit", type=float, default=90.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {"device": args.device, **PARTS[args.part](args)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
