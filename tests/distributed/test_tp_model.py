"""Tensor parallel on this CPU (gloo, fp32): each parallel layer against its unsharded layer,
and whole sharded models at tp = 2 against tp = 1, prefill and paged decode.

One group of two spawned ranks runs every check (`tp2_results`); the tests read its results.
Tolerances are the rounding bounds of tests/tolerances.py: a row-parallel layer sums its
partial dot products in another order, which those bounds cover."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from tests.distributed.drive import prefill_then_decode
from tests.distributed.ranks import run_ranks
from tests.models.helpers import make_hf_model, save_hf_model
from tests.tolerances import assert_within, linear_tolerance, logit_tolerance
from winnow.distributed.group import TensorParallel
from winnow.distributed.layers import (
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_logits,
)
from winnow.distributed.partition import Partition, check_divisible
from winnow.engine.decode_graphs import capture_order, graph_batch_sizes, graph_plan_digest
from winnow.models import ModelConfig, load_model

# name -> HF architecture of tests/models/helpers plus overrides: each exercises one feature
# of the sharding (TINY: 4 heads, 2 KV heads, intermediate 96, vocabulary 97, not even).
MODELS: dict[str, tuple[str, dict[str, object]]] = {
    "gqa": ("llama", {}),
    "mqa-replicated-kv": ("llama", {"num_key_value_heads": 1}),
    "qkv-bias-tied": ("qwen2", {}),
    "qk-norm": ("qwen3", {}),
    "mha-o-and-mlp-bias": ("llama-mha-bias", {}),
}
PROMPTS = [[5, 17, 33, 2, 71, 9, 40], [88, 3, 3, 61, 12, 50, 27, 19, 4, 96, 30]]
DECODE_STEPS = 3


def build_models(root: Path) -> dict[str, tuple[transformers.PreTrainedModel, Path]]:
    models = {}
    for name, (arch, overrides) in MODELS.items():
        hf = make_hf_model(arch)
        for key, value in overrides.items():
            setattr(hf.config, key, value)
        if overrides:
            hf = _rebuilt(hf)
        models[name] = (hf, save_hf_model(hf, root / name))
    return models


def _rebuilt(hf: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """A fresh randomised model of `hf`'s (changed) config."""
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(hf.config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model.eval()


def layer_checks(tp: TensorParallel) -> dict[str, tuple[torch.Tensor, torch.Tensor, Any]]:
    """(sharded result, unsharded result, bound) per layer; the same seeds on every rank."""
    torch.manual_seed(0)
    x = torch.randn(5, 48)
    config = ModelConfig.from_hf_config(
        transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=48,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=1,
        )  # fmt: skip
    )
    part = Partition(config, tp.rank, tp.size)
    full = nn.Linear(48, 64, bias=True)
    rows = slice(tp.rank * 32, (tp.rank + 1) * 32)
    column = F.linear(x, full.weight[rows], full.bias[rows])
    gathered = tp.gather_last_dim(column)
    expected = full(x)
    checks: dict[str, tuple[torch.Tensor, torch.Tensor, Any]] = {}
    if gathered is not None:
        checks["column"] = (gathered, expected, linear_tolerance(x, full.weight, full.bias))

    down = nn.Linear(64, 48, bias=True)
    h = torch.randn(5, 64)
    row = RowParallelLinear(32, 48, True, tp)
    with torch.no_grad():
        row.weight.copy_(down.weight[:, rows])
        row.bias.copy_(down.bias)
    checks["row"] = (row(h[:, rows]), down(h), linear_tolerance(h, down.weight, down.bias))

    embedding = nn.Embedding(97, 48)
    ids = torch.arange(97).flip(0)
    sharded = VocabParallelEmbedding(part, 48, tp)
    with torch.no_grad():
        end = part.vocab_start + part.vocab_rows
        sharded.weight[: part.vocab_rows].copy_(embedding.weight[part.vocab_start : end])
    checks["embedding"] = (sharded(ids), embedding(ids), 0.0)

    logits = vocab_parallel_logits(x, sharded.weight, tp, 97)
    if tp.is_driver:
        checks["lm_head"] = (
            logits,
            F.linear(x, embedding.weight),
            linear_tolerance(x, embedding.weight),
        )
    return checks


def model_logits(
    tp: TensorParallel | None, paths: dict[str, Path]
) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name, path in paths.items():
        loaded = load_model(str(path), dtype="float32", device="cpu", tp=tp)
        out[name] = prefill_then_decode(loaded, PROMPTS, DECODE_STEPS)
    return out


def graph_plans(tp: TensorParallel) -> dict[str, Any]:
    """Each rank's capture order, gathered; and whether the ranks agree on a plan that is the
    same on both, and on one that is not (max_num_seqs 12 on rank 0, 13 on rank 1)."""
    order = torch.tensor(capture_order(graph_batch_sizes(12)))
    orders = tp.gather_last_dim(order[None])
    same = graph_plan_digest(True, graph_batch_sizes(12), 32, True)
    differs = graph_plan_digest(True, graph_batch_sizes(12 + tp.rank), 32, True)
    return {"orders": orders, "agree": (tp.agree(same), tp.agree(differs))}


def on_two_ranks(tp: TensorParallel, paths: dict[str, Path]) -> dict[str, Any]:
    return {
        "layers": layer_checks(tp),
        "graphs": graph_plans(tp),
        "models": model_logits(tp, paths),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Path]]:
    return build_models(tmp_path_factory.mktemp("tp-models"))


@pytest.fixture(scope="module")
def tp2_results(models: dict[str, tuple[Any, Path]]) -> dict[str, Any]:
    return run_ranks(2, on_two_ranks, {name: path for name, (_, path) in models.items()})


@pytest.mark.parametrize("layer", ["column", "row", "embedding", "lm_head"])
def test_parallel_layer_equals_unsharded(tp2_results: dict[str, Any], layer: str) -> None:
    got, expected, bound = tp2_results["layers"][layer]
    assert got.shape == expected.shape
    assert_within(got, expected, bound)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tp2_logits_equal_tp1(
    tp2_results: dict[str, Any], models: dict[str, tuple[Any, Path]], name: str
) -> None:
    hf, path = models[name]
    reference = model_logits(None, {name: path})[name]
    sharded = tp2_results["models"][name]
    bound = logit_tolerance(hf)
    assert len(sharded) == len(reference) == 1 + DECODE_STEPS
    for got, expected in zip(sharded, reference, strict=True):
        assert got.shape == expected.shape  # [tokens or sequences, full vocabulary]
        assert_within(got, expected, bound)


def test_every_rank_captures_decode_graphs_in_one_order(tp2_results: dict[str, Any]) -> None:
    """The order comes from max_num_seqs alone (largest first); the start-up check that guards
    it tells equal plans from different ones."""
    plans = tp2_results["graphs"]
    assert plans["orders"].tolist() == [[12, 8, 4, 2, 1] * 2]
    assert plans["agree"] == (True, False)


def test_start_up_refuses_sizes_that_do_not_divide(models: dict[str, tuple[Any, Path]]) -> None:
    config = ModelConfig.from_pretrained(models["gqa"][1])
    with pytest.raises(ValueError, match=r"4 attention heads, intermediate size 96, 2 KV heads"):
        check_divisible(config, 5)
    check_divisible(config, 4)  # 2 KV heads, each on two ranks
