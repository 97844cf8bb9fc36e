"""Starting, watching and stopping the worker ranks of one node.

Each worker is a spawned process with a pipe from its parent (it exits when the pipe closes,
so a killed server leaves no worker behind). A monitor thread waits on the workers' sentinels:
the first one to exit while the group is not stopping is reported through `on_death`, which
ends the engine (every stream gets an error, /health turns 503, the server exits non-zero).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import cast

import torch

from winnow.config import EngineConfig, rank_layout
from winnow.distributed.group import TensorParallel, cpu_group, init_group, leave_group
from winnow.distributed.layout import RankLayout, threads_per_rank
from winnow.distributed.step_input import Stop, send_stop
from winnow.distributed.worker import rank_device, worker_main
from winnow.limits import TP_WORKER_EXIT_S

logger = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """A tensor-parallel worker rank exited while the engine was running."""


class WorkerGroup:
    """This node's worker processes (ranks `ranks` of `layout`)."""

    def __init__(
        self,
        config: EngineConfig,
        layout: RankLayout,
        ranks: range,
        threads: int,
        on_death: Callable[[WorkerDied], None] | None = None,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.on_death = on_death
        self.death: WorkerDied | None = None
        self._stopping = False
        self._pipes: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for rank in ranks:
            child_end, parent_end = context.Pipe(duplex=False)
            process = context.Process(
                target=worker_main,
                args=(config, layout, rank, child_end, threads),
                name=f"winnow-tp-rank{rank}",
                daemon=True,
            )
            process.start()
            child_end.close()
            self._pipes.append(parent_end)
            self.processes.append(process)
        self._monitor = threading.Thread(target=self._watch, name="winnow-tp-monitor", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        pending = {process.sentinel: process for process in self.processes}
        while pending:
            for sentinel in wait(list(pending)):
                process = pending.pop(cast(int, sentinel))
                process.join()
                if self._stopping or self.death is not None:
                    continue
                self.death = WorkerDied(
                    f"tensor-parallel worker {process.name} (pid {process.pid}) exited with "
                    f"code {process.exitcode}"
                )
                logger.error("%s", self.death)
                if self.on_death is not None:
                    self.on_death(self.death)

    def stop(self, clean: bool, last_word: Stop | None = None) -> None:
        """`clean`: tell the workers to leave their loop (rank 0 only; `last_word` carries its
        decode-graph trace, which a worker whose own differs reports by exiting non-zero) and
        wait for them; else, or when they do not exit in TP_WORKER_EXIT_S, kill them."""
        self._stopping = True
        if clean and self.death is None:
            try:
                send_stop(cpu_group(), last_word or Stop())
            except Exception:  # noqa: BLE001 - a lost rank: killed below
                logger.warning("could not tell the worker ranks to stop; killing them")
                clean = False
        for process in self.processes:
            process.join(TP_WORKER_EXIT_S if clean else 0.5)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in self._pipes:
            pipe.close()
        if clean:
            leave_group()

    def wait(self) -> int:
        """Block until every worker exits (nodes other than 0); 0 when all exited cleanly."""
        for process in self.processes:
            process.join()
        self._stopping = True
        for pipe in self._pipes:
            pipe.close()
        return 0 if all(process.exitcode == 0 for process in self.processes) else 1


def start_tensor_parallel(
    config: EngineConfig, on_death: Callable[[WorkerDied], None]
) -> tuple[WorkerGroup, TensorParallel]:
    """Node 0: spawn the worker ranks of this node, then join the group as rank 0 (on the
    calling thread, which becomes the engine thread: it gets this rank's thread budget)."""
    from winnow.models.loader import resolve_model_path

    layout = rank_layout(config).with_port()
    # built or downloaded once, here, rather than by every rank at the same time
    path = resolve_model_path(config.model, config.revision, config.download_dir)
    config = dataclasses.replace(config, model=str(path))
    threads = threads_per_rank(config.num_threads, layout.per_node)
    workers = WorkerGroup(config, layout, layout.local_ranks[1:], threads, on_death)
    torch.set_num_threads(threads)
    try:
        device = rank_device(config.device, 0)
        tp, _ = init_group(0, layout.size, layout.master_addr, layout.master_port, device)
    except BaseException:
        workers.stop(clean=False)
        raise
    return workers, tp


def run_worker_node(config: EngineConfig) -> int:
    """Nodes other than 0: run this node's ranks as workers (no HTTP server) until rank 0
    stops them; the exit status is 0 when every one stopped cleanly."""
    from winnow.models.loader import resolve_model_path

    layout = rank_layout(config)
    path = resolve_model_path(config.model, config.revision, config.download_dir)
    config = dataclasses.replace(config, model=str(path))
    threads = threads_per_rank(config.num_threads, layout.per_node)
    workers = WorkerGroup(config, layout, layout.local_ranks, threads)
    logger.info(
        "node %d of %d: ranks %s of %d, meeting at %s:%d",
        layout.node_rank,
        layout.nnodes,
        list(layout.local_ranks),
        layout.size,
        layout.master_addr,
        layout.master_port,
    )
    return workers.wait()
