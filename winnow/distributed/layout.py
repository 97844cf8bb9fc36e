"""Which ranks each node runs, from -tp, --nnodes and --node-rank; and the per-rank threads."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class RankLayout:
    """`size` ranks over `nnodes` nodes, `size / nnodes` each: node n runs ranks
    [n * per_node, (n + 1) * per_node); rank 0 (node 0) is the engine."""

    size: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def per_node(self) -> int:
        return self.size // self.nnodes

    @property
    def local_ranks(self) -> range:
        first = self.node_rank * self.per_node
        return range(first, first + self.per_node)

    def check(self) -> None:
        """Refuse a layout that cannot run, saying why (ValueError)."""
        if self.size % self.nnodes:
            raise ValueError(
                f"-tp {self.size}: {self.size} ranks do not split evenly over {self.nnodes} nodes"
            )
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} is not below --nnodes {self.nnodes}")
        if self.nnodes > 1 and self.master_port == 0:
            raise ValueError(
                f"--nnodes {self.nnodes} needs --master-port (and --master-addr): the port on "
                "node 0 where every node's ranks meet"
            )

    def with_port(self) -> RankLayout:
        """This layout with a free local port when none was given (one node only)."""
        if self.master_port:
            return self
        with socket.socket() as sock:
            sock.bind((self.master_addr, 0))
            port = sock.getsockname()[1]
        return RankLayout(self.size, self.nnodes, self.node_rank, self.master_addr, port)


def threads_per_rank(requested: int, ranks_here: int) -> int:
    """--num-threads, or the cores shared out between this node's ranks: each rank owns an
    OpenMP pool, and pools that together count more threads than cores stop spinning and wait
    on futexes in every parallel region (the libgomp pitfall)."""
    if requested > 0:
        return requested
    return max(1, (os.cpu_count() or 1) // ranks_here)
