"""Block tables mirrored on the device: a step uploads only the entries that changed."""

from __future__ import annotations

import numpy as np
import torch

from winnow.engine.block_tables import BlockTables
from winnow.engine.host_staging import HostStaging


class Seq:
    def __init__(self, seq_id: int, table: list[int]) -> None:
        self.seq_id = seq_id
        self.block_table = table


def uploaded(tables: BlockTables, seqs: list[Seq]) -> torch.Tensor:
    rows = tables.rows(seqs)  # type: ignore[arg-type]
    tables.upload()
    return tables.table[torch.from_numpy(rows)]


def expected(seqs: list[Seq], width: int) -> torch.Tensor:
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, seq in enumerate(seqs):
        out[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.long)
    return out


def test_only_changed_entries_are_uploaded() -> None:
    """The device copy is separate (as on CUDA): an entry corrupted on the device stays so until
    its sequence changes it, so nothing but the changes was written."""
    tables = BlockTables(2, 4, HostStaging(torch.device("cpu")), shared=False)
    a, b = Seq(0, [5, 6]), Seq(1, [7])
    assert torch.equal(uploaded(tables, [a, b]), expected([a, b], 4))
    row_a = int(tables.rows([a])[0])  # type: ignore[list-item]
    tables.table[row_a, 0] = 99  # unchanged from now on: never re-sent
    b.block_table.append(8)
    got = uploaded(tables, [a, b])
    assert int(got[0, 0]) == 99 and torch.equal(got[1], expected([b], 4)[0])
    a.block_table.append(9)
    got = uploaded(tables, [a, b])
    assert int(got[0, 0]) == 99 and int(got[0, 2]) == 9


def test_released_rows_are_rebuilt_and_the_tables_grow() -> None:
    """A preempted sequence comes back with other blocks; more sequences or longer tables than
    sized for grow the arrays."""
    tables = BlockTables(1, 2, HostStaging(torch.device("cpu")), shared=False)
    a = Seq(0, [3, 4])
    uploaded(tables, [a])
    tables.release(0)
    a.block_table[:] = [10, 11]
    b, c = Seq(1, [1, 2, 3, 4, 5]), Seq(2, [6])
    seqs = [b, a, c]
    assert torch.equal(uploaded(tables, seqs)[:, :5], expected(seqs, 5))
    assert tables.host.shape[0] >= 3 and tables.width >= 5
    assert len(set(np.asarray(tables.rows(seqs)).tolist())) == 3  # type: ignore[arg-type]


def test_on_a_cpu_the_device_table_is_the_host_array() -> None:
    tables = BlockTables(2, 3, HostStaging(torch.device("cpu")))
    seq = Seq(0, [4, 5])
    tables.rows([seq])  # type: ignore[list-item]
    tables.upload()
    assert tables.table.data_ptr() == tables.host.ctypes.data
    assert tables.table[tables.rows([seq])[0], :2].tolist() == [4, 5]  # type: ignore[list-item]
