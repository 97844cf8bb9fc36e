"""The whole engine on the CUDA path's kernels (`--kernels triton`), run on the CPU under Triton's
interpreter: decode steps through the CUDA-graph path's buckets and padding (eager here), split
counts fixed per bucket, and no Triton variant launched that the start-up warm-up did not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tests.engine.helpers import run_all  # noqa: E402
from tests.kernels.test_decode_graphs import padding_rows_write_only_block_zero  # noqa: E402
from tests.kernels.triton_launches import recorded_launches  # noqa: E402
from winnow.config import EngineConfig  # noqa: E402
from winnow.engine.decode_graphs import DecodeGraphs  # noqa: E402
from winnow.engine.engine import LLMEngine  # noqa: E402
from winnow.engine.request import GenerationRequest  # noqa: E402
from winnow.kernels import select_kernels  # noqa: E402
from winnow.kernels.triton import TritonAttentionBackend  # noqa: E402
from winnow.kernels.triton.decode import split_count  # noqa: E402
from winnow.models import AttentionMetadata, LoadedModel, load_model  # noqa: E402
from winnow.sampling.params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's CPU run")

BLOCK = 16
MAX_LEN = 512  # a graph bucket's decode then runs in two context splits (fewer to interpret)


@pytest.fixture(scope="module")
def triton_model(demo_model_dir: Path) -> LoadedModel:
    return load_model(str(demo_model_dir), device="cpu", kernels="triton")


def requests(count: int, prompt: int, stride: int) -> list[GenerationRequest]:
    """Greedy requests of different prompt and output lengths: the decode batch shrinks, the
    longest prompt finishing first (so the block-table width shrinks too)."""
    return [
        GenerationRequest(
            f"r{i}",
            [1000 + 37 * i + j for j in range(prompt + stride * i)],
            SamplingParams(temperature=0.0, max_tokens=2 * (count - i), ignore_eos=True),
        )
        for i in range(count)
    ]


def test_cuda_selection_captures_decode_graphs() -> None:
    """On CUDA the default kernels are Triton's, graph-safe: the engine captures decode steps
    unless --enforce-eager."""
    kernels = select_kernels("cuda", torch.bfloat16)
    assert type(kernels.attention) is TritonAttentionBackend
    assert kernels.decode_graphs
    assert select_kernels("cpu", torch.float32, choice="triton").decode_graphs
    assert not select_kernels("cuda", torch.bfloat16, choice="torch").decode_graphs


def test_captured_split_count_ignores_host_lengths(triton_model: LoadedModel) -> None:
    """A bucket's decode launches have one split count, from max_model_len and the core count,
    whatever lengths the batch brings (host or device): a captured grid is fixed, and each
    sequence's range comes from the device lengths."""
    config = EngineConfig(model="demo", max_num_seqs=4, num_kv_blocks=128, max_model_len=MAX_LEN)
    engine = LLMEngine(triton_model, config)
    graphs = engine.runner.decode_graphs
    assert graphs is not None
    backend = triton_model.kernels.attention
    assert isinstance(backend, TritonAttentionBackend)
    kv_heads = triton_model.config.num_kv_heads
    bound = graphs.max_blocks_per_seq * BLOCK
    for batch_lens in ([1, 2, 3], [40, 300, 7], [500, 5, 1]):
        batch = len(batch_lens)
        tables = torch.tensor([[1 + 32 * row + b for b in range(32)] for row in range(batch)])
        lens = torch.tensor(batch_lens)
        positions = lens - 1
        slots = tables[torch.arange(batch), positions // BLOCK] * BLOCK + positions % BLOCK
        with recorded_launches() as launches:
            ids = torch.zeros(batch, dtype=torch.long)
            graphs.run(ids, positions, slots, tables, lens, batch_lens)
        decodes = [launch for launch in launches if launch.kernel == "_decode_kernel"]
        splits = {launch.args["num_splits"] for launch in decodes}
        assert splits == {split_count(4, kv_heads, bound, backend.target_programs)}
    # outside a graph the host lengths choose: one split for short contexts
    short = AttentionMetadata.build([1], [3], [[1]], BLOCK)
    assert backend.decode_splits(1, short, engine.runner.kv_caches[0], None) == 1
    assert split_count(4, kv_heads, bound, backend.target_programs) > 1


def test_padding_rows_write_only_block_zero(triton_model: LoadedModel) -> None:
    """The decode kernel's own KV write (RoPE and the write folded into it) through a padded
    bucket: real rows' slots written, the padding row's only into block 0."""
    padding_rows_write_only_block_zero(triton_model)


def recorded_sizes(graphs: DecodeGraphs) -> list[int]:
    """The bucket of every decode step `graphs` runs from now on."""
    sizes: list[int] = []
    forward = graphs._forward
    graphs._forward = lambda size, host: sizes.append(size) or forward(size, host)  # type: ignore[method-assign]
    return sizes


def test_serving_launches_only_warmed_up_variants(triton_model: LoadedModel) -> None:
    """The Triton engine gives the torch reference's tokens, through DecodeGraphs' padded
    buckets (or, with --enforce-eager, plain steps with host-chosen splits), and every launch of
    its run, with varying batches, lengths, block-table widths and split counts, is of a variant
    its start-up warm-up launched: on a GPU none would compile while serving."""
    reference = load_model(triton_model.path.as_posix(), device="cpu", kernels="torch")
    for eager, stride in ((False, 20), (True, 130)):  # eager: contexts up to 2 splits long
        config = EngineConfig(
            model="demo", max_num_seqs=4, num_kv_blocks=64, max_model_len=MAX_LEN,
            enforce_eager=eager,
        )  # fmt: skip
        batch = requests(3, prompt=3, stride=stride)
        expected = run_all(LLMEngine(reference, config), batch)
        fresh = load_model(triton_model.path.as_posix(), device="cpu", kernels="triton")
        with recorded_launches() as warm:
            engine = LLMEngine(fresh, config)
        warmed = {(launch.kernel, launch.variant) for launch in warm}
        assert {kernel for kernel, _ in warmed} == {
            "_decode_kernel", "_merge_splits_kernel", "_prefill_kernel",
            "_rms_norm_kernel", "_rope_kv_kernel", "_silu_mul_kernel",
        }  # fmt: skip
        graphs = engine.runner.decode_graphs
        sizes: list[int] = []
        if eager:
            assert graphs is None
        else:
            assert graphs is not None and not graphs.capture and graphs.sizes == [1, 2, 4]
            sizes = recorded_sizes(graphs)
        with recorded_launches() as served:
            assert run_all(engine, batch) == expected
        assert set(sizes) == (set() if eager else {1, 2, 4})  # batch 3 padded to 4, then 2, 1
        assert {(launch.kernel, launch.variant) for launch in served} <= warmed
        # what the run varied, that would otherwise be specialised
        decodes = [launch.args for launch in served if launch.kernel == "_decode_kernel"]
        assert len({args["stride_table"] for args in decodes}) > 1 or not eager
        assert len({args["num_splits"] for args in decodes}) > 1 or not eager
        assert len({args["q_ptr"].shape[0] for args in decodes}) > 1
