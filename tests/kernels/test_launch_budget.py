"""The launch budget of the CUDA kernel selection, counted on the CPU (see docs/kernels.md).

The model runs on the CPU with the kernels `select_kernels("cuda", ...)` picks, the Triton ones
under the interpreter. Every aten operation that does work (views and allocations launch
nothing) is counted by a TorchDispatchMode, every Triton kernel by a hook on the interpreter's
launch; a decoder layer's count is what runs between its module's entry and exit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from tests.models.helpers import PagedRunner, make_hf_model, save_hf_model  # noqa: E402
from winnow.kernels import select_kernels  # noqa: E402
from winnow.kernels.triton.backend import DEFAULT_TARGET_PROGRAMS  # noqa: E402
from winnow.models import LoadedModel, load_model  # noqa: E402
from winnow.models.llama import DecoderLayer  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="counts launches under Triton's interpreter, on the CPU"
)

# A decode step: qkv, o, gate_up and down projections; input and post-attention RMSNorm (each
# with the residual add before it); attention with RoPE on q and k and the KV write inside it
# (+1 merge launch when a long context is split, not reached here); SiLU x up.
LAUNCHES_PER_LAYER = 8
# A step with prompt tokens keeps RoPE with the KV write as a launch of its own before attention.
PREFILL_LAUNCHES_PER_LAYER = 9
# Operations that launch nothing: allocations and metadata.
FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "_unsafe_view", "detach", "alias"}


class LaunchCounter(TorchDispatchMode):
    """Names of the aten operations and Triton kernels launched, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if not func.is_view and name not in FREE_OPS:
            self.launches.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))


@contextmanager
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[LaunchCounter]:
    interpreted = triton.runtime.interpreter.InterpretedFunction
    launch = interpreted.run
    counter = LaunchCounter()

    def counted_launch(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        counter.launches.append(f"triton.{self.fn.__name__}")
        with _disable_current_modes():  # the interpreter's own tensor handling is no launch
            return launch(self, *args, **kwargs)

    monkeypatch.setattr(interpreted, "run", counted_launch)
    with counter:
        yield counter


def with_cuda_kernels(loaded: LoadedModel) -> LoadedModel:
    """Swap the CUDA selection's families into the model (its modules share one `Kernels`)."""
    cuda = select_kernels("cuda", torch.float32)
    cuda.attention.__dict__["target_programs"] = DEFAULT_TARGET_PROGRAMS  # asks no GPU
    assert cuda.rope_attention is not None, "the CUDA selection lost its fused RoPE + KV write"
    loaded.kernels.attention = cuda.attention
    loaded.kernels.pointwise = cuda.pointwise
    loaded.kernels.rope_attention = cuda.rope_attention
    return loaded


def load(arch: str, path: Path) -> LoadedModel:
    model_dir = save_hf_model(make_hf_model(arch), path)
    return load_model(str(model_dir), "float32", "cpu", cpu_kernels_enabled=False)


def per_layer_launches(loaded: LoadedModel, monkeypatch, step) -> list[list[str]]:  # type: ignore[no-untyped-def]
    runner = PagedRunner(loaded)
    runner.step(step[0])  # a prompt first, so the measured step has a cache to read
    layers: list[list[str]] = []
    with counting(monkeypatch) as counter:

        def enter(module: torch.nn.Module, args: object) -> None:
            layers.append([])
            counter.launches = layers[-1]

        def leave(module: torch.nn.Module, args: object, output: object) -> None:
            counter.launches = []

        handles = [m.register_forward_pre_hook(enter) for m in loaded.model.layers]
        handles += [m.register_forward_hook(leave) for m in loaded.model.layers]
        try:
            runner.step(step[1])
        finally:
            for handle in handles:
                handle.remove()
    return layers


@pytest.mark.parametrize(
    ("steps", "budget"),
    [
        (
            ([("a", [5, 9, 13, 2, 7]), ("b", [3, 4])], [("a", [8]), ("b", [6])]),
            LAUNCHES_PER_LAYER,
        ),
        (
            ([("a", [5, 9, 13, 2, 7])], [("a", [8, 11, 12]), ("b", [3, 4, 6])]),  # chunk + prompt
            PREFILL_LAUNCHES_PER_LAYER,
        ),
    ],
    ids=["decode", "prefill"],
)
def test_a_decoder_layer_stays_within_its_launch_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps, budget: int
) -> None:  # type: ignore[no-untyped-def]
    loaded = with_cuda_kernels(load("llama", tmp_path))
    layers = per_layer_launches(loaded, monkeypatch, steps)
    assert len(layers) == loaded.config.num_layers
    for launches in layers[1:]:  # the first layer's input norm has no residual add before it
        assert len(launches) <= budget, launches
        assert sum(name.startswith("aten.") for name in launches) == 4, launches  # projections
        assert sum(name.startswith("triton._rms_norm") for name in launches) == 2, launches


def test_the_cuda_selection_has_fused_kernels_for_every_pointwise_family() -> None:
    cuda = select_kernels("cuda", torch.float32)
    assert type(cuda.pointwise).__module__ == "winnow.kernels.triton.fused"
    assert cuda.rope_attention is not None


@pytest.mark.parametrize("arch", ["mistral-sliding", "llama-mha-bias", "qwen3"])
def test_the_fused_layer_gives_the_reference_logits(tmp_path: Path, arch: str) -> None:
    """Prefill, a chunk after a cached prefix beside a decode, then decodes: the same logits with
    the CUDA selection as with the torch reference. Both compute in fp32 in different orders
    (the kernel tests bound each operation to a few fp32 roundings), which two small layers carry
    to the logits at well under 1e-4 of their range; one wrong rotation, slot or residual moves
    them by a sizeable fraction of it."""
    reference = load(arch, tmp_path / "reference")
    fused = with_cuda_kernels(load(arch, tmp_path / "fused"))
    assert isinstance(fused.model.layers[0], DecoderLayer)
    steps = [
        [("a", [5, 9, 13, 2, 7, 30, 41]), ("b", [3, 4])],
        [("a", [8, 11, 12]), ("b", [6])],
        [("a", [20]), ("b", [21])],
    ]
    expected_runner, got_runner = PagedRunner(reference, seed=1), PagedRunner(fused, seed=1)
    for step in steps:
        expected, got = expected_runner.step(step), got_runner.step(step)
        for ours, theirs in zip(got, expected, strict=True):
            scale = theirs.abs().max().item()
            torch.testing.assert_close(ours, theirs, atol=1e-4 * scale, rtol=0)
