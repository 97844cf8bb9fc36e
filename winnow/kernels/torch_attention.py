"""The torch reference attention backend: write this step's k/v into the block cache, then attend.

A layer's cache is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
(index 0 = keys, 1 = values), in the model's dtype or the one --kv-cache-dtype asks for: new k/v
are rounded to it when written, cached ones widened back to the queries' dtype when read.
Token `p` of a sequence lives at block `block_table[p // block_size]`, offset `p % block_size`;
`attn.slot_mapping` gives that flat slot for each new token.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from winnow.kernels.attention_metadata import AttentionMetadata


class TorchAttentionBackend:
    """Pure PyTorch (index_copy_ + gather + scaled_dot_product_attention); CPU and CUDA.

    Per sequence it picks the cheapest form:
    - nothing cached yet: causal SDPA over the sequence's own new k/v, no gather;
    - one new token (decode): all such sequences in one batched SDPA over their gathered blocks,
      with a length mask (left out when all lengths are equal);
    - several new tokens after cached ones (chunked prefill): gather its blocks and use a mask
      that is causal in absolute positions.
    Masks and gather indices are built once per step (in `attn.memo`) and reused by every layer.
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        write_kv(kv_cache, k, v, attn.slot_mapping)
        if attn.is_decode_only:
            return self.decode(q, kv_cache, attn, None, sliding_window)

        out = torch.empty_like(q)
        decode_seqs: list[int] = []
        starts = itertools.accumulate(attn.query_lens, initial=0)
        seqs = zip(starts, attn.query_lens, attn.seq_lens, strict=False)
        for i, (start, q_len, seq_len) in enumerate(seqs):
            end = start + q_len
            if seq_len == q_len:
                out[start:end] = _prefill(q[start:end], k[start:end], v[start:end], sliding_window)
            elif q_len == 1:
                decode_seqs.append(i)
            else:
                mask = _chunk_mask(attn, i, sliding_window, q.dtype)
                out[start:end] = _chunk(q[start:end], kv_cache, attn, i, mask)
        if decode_seqs:
            plan = _decode_plan(attn, decode_seqs, sliding_window, q.dtype)
            assert plan.tokens is not None
            decoded = self.decode(q, kv_cache, attn, decode_seqs, sliding_window)
            out.index_copy_(0, plan.tokens, decoded)
        return out

    def decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        seqs: list[int] | None,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Single-token decodes of sequences `seqs` (None: every sequence, one token each) ->
        their outputs [len(seqs), Hq, D], in order."""
        plan = _decode_plan(attn, seqs, sliding_window, q.dtype)
        rows = q if plan.tokens is None else q.index_select(0, plan.tokens)
        return _decode(rows, kv_cache, plan)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter new keys/values [T, Hkv, D] into their flat cache slots."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(kv_cache.dtype))
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(kv_cache.dtype))


def _prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """Self-attention of a fresh sequence over its own tokens: [L, H, D] -> [L, Hq, D]."""
    length = q.shape[0]
    mask = None
    if sliding_window is not None and length > sliding_window:
        pos = torch.arange(length, device=q.device)
        mask = _causal_mask(pos, pos, sliding_window)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)


def _chunk(
    q: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata, seq: int, mask: torch.Tensor
) -> torch.Tensor:
    """New tokens [Lq, Hq, D] of sequence `seq`, continuing after its cached tokens."""
    seq_len = attn.seq_lens[seq]
    blocks = attn.block_tables[seq, : -(-seq_len // attn.block_size)]
    keys = kv_cache[0].index_select(0, blocks).flatten(0, 1)[:seq_len].to(q.dtype)
    values = kv_cache[1].index_select(0, blocks).flatten(0, 1)[:seq_len].to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)


def _chunk_mask(
    attn: AttentionMetadata, seq: int, sliding_window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    key = ("chunk", seq, sliding_window, dtype)
    if key not in attn.memo:
        seq_len, device = attn.seq_lens[seq], attn.block_tables.device
        q_pos = torch.arange(seq_len - attn.query_lens[seq], seq_len, device=device)
        allowed = _causal_mask(q_pos, torch.arange(seq_len, device=device), sliding_window)
        attn.memo[key] = _additive(allowed, dtype)
    mask = attn.memo[key]
    assert isinstance(mask, torch.Tensor)
    return mask


@dataclass
class _DecodePlan:
    """Gather indices and length mask of a batch of single-token decodes, shared by all layers."""

    tokens: torch.Tensor | None  # flat token index of each decode (None: all tokens, in order)
    blocks: torch.Tensor  # [B * nb] cache blocks to gather, nb blocks per sequence
    batch: int
    max_len: int
    mask: torch.Tensor | None  # [B, 1, 1, max_len] additive; None when every length is max_len


def _decode_plan(
    attn: AttentionMetadata, seqs: list[int] | None, sliding_window: int | None, dtype: torch.dtype
) -> _DecodePlan:
    key = ("decode", sliding_window, dtype)
    plan = attn.memo.get(key)
    if isinstance(plan, _DecodePlan):
        return plan
    device = attn.block_tables.device
    if seqs is None:
        tokens, tables, lens = None, attn.block_tables, attn.seq_lens_tensor
        host_lens = attn.seq_lens
    else:
        rows = torch.tensor(seqs, dtype=torch.long, device=device)
        starts = list(itertools.accumulate(attn.query_lens, initial=0))
        tokens = torch.tensor([starts[i] for i in seqs], dtype=torch.long, device=device)
        tables = attn.block_tables.index_select(0, rows)
        lens = attn.seq_lens_tensor.index_select(0, rows)
        host_lens = [attn.seq_lens[i] for i in seqs]
    max_len = max(host_lens)
    num_blocks = -(-max_len // attn.block_size)
    mask = None
    windowed = sliding_window is not None and max_len > sliding_window
    if windowed or min(host_lens) != max_len:
        pos = torch.arange(max_len, device=device)
        lens = lens.view(-1, 1)
        allowed = pos < lens
        if sliding_window is not None:
            allowed &= pos >= lens - sliding_window
        mask = _additive(allowed, dtype).view(len(host_lens), 1, 1, max_len)
    plan = _DecodePlan(tokens, tables[:, :num_blocks].reshape(-1), len(host_lens), max_len, mask)
    attn.memo[key] = plan
    return plan


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, plan: _DecodePlan) -> torch.Tensor:
    """One query token per sequence, q [B, Hq, D]; all sequences in one batched SDPA."""
    kv_shape = (plan.batch, -1, *kv_cache.shape[-2:])
    # index_select beats advanced indexing; [B * nb, bs, Hkv, D] -> [B, Hkv, max_len, D]
    keys = kv_cache[0].index_select(0, plan.blocks).view(kv_shape)[:, : plan.max_len].to(q.dtype)
    values = kv_cache[1].index_select(0, plan.blocks).view(kv_shape)[:, : plan.max_len].to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=plan.mask,
        enable_gqa=True,
    )
    return out.squeeze(2)


def _causal_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """[Lq, Lk] bool, True where query at absolute position q_pos may see key at k_pos."""
    diff = q_pos[:, None] - k_pos[None, :]
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive float mask (0 / -inf), the form SDPA uses without converting."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf"))
