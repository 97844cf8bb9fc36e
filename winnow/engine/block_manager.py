"""Fixed-size KV-cache blocks: who owns which, and which are free."""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Hands out block ids of the paged KV cache. Block 0 is never handed out so that padded
    block-table entries can point at it harmlessly."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` in place to hold `num_tokens`; False (unchanged) if out of blocks."""
        missing = self.blocks_needed(num_tokens) - len(block_table)
        if missing <= 0:
            return True
        if missing > len(self._free):
            return False
        block_table.extend(self._free.popleft() for _ in range(missing))
        return True

    def free(self, block_table: list[int]) -> None:
        self._free.extend(block_table)
        block_table.clear()
