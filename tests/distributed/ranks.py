"""Run a function on every rank of a tensor-parallel group of spawned CPU (gloo) processes."""

from __future__ import annotations

import io
import multiprocessing
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch

from winnow.distributed.group import init_group, leave_group
from winnow.distributed.layout import RankLayout

_TIMEOUT_S = 240


def run_ranks(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(tp, *args)` on `size` spawned ranks (fn must be importable); rank 0's result.
    A rank that raises fails the caller with its traceback."""
    context = multiprocessing.get_context("spawn")
    port = RankLayout(size, 1, 0, "127.0.0.1", 0).with_port().master_port
    results: multiprocessing.Queue[tuple[int, bool, Any]] = context.Queue()
    processes = [
        context.Process(target=_rank_main, args=(rank, size, port, fn, args, results), daemon=True)
        for rank in range(size)
    ]
    for process in processes:
        process.start()
    outcome: Any = None
    try:
        for _ in range(size):
            rank, ok, value = results.get(timeout=_TIMEOUT_S)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            if rank == 0:
                outcome = torch.load(io.BytesIO(value), weights_only=False)
    except queue.Empty as exc:
        raise AssertionError(f"the ranks gave no result in {_TIMEOUT_S} s") from exc
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
    return outcome


def _rank_main(
    rank: int,
    size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: multiprocessing.Queue[tuple[int, bool, Any]],
) -> None:
    torch.set_num_threads(1)
    try:
        tp, _ = init_group(rank, size, "127.0.0.1", port, torch.device("cpu"))
        with torch.no_grad():
            value = fn(tp, *args)
        buffer = io.BytesIO()  # plain bytes: tensors in a queue would go through shared memory
        torch.save(value if rank == 0 else None, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        leave_group()
