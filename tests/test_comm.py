"""TP/SP collectives across two real gloo processes: forward values and their adjoint gradients."""
import gc
import os
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megadual.parallel import comm
from megadual.training.distributed import free_port


def _check(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    group = dist.new_group([0, 1])
    try:
        others = {r: torch.arange(8.0).view(4, 2) * (r + 1) for r in range(2)}
        weights = {r: torch.full((4, 2), float(r + 2)) for r in range(2)}  # each rank's upstream gradient

        def run(fn, weight):
            x = others[rank].clone().requires_grad_()
            y = fn(x, group)
            (y * weight[: y.shape[0]]).sum().backward()
            return y.detach(), x.grad

        y, g = run(comm.copy_to_tp_region, weights[rank])
        assert torch.equal(y, others[rank]) and torch.equal(g, weights[0] + weights[1])
        y, g = run(comm.reduce_from_tp_region, weights[rank])
        assert torch.equal(y, others[0] + others[1]) and torch.equal(g, weights[rank])
        y, g = run(comm.gather_sequence, torch.cat([weights[rank], weights[rank]]))
        assert torch.equal(y, torch.cat([others[0], others[1]]))
        assert torch.equal(g, weights[0] + weights[1])  # reduce-scatter of the two ranks' gradients
        y, g = run(comm.reduce_scatter_sequence, weights[rank][:2])
        assert torch.equal(y, (others[0] + others[1])[2 * rank: 2 * rank + 2])
        assert torch.equal(g, torch.cat([weights[0][:2], weights[1][:2]]))  # all-gather of the gradients
        _check_exchange(rank, group)
    finally:
        dist.destroy_process_group()


def _check_exchange(rank: int, group) -> None:
    """Uneven all-to-all as start/wait: rank r sends send[r][q] rows to rank q."""
    send = [[1, 2], [3, 1]]
    rows = {r: torch.arange(sum(send[r]) * 2.0).view(-1, 2) + 100 * r for r in range(2)}
    x = rows[rank].clone().requires_grad_()
    recv_counts = [send[q][rank] for q in range(2)]
    pending = comm.Exchange(group, recv_counts, send[rank]).start(x)
    other_work = x.detach() * 2  # runs while the rows travel
    (y,) = pending.wait()
    expected = torch.cat([rows[q].split(send[q])[rank] for q in range(2)])
    assert torch.equal(y, expected) and torch.equal(other_work, rows[rank] * 2)
    (y * (rank + 1)).sum().backward()  # the gradient of a row is the factor of the rank it went to
    factors = torch.cat([torch.full((n, 2), float(q + 1)) for q, n in enumerate(send[rank])])
    assert torch.equal(x.grad, factors)


def test_collectives_and_their_gradients_across_two_processes():
    mp.start_processes(_check, args=(free_port(),), nprocs=2, start_method="spawn")


def test_exchange_leaves_no_reference_cycle():
    """Cyclic garbage is freed only by a garbage collection; one that frees gloo work at
    interpreter exit, after the group is destroyed, aborts the process."""
    gc.disable()
    try:
        x = torch.randn(4, 3, requires_grad=True)
        exchange = comm.Exchange(None, [4], [4]).start(x * 2)
        freed = weakref.ref(exchange)
        exchange.wait()[0].sum().backward()
        del exchange
        assert freed() is None
        assert torch.equal(x.grad, torch.full_like(x, 2.0))
    finally:
        gc.enable()
