"""Fixed-size KV-cache blocks: who owns which, which are free, and which hold a cached prefix."""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np

BlockHash = bytes


def block_hash(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash of a full block: it names the block's tokens and everything before them."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return digest.digest()


class BlockManager:
    """Hands out block ids of the paged KV cache, with prefix caching.

    A full block whose KV has been computed is registered under its chained hash. When its last
    owner frees it, it keeps its content and becomes evictable (LRU); a later sequence whose
    tokens hash the same takes it back instead of recomputing. Block 0 is never handed out, so
    padded block-table entries can point at it harmlessly.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._empty: deque[int] = deque(range(1, num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_of_block: dict[int, BlockHash] = {}
        self._block_of_hash: dict[BlockHash, int] = {}
        # Tokens looked up in the prefix cache, and of those the ones found (vLLM's counters).
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence could take now: empty ones plus cached ones nobody holds."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of_hash)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` in place to hold `num_tokens`; False (unchanged) if out of blocks."""
        missing = self.blocks_needed(num_tokens) - len(block_table)
        if missing <= 0:
            return True
        if missing > self.num_free_blocks:
            return False
        block_table.extend(self._take_block() for _ in range(missing))
        return True

    def free(self, block_table: list[int]) -> None:
        """Drop one reference to each block; the table's tail becomes evictable before its head."""
        for block in reversed(block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if block in self._hash_of_block:
                    self._evictable[block] = None
                else:
                    self._empty.append(block)
        block_table.clear()

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], list[BlockHash]]:
        """Cached blocks holding the longest block-aligned prefix of `token_ids`, with their
        hashes; a reference is taken on each."""
        blocks: list[int] = []
        hashes: list[BlockHash] = []
        if not self.enable_prefix_caching:
            return blocks, hashes
        parent = b""
        size = self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            parent = block_hash(parent, token_ids[start : start + size])
            block = self._block_of_hash.get(parent)
            if block is None:
                break
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
            blocks.append(block)
            hashes.append(parent)
        self.prefix_queried_tokens += len(token_ids)
        self.prefix_hit_tokens += len(blocks) * size
        return blocks, hashes

    def register(self, block: int, hash_: BlockHash) -> None:
        """Record that `block` now holds the full block named by `hash_`."""
        if self.enable_prefix_caching and hash_ not in self._block_of_hash:
            self._block_of_hash[hash_] = block
            self._hash_of_block[block] = hash_

    def _take_block(self) -> int:
        if self._empty:
            block = self._empty.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of_hash[self._hash_of_block.pop(block)]
        self._ref_counts[block] = 1
        return block
