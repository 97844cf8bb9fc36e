"""The C kernels against PyTorch: packed linear vs F.linear, paged decode vs the torch backend."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
import transformers

from tests.models.helpers import ARCHITECTURES, PagedRunner, make_hf_model, save_hf_model
from tests.tolerances import (
    UNIT_ROUNDOFF,
    assert_within,
    gamma,
    kv_cache_tolerance,
    linear_tolerance,
    logit_tolerance,
)
from winnow.kernels.cpu import cpu_kernels
from winnow.kernels.cpu import ops as cpu_ops
from winnow.kernels.cpu.ops import CpuAttentionBackend, CpuPointwise
from winnow.kernels.cpu.packed_linear import PackedLinear
from winnow.kernels.torch_attention import TorchAttentionBackend
from winnow.kernels.torch_ops import apply_rope
from winnow.models import AttentionMetadata, load_model

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs AVX2 and a C compiler")


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


ISAS = ["avx2", "avx512"] if cpu_kernels.available() and cpu_kernels.supports_avx512() else ["avx2"]


@pytest.fixture(params=ISAS, autouse=True)
def isa(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test runs on the AVX2 kernels, and again on the AVX-512 ones where this CPU has
    AVX-512F: an AVX-512 machine also tests what AVX2-only machines run."""
    default = cpu_kernels.use_avx512(request.param == "avx512")
    yield
    cpu_kernels.use_avx512(default)


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 12, 13, 25, 32, 300])
@pytest.mark.parametrize(("k", "n"), [(1, 1), (3, 17), (64, 16), (257, 40), (600, 33), (7, 80)])
def test_linear_matches_f_linear(threads: int, m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    packed = cpu_kernels.pack_weight(weight)
    assert packed.shape == (-(-n // 16), k, 16)
    # summation order differs from the BLAS's: fp32 rounding only
    got = cpu_kernels.linear(x, packed, n, None)
    assert_within(got, F.linear(x, weight), linear_tolerance(x, weight))
    got = cpu_kernels.linear(x, packed, n, bias)
    assert_within(got, F.linear(x, weight, bias), linear_tolerance(x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 13, 32])
@pytest.mark.parametrize(("k", "n"), [(3, 17), (257, 40), (600, 33)])
def test_16_bit_panels_give_the_fp32_panels_results(
    threads: int, dtype: torch.dtype, m: int, k: int, n: int
) -> None:
    """Panels of fp16/bf16 weights are widened exactly on load and summed in the same order as
    fp32 panels of the same values: the results are bit for bit the same."""
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    half, full = cpu_kernels.pack_weight(weight), cpu_kernels.pack_weight(weight.float())
    assert half.dtype == dtype and half.shape == full.shape
    for b in (None, bias):
        assert torch.equal(cpu_kernels.linear(x, half, n, b), cpu_kernels.linear(x, full, n, b))
    wide = weight.float()
    got = cpu_kernels.linear(x, half, n, None)
    assert_within(got, x @ wide.T, linear_tolerance(x, wide))


def test_linear_reads_a_strided_input() -> None:
    wide = torch.randn(9, 300)
    x = wide[:, 20:148]  # row stride 300, unit stride along k
    weight = torch.randn(50, 128)
    layer = PackedLinear(weight, None)
    assert_within(layer(x), F.linear(x, weight), linear_tolerance(x, weight))
    batched = torch.randn(2, 3, 128)
    assert_within(layer(batched), F.linear(batched, weight), linear_tolerance(batched, weight))


def test_linear_with_no_rows() -> None:
    packed = cpu_kernels.pack_weight(torch.randn(8, 4))
    assert cpu_kernels.linear(torch.empty(0, 4), packed, 8, None).shape == (0, 8)


@pytest.mark.parametrize("rows", [1, 3, 40, 700])
@pytest.mark.parametrize("d", [8, 13, 64, 200])
def test_rms_norm_matches_torch(threads: int, rows: int, d: int) -> None:
    gen = torch.Generator().manual_seed(rows * 7 + d)
    wide = torch.randn(rows, d + 5, generator=gen) * 3
    weight = torch.randn(d, generator=gen)
    for x in (wide[:, 2 : d + 2], wide[:, :d].contiguous().view(1, rows, d)):
        got = cpu_kernels.rms_norm(x, weight, 1e-5)
        assert got is not None and got.shape == x.shape
        # a sum of d squares, the eps, a reciprocal square root and two products
        bound = 2 * gamma(d + 4) * F.rms_norm(x, (d,), weight, 1e-5).abs()
        assert_within(got, F.rms_norm(x, (d,), weight, 1e-5), bound)


def test_kernels_decline_layouts_they_cannot_read() -> None:
    heads = torch.randn(4, 3, 16)[:, :2]  # [4, 2, 16] view: two row strides
    assert cpu_kernels.rms_norm(heads, torch.ones(16), 1e-6) is None
    assert cpu_kernels.rms_norm(torch.randn(4, 16).double(), torch.ones(16), 1e-6) is None
    assert cpu_kernels.silu_mul(torch.randn(8, 4).t()) is None
    assert (
        cpu_kernels.rope(torch.randn(3, 4, 16)[:, :, :8], torch.ones(3, 1, 4), torch.ones(3, 1, 4))
        is None
    )


@pytest.mark.parametrize("rows", [1, 5, 600])
@pytest.mark.parametrize("half", [3, 16, 2816])
def test_silu_mul_matches_torch(threads: int, rows: int, half: int) -> None:
    gen = torch.Generator().manual_seed(rows + half)
    gate_up = torch.randn(rows, 2 * half, generator=gen) * 6  # reaches the saturated ends
    expected = F.silu(gate_up[:, :half]) * gate_up[:, half:]
    got = cpu_kernels.silu_mul(gate_up)
    assert got is not None
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("tokens", "heads", "d"), [(1, 2, 8), (7, 16, 64), (300, 8, 24), (5, 3, 6)]
)
def test_rope_matches_torch(threads: int, tokens: int, heads: int, d: int) -> None:
    gen = torch.Generator().manual_seed(tokens + heads + d)
    fused = torch.randn(tokens, (heads + 3) * d, generator=gen)  # q is a view into a qkv row
    q = fused[:, d : (heads + 1) * d].view(tokens, heads, d)
    angles = torch.randn(tokens, 1, d // 2, generator=gen) * 10
    cos, sin = angles.cos(), angles.sin()
    got = cpu_kernels.rope(q, cos, sin)
    assert got is not None and got.is_contiguous()
    torch.testing.assert_close(got, apply_rope(q, cos, sin))


def random_cache(
    lens: list[int], block_size: int, hkv: int, d: int, seed: int
) -> tuple[torch.Tensor, list[list[int]]]:
    """A filled fp32 cache and shuffled, non-contiguous block tables for sequences of `lens`."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=gen)
    free = list(range(1, num_blocks))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    return cache, tables


@pytest.mark.parametrize(
    ("hq", "hkv", "d"), [(4, 4, 8), (8, 2, 64), (6, 3, 24), (2, 1, 128), (10, 5, 16)]
)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(
    "lens", [[1, 7, 16, 33, 2, 70], [70], [7, 33]], ids=["batch-6", "batch-1", "batch-2"]
)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_decode_matches_torch(
    threads: int,
    hq: int,
    hkv: int,
    d: int,
    window: int | None,
    lens: list[int],
    kv_dtype: torch.dtype,
) -> None:
    """Small batches split their kv heads across threads; large ones do not. Half-precision
    caches are widened on load exactly as the torch backend widens them."""
    block_size = 4
    cache, tables = random_cache(lens, block_size, hkv, d, seed=hq + d)
    cache = cache.to(kv_dtype)
    attn = AttentionMetadata.build([1] * len(lens), lens, tables, block_size)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(d))
    expected = TorchAttentionBackend().decode(q, cache, attn, None, window)
    got = CpuAttentionBackend().decode(q, cache, attn, None, window)
    assert_within(got, expected, decode_tolerance(q, cache, tables, lens, hkv))


def decode_tolerance(
    q: torch.Tensor, cache: torch.Tensor, tables: list[list[int]], lens: list[int], hkv: int
) -> torch.Tensor:
    """Per sequence [B, 1, 1], the bound on two fp32 evaluations of one decode attention: a
    score q . k over d terms is off by at most E = gamma(d) scale sum|q_c k_c|; a softmax weight
    then by a relative 2E plus its normalising sum's gamma(n) and a few roundings; the output
    sum over n values by gamma(n) sum p|v| on top. Each evaluation is within
    (2E + 2 gamma(n) + 4u) max|v| of the exact output; two are within twice that."""
    d = q.shape[-1]
    group = q.shape[1] // hkv
    bounds = []
    for row, (table, n) in enumerate(zip(tables, lens, strict=True)):
        keys, values = (cache[i][table].flatten(0, 1)[:n].float() for i in (0, 1))
        q_abs = q[row].abs().view(hkv, group, d)
        sums = torch.einsum("hgd,nhd->hgn", q_abs, keys.abs())
        err = gamma(d) * d**-0.5 * float(sums.max())
        per_eval = (2 * err + 2 * gamma(n) + 4 * UNIT_ROUNDOFF[torch.float32]) * values.abs().max()
        bounds.append(2 * per_eval)
    return torch.stack(bounds).view(-1, 1, 1)


def test_paged_decode_inside_a_mixed_batch() -> None:
    """Decodes beside a fresh prefill and a chunked prefill: the C kernel serves only the decodes,
    and the whole forward equals the torch backend's."""
    hq, hkv, d, block_size = 8, 4, 16, 4
    query_lens, lens = [1, 5, 1, 3], [9, 5, 30, 12]
    cache, tables = random_cache(lens, block_size, hkv, d, seed=5)
    attn = AttentionMetadata.build(query_lens, lens, tables, block_size)
    gen = torch.Generator().manual_seed(9)
    tokens = sum(query_lens)
    q, k, v = (torch.randn(tokens, h, d, generator=gen) for h in (hq, hkv, hkv))
    expected = TorchAttentionBackend().forward(q, k, v, cache.clone(), attn)
    fresh = AttentionMetadata.build(query_lens, lens, tables, block_size)
    got = CpuAttentionBackend().forward(q, k, v, cache.clone(), fresh)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2"])
def test_model_with_kernels_matches_without(
    arch: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Same checkpoint loaded twice: the packed projections, packed (tied) head, C norms, RoPE,
    MLP activation and decode attention give PyTorch's logits through a prefill and several
    batched decode steps."""
    hf = make_hf_model(arch, seed=11)
    path = save_hf_model(hf, tmp_path_factory.mktemp(arch))
    native = load_model(str(path))
    plain = load_model(str(path), cpu_kernels_enabled=False)
    assert isinstance(native.model.layers[0].mlp.down_proj, PackedLinear)
    assert isinstance(native.model.lm_head, PackedLinear)
    assert isinstance(native.kernels.pointwise, CpuPointwise)
    assert isinstance(plain.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert native.model.lm_head.packed.dtype == torch.float32  # random fp32 weights
    runners = [PagedRunner(native), PagedRunner(plain)]
    prompts = [("a", [5, 17, 3, 88, 42, 9, 1]), ("b", [7, 7, 2])]
    steps = [prompts] + [[("a", [t]), ("b", [t + 1])] for t in (11, 23, 40, 2)]
    for step in steps:
        got, expected = (runner.step(step) for runner in runners)
        for a, b in zip(got, expected, strict=True):
            assert_within(a, b, logit_tolerance(hf))


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_decode_stack_matches_the_per_op_path(
    arch: str,
    kv_dtype: torch.dtype,
    threads: int,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch,
) -> None:
    """Decode-only steps go through the C decoder stack, and give the per-op kernels' logits and
    caches: bit for bit, as it runs the same kernels in the same order and rounds keys/values to
    a half-precision cache as torch does, except that the per-op path normalises q/k of several
    tokens (qk norm) with PyTorch. Sequences outgrow the sliding window and a mixed step (prefill
    beside decodes) in between takes the per-op path."""
    hf = make_hf_model(arch, seed=5)
    path = save_hf_model(hf, tmp_path_factory.mktemp(arch))
    stacked, per_op = load_model(str(path)), load_model(str(path))
    per_op.kernels.layers.stack = None  # type: ignore[attr-defined]
    calls = []
    run_stack = cpu_kernels.decode_layers
    monkeypatch.setattr(cpu_kernels, "decode_layers", lambda *a: calls.append(a) or run_stack(*a))
    runners = [PagedRunner(stacked, kv_dtype=kv_dtype), PagedRunner(per_op, kv_dtype=kv_dtype)]
    steps = [[("a", [5, 17, 3, 88, 42, 9, 1]), ("b", [7, 7, 2])]]
    steps += [[("a", [t]), ("b", [t + 1])] for t in (11, 23, 40, 2, 61)]
    steps += [[("a", [8]), ("c", [4, 4, 19, 3]), ("b", [30])]]
    steps += [[("c", [t]), ("a", [t + 2]), ("b", [t + 5])] for t in (12, 50, 6)]
    steps += [[("b", [t])] for t in (33, 34)]
    decode_steps = sum(all(len(tokens) == 1 for _, tokens in step) for step in steps)
    exact = ARCHITECTURES[arch][0] is not transformers.Qwen3Config
    for step in steps:
        got, expected = (runner.step(step) for runner in runners)
        for a, b in zip(got, expected, strict=True):
            if exact:
                assert torch.equal(a, b)
            else:  # a key that differs in its last bit may round the other way in the cache
                half = kv_dtype != torch.float32
                assert_within(
                    a, b, kv_cache_tolerance(hf, kv_dtype) if half else logit_tolerance(hf)
                )
    assert len(calls) == decode_steps == 10
    if exact:
        for a, b in zip(runners[0].kv_caches, runners[1].kv_caches, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kv_cache(
    kv_dtype: torch.dtype, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A half-precision cache: the C kernels and the PyTorch path (chunked prefill and batched
    decode reading the rounded cache) agree with each other, and stay within the cache's
    rounding of the fp32-cache logits. The two half paths may round a key to different
    neighbours where their fp32 keys differ in the last bit, so they too are only as close as
    the rounding allows."""
    hf = make_hf_model("llama", seed=3)
    tolerance = kv_cache_tolerance(hf, kv_dtype)
    path = save_hf_model(hf, tmp_path_factory.mktemp("half-kv"))
    native, plain = load_model(str(path)), load_model(str(path), cpu_kernels_enabled=False)
    half = [PagedRunner(native, kv_dtype=kv_dtype), PagedRunner(plain, kv_dtype=kv_dtype)]
    full = PagedRunner(native)
    assert half[1].kv_caches[0].dtype == kv_dtype
    steps = [[("a", [5, 17, 3, 88, 42, 9, 1])], [("a", [11, 2, 60]), ("b", [7, 7, 2, 9])]]
    steps += [[("a", [t]), ("b", [t + 1])] for t in (23, 40, 2, 61)]
    started: set[str] = set()
    for step in steps:
        got, torch_path, reference = (runner.step(step) for runner in [*half, full])
        for (seq, _), a, b, c in zip(step, got, torch_path, reference, strict=True):
            assert_within(a, b, tolerance)
            assert_within(a, c, tolerance)
            # a first chunk attends to its own fresh keys; later ones read the rounded cache
            assert torch.equal(a, c) == (seq not in started)
            started.add(seq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_16_bit_checkpoint_keeps_16_bit_panels(
    arch: str, dtype: torch.dtype, tmp_path_factory: pytest.TempPathFactory, monkeypatch
) -> None:
    """A 16-bit checkpoint loads as fp32 on the CPU; its projections and head are packed back
    into 16-bit panels (every weight holds exactly), and prefill and decode steps give the same
    logits, bit for bit, as the same model packed in fp32."""
    model = make_hf_model(arch, seed=8).to(dtype)
    path = save_hf_model(model, tmp_path_factory.mktemp(f"{arch}-16-bit"))
    half = load_model(str(path))
    monkeypatch.setattr(cpu_ops, "lossless_weight_dtype", lambda weights: torch.float32)
    full = load_model(str(path))
    assert half.dtype == full.dtype == torch.float32
    for loaded, panels in ((half, dtype), (full, torch.float32)):
        packed = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
        assert len(packed) == 4 * len(loaded.model.layers) + 1
        assert all(m.packed.dtype == panels for m in packed)
        assert loaded.kernels.layers.stack is not None  # type: ignore[attr-defined]
    runners = [PagedRunner(half), PagedRunner(full)]
    steps = [[("a", [5, 17, 3, 88, 42, 9, 1]), ("b", [7, 7, 2])]]
    steps += [[("a", [t]), ("b", [t + 1])] for t in (11, 23, 40, 2)]
    for step in steps:
        got, expected = (runner.step(step) for runner in runners)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
