"""A worker rank: joins the group, loads its slice of the model, then runs the forward on each
step input rank 0 broadcasts until told to stop. It holds no scheduler state.

It never outlives its parent: a thread blocks on a pipe whose other end only the parent holds,
and exits the process when the pipe closes. SIGINT and SIGTERM are ignored (a Ctrl-C reaches
the whole process group; the server drains and then stops its workers itself).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import traceback
from multiprocessing.connection import Connection

import torch

from winnow.config import EngineConfig
from winnow.distributed.group import init_group, leave_group
from winnow.distributed.layout import RankLayout
from winnow.distributed.step_input import StepInput, receive_step, run_step

logger = logging.getLogger("winnow.distributed.worker")


def rank_device(device: str, local_index: int) -> torch.device:
    """The device of the `local_index`-th rank on this node (each CUDA rank its own GPU)."""
    from winnow.models.device import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return torch.device("cuda", local_index)
    return resolved


def worker_main(
    config: EngineConfig, layout: RankLayout, rank: int, parent: Connection, threads: int
) -> None:
    """Entry point of a spawned worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s",
    )
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    try:
        _serve_steps(config, layout, rank)
    except BaseException:
        logger.error("tensor-parallel rank %d failed:\n%s", rank, traceback.format_exc())
        os._exit(1)  # never wait on a group whose other ranks may be gone
    logger.info("tensor-parallel rank %d stopped", rank)


def _exit_with_parent(parent: Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        parent.recv()
    os._exit(1)


def _serve_steps(config: EngineConfig, layout: RankLayout, rank: int) -> None:
    from winnow.engine.engine import plan_kv_cache_for
    from winnow.engine.memory_plan import agree_on_blocks
    from winnow.engine.model_runner import ModelRunner
    from winnow.models import load_model, resolve_kv_cache_dtype

    device = rank_device(config.device, rank % layout.per_node)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp, step_group = init_group(rank, layout.size, layout.master_addr, layout.master_port, device)
    loaded = load_model(
        config.model,
        dtype=config.dtype,
        device=str(device),
        trust_remote_code=config.trust_remote_code,
        kernels=config.kernels,
        tokenizer=config.tokenizer,
        revision=config.revision,
        download_dir=config.download_dir,
        tp=tp,
    )
    resolved = config.for_device(device.type)
    kv_dtype = resolve_kv_cache_dtype(resolved.kv_cache_dtype, loaded.dtype)
    runner = ModelRunner(loaded, resolved.block_size, kv_dtype)
    plan = plan_kv_cache_for(resolved, loaded, runner, device, kv_dtype)
    plan = agree_on_blocks(plan, tp.min_int(plan.num_blocks), resolved.block_size)
    runner.allocate_kv_cache(plan.num_blocks)
    # the calls rank 0's LLMEngine makes, in its order: warm-up, then the decode graphs
    runner.start(
        loaded.kernels.decode_graphs,
        resolved.enforce_eager,
        resolved.max_num_seqs,
        plan.max_model_len,
    )
    graphs = runner.decode_graphs
    while isinstance(message := receive_step(step_group), StepInput):
        run_step(loaded.model, runner.kv_caches, message, resolved.block_size, device, graphs)
    if (mismatch := message.mismatch(graphs, rank)) is not None:
        raise RuntimeError(f"the decode-graph buckets differ: {mismatch}")
    leave_group()
