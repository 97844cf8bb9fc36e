"""The bitmask kernels (C and torch) against a plain per-token reference."""

from __future__ import annotations

import pytest
import torch

from winnow.sampling.bitmask import (
    apply_bitmask,
    apply_bitmask_c,
    apply_bitmask_torch,
    c_kernel_available,
    words_for,
)


def reference(z: torch.Tensor, rows: list[int], bits: torch.Tensor) -> torch.Tensor:
    out = z.clone()
    for i, row in enumerate(rows):
        for token in range(z.shape[1]):
            word = int(bits[i, token // 32]) & 0xFFFFFFFF
            if not (word >> (token % 32)) & 1:
                out[row, token] = -torch.inf
    return out


def random_bits(generator: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """Words of every kind: random, all allowed (-1), all banned (0), a single bit."""
    words = words_for(vocab)
    bits = torch.randint(-(2**31), 2**31, (rows, words), generator=generator, dtype=torch.int64)
    kind = torch.randint(0, 4, (rows, words), generator=generator)
    bits[kind == 1] = -1
    bits[kind == 2] = 0
    bits[kind == 3] = 1 << 7
    return bits.to(torch.int32)


KERNELS = [apply_bitmask_torch, apply_bitmask]
if c_kernel_available():
    KERNELS.append(apply_bitmask_c)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 97, 1000])
def test_kernels_match_the_reference(kernel, vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    z = torch.randn(6, vocab, generator=generator)
    rows = [4, 0, 2]
    bits = random_bits(generator, len(rows), vocab)
    expected = reference(z, rows, bits)
    kernel(z, torch.tensor(rows), bits)
    assert torch.equal(z, expected)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
def test_all_banned_and_all_allowed_rows(kernel) -> None:
    vocab = 70
    z = torch.randn(3, vocab)
    before = z.clone()
    bits = torch.stack(
        [torch.zeros(words_for(vocab), dtype=torch.int32), torch.full((3,), -1, dtype=torch.int32)]
    )
    kernel(z, torch.tensor([2, 0]), bits)
    assert torch.isneginf(z[2]).all()
    assert torch.equal(z[0], before[0]) and torch.equal(z[1], before[1])


def test_c_kernel_builds_on_this_machine() -> None:
    """Every x86-64 machine the suite runs on has a C compiler (the model kernels need one)."""
    assert c_kernel_available()


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError):
        apply_bitmask(torch.zeros(2, 64), torch.tensor([0]), torch.zeros(1, 3, dtype=torch.int32))
