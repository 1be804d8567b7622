"""The embedding's and the output head's vocabulary rows in a checkpoint: the real ones only.

TP pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP, so the padded
tables differ in size from one TP to another. The padding is never read (no token id reaches
it, the loss gives its logits no probability), so a checkpoint keeps the real rows alone, as
one tensor of the real vocabulary's size whatever the layout, and loading pads them again with
zeros. Under TP the saved tensor is a DTensor laid out as torch shards it (equal pieces of
ceil(rows / TP) rows); moving between that and the TP shards of the padded table goes through
the whole table for a moment, one tensor at a time.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from megadual.parallel.params import ParamRecord


def has_padding(record: ParamRecord) -> bool:
    return record.spec.real_rows is not None and record.spec.real_rows < record.full_shape[0]


def real_rows(record: ParamRecord, local: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """The real rows of a padded table (the parameter or a state shaped like it), from this rank's
    TP shard `local`: a tensor of them (one process) or a DTensor (TP, on `mesh`)."""
    rows = record.spec.real_rows
    whole = _gathered(record, local)[:rows]
    if record.spec.tp is None:
        return whole.clone()
    start, end = _torch_piece(rows, record.spec.tp.size, record.spec.tp.rank)
    return DTensor.from_local(whole[start:end].clone(), mesh, [Shard(0)], run_check=False,
                              shape=whole.shape, stride=whole.stride())


def padded_rows(record: ParamRecord, saved: torch.Tensor) -> torch.Tensor:
    """This rank's TP shard of the padded table from `real_rows`' tensor (as loaded); zero padding."""
    tp = record.spec.tp
    if tp is None:
        whole = saved
    else:
        rows = record.spec.real_rows
        size = -(-rows // tp.size)
        piece = saved.to_local() if isinstance(saved, DTensor) else saved
        padded = piece.new_zeros(size, *piece.shape[1:])
        padded[:piece.shape[0]] = piece
        pieces = [torch.empty_like(padded) for _ in range(tp.size)]
        dist.all_gather(pieces, padded, group=tp.group)
        whole = torch.cat([p[:e - s] for p, (s, e) in zip(pieces, (_torch_piece(rows, tp.size, r)
                                                                      for r in range(tp.size)))])
    table = whole.new_zeros(record.full_shape[0], *whole.shape[1:])
    table[:whole.shape[0]] = whole
    return record.local_piece(table).clone()


def _gathered(record: ParamRecord, local: torch.Tensor) -> torch.Tensor:
    tp = record.spec.tp
    if tp is None:
        return local
    pieces = [torch.empty_like(local) for _ in range(tp.size)]
    dist.all_gather(pieces, local.contiguous(), group=tp.group)
    return torch.cat(pieces)


def _torch_piece(rows: int, size: int, rank: int) -> tuple[int, int]:
    """[start, end) of `rank`'s rows as DTensor's Shard(0) cuts `rows` over `size` ranks."""
    step = -(-rows // size)
    return min(rank * step, rows), min((rank + 1) * step, rows)
