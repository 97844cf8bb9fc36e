"""The thresholded route's C row helpers against torch: top-n candidates and the top_p mass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from winnow.kernels.cpu import row_stats

pytestmark = pytest.mark.skipif(not row_stats.available(), reason="no AVX2 C kernels here")


@pytest.mark.parametrize("vocab", [131072, 1003, 9])
def test_top_candidates_are_torch_topk_values_with_valid_ids(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    z = torch.randn(12, vocab, generator=generator) * 3
    z[1] = torch.randint(0, 4, (vocab,), generator=generator).float()  # ties everywhere
    z[2, : vocab // 2] = -torch.inf
    z[3] = -torch.inf
    z[4] = torch.arange(vocab, dtype=torch.float32)  # rising: the threshold moves every step
    for n in sorted({1, 2, min(50, vocab), min(256, vocab), vocab // 2 + 1, vocab}):
        values, ids = row_stats.top_candidates(z, n)
        assert torch.equal(values, z.topk(n, dim=1).values)
        assert torch.equal(z.gather(1, ids), values)
        assert all(len(set(row.tolist())) == n for row in ids)
        tied = values[:, 1:] == values[:, :-1]  # ties ordered by id
        assert bool((ids[:, 1:] > ids[:, :-1])[tied].all())


def test_total_mass_matches_torch() -> None:
    """Float32 exps within ~2 ulp of torch's, summed in float64: relative error well under 1e-6
    (a top_p decision would need its cumulative mass that close to p to notice)."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(16, 32771, generator=generator) * 4
    z[1, ::3] = -torch.inf
    z[2, 5] = torch.finfo(torch.float32).max
    temperature = torch.rand(16, generator=generator) + 0.2
    y = (z / temperature[:, None]).clamp(max=torch.finfo(torch.float32).max)
    expected = (y - y.amax(1, keepdim=True)).exp().sum(1, dtype=torch.float64)
    mass = row_stats.total_mass(z, temperature)
    torch.testing.assert_close(mass, expected, rtol=1e-6, atol=0)
    z[3] = -torch.inf  # nothing finite: NaN, as torch gives
    mass = row_stats.total_mass(z, temperature)
    # the row's largest z given (the top-n slice's first value): the same sums, bit for bit
    given = row_stats.total_mass(z, temperature, z.amax(1))
    assert torch.equal(given.isnan(), mass.isnan()) and bool(given[3].isnan())
    assert torch.equal(given.nan_to_num(), mass.nan_to_num())


def test_load_rows_reorders_and_cleans() -> None:
    logits = torch.randn(5, 1001, generator=torch.Generator().manual_seed(2))
    logits[1, 3], logits[2, 4], logits[3, 5] = float("nan"), float("inf"), -float("inf")
    order = torch.tensor([3, 1, 4, 2])
    z = torch.empty(4, 1001)
    row_stats.load_rows(logits, order, z)
    expected = logits[order].nan_to_num(nan=-torch.inf, neginf=-torch.inf)
    assert torch.equal(z, expected)
    row_stats.load_rows(logits[:4], None, z)
    assert torch.equal(z, logits[:4].nan_to_num(nan=-torch.inf, neginf=-torch.inf))


def _cleaned(z: torch.Tensor) -> torch.Tensor:
    return z.nan_to_num(nan=-torch.inf, posinf=torch.finfo(torch.float32).max, neginf=-torch.inf)


@pytest.mark.parametrize("vocab", [131072, 32771, 1003, 9])
def test_scan_reads_the_logits_with_patches_and_bounds_the_normaliser(isa, vocab: int) -> None:
    """scan_rows on raw logits (NaN, +inf, reordered rows, patched tokens) gives top_candidates'
    slice of the cleaned, patched rows, and bounds that hold total_mass's value between them."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(10, vocab, generator=generator) * 3
    logits[0, :: max(1, vocab // 40)] += 15.0  # a few strong tokens over a flat bulk
    logits[1] = torch.randint(0, 4, (vocab,), generator=generator).float()  # ties
    logits[2, : vocab // 2] = float("nan")
    logits[3] = -torch.inf
    logits[4, 5] = torch.inf
    logits[5] = torch.arange(vocab, dtype=torch.float32) / vocab * 40  # the maximum keeps rising
    order = torch.tensor([5, 0, 2, 3, 1, 4, 7, 9])
    patch_ids = torch.randint(-1, vocab, (8, 12), generator=generator)
    patch_ids[1, 0], patch_ids[3] = 0, -1  # a strong token pushed down; row 3 stays all -inf
    work = torch.randn(8, vocab, generator=generator) * 10
    work[1, 0], work[6, patch_ids[6, 1]] = -torch.inf, 60.0
    rows = _cleaned(logits)[order]
    for r in range(8):
        ids = patch_ids[r][patch_ids[r] >= 0]
        rows[r, ids] = work[r, ids]
    temperature = torch.rand(8, generator=generator) + 0.3
    temperature[0] = 1.0
    want = torch.tensor([True] * 7 + [False])
    for n in sorted({1, min(66, vocab), min(256, vocab), vocab}):
        values, ids, bounds = row_stats.scan_rows(
            logits, order, patch_ids, work, n, temperature, want
        )
        assert torch.equal(values, rows.topk(n, dim=1).values)
        assert torch.equal(rows.gather(1, ids), values)
        assert all(len(set(row.tolist())) == n for row in ids)
        exact = row_stats.total_mass(rows, temperature)
        lo, hi = bounds[:7, 0], bounds[:7, 1]
        inside = (lo <= exact[:7]) & (exact[:7] <= hi)
        assert bool((inside | exact[:7].isnan()).all())
        assert torch.equal(lo.isnan(), exact[:7].isnan()) and bool(lo[3].isnan())
        finite = ~exact[:7].isnan()
        assert bool(((hi - lo)[finite] <= 0.07 * exact[:7][finite]).all())  # the bulk's 6.2%
        assert torch.equal(bounds[7], torch.ones(2, dtype=torch.float64))
    # the exact normaliser of some rows read the same way: total_mass's sums, bit for bit
    some = np.array([6, 0, 4, 3])
    picked = torch.from_numpy(some)
    mass = row_stats.source_mass(
        logits, order, patch_ids, work, some, temperature[picked], rows[picked].amax(1)
    )
    assert torch.equal(mass.isnan(), exact[picked].isnan()) and bool(mass[3].isnan())
    assert torch.equal(mass.nan_to_num(), exact[picked].nan_to_num())
    # rows without patches are read in place, NaN and +inf cleaned as read: the same sums
    unpatched = _cleaned(logits)[order]
    some = np.array([2, 5, 1, 0])  # half NaN, a +inf (above and below temperature 1), ties
    picked = torch.from_numpy(some)
    for t in (0.8, 1.2):
        temperature = torch.full((4,), t)
        mass = row_stats.source_mass(
            logits, order, None, work, some, temperature, unpatched[picked].amax(1)
        )
        assert torch.equal(mass, row_stats.total_mass(unpatched[picked], temperature))


def test_load_rows_keeps_patched_values_and_seed_patches_fills_them() -> None:
    logits = torch.randn(4, 777, generator=torch.Generator().manual_seed(3))
    logits[0, 9] = float("nan")
    order = torch.tensor([2, 0, 3])
    patch_ids = torch.tensor([[5, -1, 9], [9, 700, -1], [-1, -1, -1]])
    z = torch.zeros(3, 777)
    row_stats.seed_patches(logits, order, z, patch_ids)
    assert z[1, 9] == -torch.inf and z[0, 5] == logits[2, 5] and z[1, 700] == logits[0, 700]
    assert int((z != 0).sum()) == 4
    z[0, 5], z[1, 700] = 42.0, -7.0  # what the penalties did
    row_stats.load_rows(logits, order, z, patch_ids)
    expected = _cleaned(logits)[order]
    expected[0, 5], expected[1, 700] = 42.0, -7.0
    assert torch.equal(z, expected)


def test_penalise_in_c_gives_the_torch_values(monkeypatch) -> None:
    """PenaltyHistory.apply through the C kernel and through its torch ops: the same float32
    values, bit for bit (repeated and overlapping ids, negative, zero and -inf logits)."""
    from winnow.sampling.penalties import PenaltyHistory

    vocab, slots = 997, 6
    generator = torch.Generator().manual_seed(9)
    history = PenaltyHistory(slots, torch.device("cpu"))
    for slot in range(slots):
        prompt = torch.randint(0, 60, (40 + slot,), generator=generator).tolist()
        outputs = torch.randint(0, 80, (slot * 7,), generator=generator).tolist()
        history.reset(slot, prompt, outputs)
    z = torch.randn(slots * vocab + 1, generator=generator) * 3
    z[::11] = 0.0
    z[5::13] = -torch.inf
    rows = torch.tensor([4, 0, 2, 5])
    slot_ids = torch.tensor([1, 5, 3, 0])
    repetition = torch.tensor([1.3, 0.7, 1.0, 2.0])
    frequency_presence = torch.tensor([[0.5, 0.25], [-0.3, 1.1], [0.0, 0.7], [1.7, 0.0]])
    cases = ((repetition, frequency_presence), (repetition, None), (None, frequency_presence))
    for rep, fp in cases:
        in_c, in_torch = z.clone(), z.clone()
        history.apply(in_c, rows, slot_ids, slot_ids.numpy(), rep, fp, vocab)
        with monkeypatch.context() as patched:
            patched.setattr(row_stats, "available", lambda: False)
            history.apply(in_torch, rows, slot_ids, slot_ids.numpy(), rep, fp, vocab)
        assert not torch.equal(in_c, z)
        assert torch.equal(in_c[:-1], in_torch[:-1])  # the last cell is the padding's trash


def test_seeding_with_stage_one_is_seeding_then_penalising(monkeypatch) -> None:
    """seed_patches with the penalties (each row penalised right after its seeding) gives what
    seeding, then PenaltyHistory.apply's torch ops give: penalised rows listed out of order,
    a row that is patched but not penalised (bias-like ids), repeated ids across prompt and
    output, NaN / -inf logits."""
    from winnow.sampling.penalties import PenaltyHistory

    vocab, rows = 1009, 5
    generator = torch.Generator().manual_seed(12)
    logits = torch.randn(7, vocab, generator=generator) * 3
    logits[1, ::17] = float("nan")
    logits[4, 3::19] = -torch.inf
    order = torch.tensor([4, 1, 6, 0, 2])
    history = PenaltyHistory(rows, torch.device("cpu"))
    for slot in range(rows):
        prompt = torch.randint(0, 90, (30 + slot,), generator=generator).tolist()
        history.reset(
            slot, prompt, torch.randint(0, 120, (slot * 5,), generator=generator).tolist()
        )
    penalised, slots = torch.tensor([3, 0, 4]), torch.tensor([2, 4, 1])
    stage = history.stage_one(
        penalised, slots, slots.numpy(), torch.tensor([1.3, 0.6, 2.0]),
        torch.tensor([[0.5, 0.25], [-0.3, 1.1], [1.7, 0.0]]),
    )  # fmt: skip
    assert stage.prompt is not None
    patch_ids = torch.full((rows, stage.prompt.shape[1] + stage.output.shape[1] + 2), -1)
    patch_ids[penalised, : stage.prompt.shape[1]] = stage.prompt
    patch_ids[penalised, stage.prompt.shape[1] : -2] = stage.output
    patch_ids[1, -2:] = torch.tensor([7, 900])  # a row with bias ids only
    patch_ids[3, -1] = 500
    merged = torch.zeros(rows * vocab + 1)
    row_stats.seed_patches(logits, order, merged[:-1].view(rows, vocab), patch_ids, stage)
    separate = torch.zeros(rows * vocab + 1)
    row_stats.seed_patches(logits, order, separate[:-1].view(rows, vocab), patch_ids)
    seeded = separate.clone()
    with monkeypatch.context() as patched:
        patched.setattr(row_stats, "available", lambda: False)
        history.apply(separate, penalised, slots, slots.numpy(), stage.repetition,
                      stage.frequency_presence, vocab)  # fmt: skip
    assert not torch.equal(separate, seeded)
    assert torch.equal(merged[:-1], separate[:-1])


def test_record_in_c_gives_the_torch_tables(monkeypatch) -> None:
    """PenaltyHistory.record through the C kernel and through its torch ops: the same output
    ids and counts over several steps (repeats of earlier tokens, new ones, empty histories)."""
    from winnow.sampling.penalties import PenaltyHistory

    generator = torch.Generator().manual_seed(4)
    histories = [PenaltyHistory(5, torch.device("cpu")) for _ in range(2)]
    for history in histories:
        for slot in range(5):
            outputs = torch.randint(
                0, 9, (slot * 3,), generator=torch.Generator().manual_seed(slot)
            )
            history.reset(slot, [1, 2], outputs.tolist())
    slot_ids = torch.tensor([3, 0, 4, 1])
    for _ in range(6):
        tokens = torch.randint(0, 9, (4,), generator=generator)
        for history, in_c in zip(histories, (True, False), strict=True):
            cols = torch.from_numpy(history.output.lengths[slot_ids.numpy()].copy())
            with monkeypatch.context() as patched:
                if not in_c:
                    patched.setattr(row_stats, "available", lambda: False)
                history.record(slot_ids, slot_ids.numpy(), tokens, cols)
    in_c, in_torch = histories
    assert torch.equal(in_c.output.data, in_torch.output.data)
    assert torch.equal(in_c.counts.data, in_torch.counts.data)
    assert int(in_c.counts.data.sum()) == int(in_c.output.lengths.sum())  # one count per token
    assert bool((in_c.counts.data > 1).any())  # some tokens came back


def _logprob_rows(vocab: int) -> torch.Tensor:
    """Rows that stress the logprob kernel: plain, ties everywhere, NaN and +inf, -inf halves,
    all -inf, all NaN, rising (the top-k threshold moves every step), a single finite value."""
    generator = torch.Generator().manual_seed(vocab)
    z = torch.randn(9, vocab, generator=generator) * 4
    z[1] = torch.randint(0, 4, (vocab,), generator=generator).float()
    z[2, ::3], z[2, 1] = torch.nan, torch.inf
    z[3, : vocab // 2] = -torch.inf
    z[4] = -torch.inf
    z[5] = torch.nan
    z[6] = torch.arange(vocab, dtype=torch.float32)
    z[7] = -torch.inf
    z[7, vocab - 1] = 2.5
    z[8] = torch.finfo(torch.float32).max
    return z


def _lse_bound(cleaned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact (float64) logsumexp of float32 rows, and how far the kernel's may be from it:
    each float32 exp within 2 ulp of exp (relative 2^-22) of an argument x - m rounded to float32
    (relative 2^-24 of |x - m|, so its exp off by that much), summed in float64 (negligible),
    then m + log(sum) rounded to float32 (half an ulp of the result)."""
    x = cleaned.double()
    lse = torch.logsumexp(x, dim=1)
    weights = torch.softmax(x, dim=1).nan_to_num(0.0)
    spread = (weights * (x - x.amax(1, keepdim=True)).abs().nan_to_num(0.0)).sum(1)
    bound = 2.0**-22 + spread * 2.0**-24 + lse.abs().nan_to_num(0.0) * 2.0**-24
    return lse, 2 * bound  # twice: float64 sums and the sum's rounding, with room


@pytest.mark.parametrize("vocab", [32771, 1003, 9])
def test_row_logprobs_normaliser_and_top_k_match_torch(isa, vocab: int) -> None:
    """row_logprobs on raw rows (NaN, +inf, ties, -inf rows): the top-k ids of
    logprob_ops.topk_lowest_ids on the cleaned rows (value desc, ties to the lower id), their
    values exactly, and logsumexp within float32 summation's error of the float64 one."""
    from winnow.sampling.logprob_ops import topk_lowest_ids

    z = _logprob_rows(vocab)
    cleaned = _cleaned(z)
    expected, bound = _lse_bound(cleaned)
    for k in sorted({0, 1, 5, min(20, vocab)}):
        lse, values, ids = row_stats.row_logprobs(z, k)
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isneginf(lse), ~finite)  # rows with no finite value: -inf
        assert bool(((lse[finite].double() - expected[finite]).abs() <= bound[finite]).all())
        assert values.shape == ids.shape == (z.shape[0], k)
        if k:
            assert torch.equal(ids, topk_lowest_ids(cleaned, k))
            assert torch.equal(values, cleaned.gather(1, ids))


def test_row_logprobs_reads_the_rows_asked_for(isa) -> None:
    z = _logprob_rows(1003)
    rows = torch.tensor([6, 0, 2, 2])
    lse, values, ids = row_stats.row_logprobs(z, 3, rows)
    all_lse, all_values, all_ids = row_stats.row_logprobs(z, 3)
    assert torch.equal(lse, all_lse[rows])
    assert torch.equal(values, all_values[rows]) and torch.equal(ids, all_ids[rows])


@pytest.mark.parametrize("k", [0, 1, 20])
def test_logprob_ops_in_c_gives_the_torch_logprobs(isa, monkeypatch, k: int) -> None:
    """logprob_ops.row_logprobs through the kernel and through torch's logsumexp and top-k, on
    the sampler's cleaned rows: the same ids, and logprobs apart by at most the two normalisers'
    float32 summation errors (the kernel's bound above, torch's float32 sum over V terms at most
    V ulp relative, here checked at the kernel's bound plus log1p of that)."""
    from winnow.sampling.logprob_ops import row_logprobs

    z = _cleaned(_logprob_rows(32771))
    rows = torch.tensor([8, 1, 3, 0])
    in_c = row_logprobs(z, k, rows)
    with monkeypatch.context() as patched:
        patched.setattr(row_stats, "available", lambda: False)
        in_torch = row_logprobs(z, k, rows)
    _, bound = _lse_bound(z[rows])
    bound = bound + 32771 * 2.0**-24
    assert bool(((in_c[0] - in_torch[0]).double().abs() <= bound).all())
    if k == 0:
        assert in_c[1] is None and in_torch[1] is None
        return
    assert in_c[1] is not None and in_c[2] is not None and in_torch[2] is not None
    assert torch.equal(in_c[1], in_torch[1])
    assert bool(((in_c[2] - in_torch[2]).double().abs() <= bound[:, None]).all())


def _slices(vocab: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate slices (ys, ids, keep) [12, width] as the thresholded route leaves them: ids
    distinct per row (some at the last vocab % 8 ids, where row_mass takes expf), values sorted
    descending, ties (row 1, and half-integers in rows 2-3), -inf values kept and removed, a row
    whose survivors are all -inf, a row with no survivor, survivors 87-100 below the maximum
    (exps at float32's underflow), and keep masks with holes (XTC) or a prefix."""
    generator = torch.Generator().manual_seed(seed)
    rows = 12
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:width] for _ in range(rows)])
    ids[4] = torch.arange(vocab - 1, vocab - 1 - width, -1)  # the largest ids, distinct
    ys = torch.randn(rows, width, generator=generator) * 4
    ys[1] = 0.5
    ys[2:4] = (ys[2:4] * 2).round() / 2
    ys[5, -4:] = -torch.inf
    ys[6] = -torch.inf
    ys[8, 1:] = ys[8, 0] - torch.linspace(86.0, 100.0, width - 1)
    ys = ys.sort(dim=1, descending=True).values
    keep = torch.rand(rows, width, generator=generator) < 0.4
    keep[:, 0] = True
    keep[7] = False
    keep[9] = torch.arange(width) < 3
    keep[10] = True
    return ys, ids, keep


@pytest.mark.parametrize(("vocab", "width"), [(131072, 300), (1003, 40), (9, 9), (37, 5)])
def test_slice_logprobs_are_row_logprobs_of_the_dense_rows(isa, vocab: int, width: int) -> None:
    """slice_logprobs from the slice alone against row_logprobs over the [n, V] row the slice
    stands for (survivors at their values, every other token -inf): the same normaliser, the
    same top ids and values (past the survivors the lowest other ids at -inf), the sampled
    token's value, bit for bit, with and without a row selection."""
    for seed in range(3):
        ys, ids, keep = _slices(vocab, width, seed)
        dense = torch.full((ys.shape[0], vocab), -torch.inf)
        dense.scatter_(1, ids, torch.where(keep, ys, -torch.inf))
        tokens = torch.where(keep, ids, vocab).amin(1) % vocab
        tokens[0] = ids[0, -1]  # a token that may be no survivor: -inf
        for k in sorted({0, 1, 5, min(20, vocab)}):
            lse, values, top_ids = row_stats.row_logprobs(dense, k)
            got = row_stats.slice_logprobs(ys, ids, keep, k, vocab, tokens)
            assert torch.equal(got[0], lse)
            assert torch.equal(got[1], dense.gather(1, tokens[:, None])[:, 0])
            assert torch.equal(got[2], values) and torch.equal(got[3], top_ids)
        rows = torch.tensor([10, 4, 6, 4])
        got = row_stats.slice_logprobs(ys, ids, keep, 5, vocab, tokens[rows], rows)
        lse, values, top_ids = row_stats.row_logprobs(dense, 5, rows)
        assert torch.equal(got[0], lse) and torch.equal(got[2], values)
        assert torch.equal(got[3], top_ids)


def test_slice_logprobs_without_the_kernel_builds_the_dense_rows(monkeypatch) -> None:
    """logprob_ops.slice_logprobs through the kernel and, where it is unavailable (CUDA), through
    the dense rows and torch: the same top ids, the logprobs within the float32 normalisers'
    bound of test_logprob_ops_in_c_gives_the_torch_logprobs."""
    from winnow.sampling.logprob_ops import slice_logprobs
    from winnow.sampling.step import Pick

    vocab = 1003
    ys, ids, keep = _slices(vocab, 40, 0)
    tokens = torch.where(keep & (ys > -torch.inf), ids, vocab).amin(1)
    rows = torch.tensor([3, 0, 10, 4])  # rows with finite survivors
    pick = Pick(ids, ys, keep, tokens, torch.zeros(len(ys), dtype=torch.bool))
    in_c = slice_logprobs(pick, 5, vocab, tokens[rows], rows)
    with monkeypatch.context() as patched:
        patched.setattr(row_stats, "available", lambda: False)
        in_torch = slice_logprobs(pick, 5, vocab, tokens[rows], rows)
    dense = pick.dense(vocab, rows)
    _, bound = _lse_bound(dense)
    bound = bound + vocab * 2.0**-24
    assert in_c[1] is not None and in_c[2] is not None and in_torch[2] is not None
    assert torch.equal(in_c[1], in_torch[1])
    assert bool(((in_c[0] - in_torch[0]).double().abs() <= bound).all())
    assert bool(((in_c[2] - in_torch[2]).double().abs() <= bound[:, None]).all())
