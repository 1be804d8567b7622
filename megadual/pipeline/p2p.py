"""The communication half of a pipeline rank: posting and waiting its sends and receives.

Tensors are keyed by (kind, local chunk, micro-batch) as the actions name them. A
stage's output goes to the outbox until its SEND action posts it, or straight into
the inbox when the next stage is on this rank; a RECV action posts a receive whose
tensor enters the inbox once waited for. Each maximal run of consecutive SEND/RECV
actions is one `batch_isend_irecv`. Where the backend gives one handle per op
(gloo), each receive is waited for only by the compute that consumes it and each
send only at the end of the step, so no rank idles on a send; elsewhere (NCCL,
where p2p ops between two ranks share one stream) a batch is waited for whole, as
it is posted.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from megadual.parallel import collectives
from megadual.pipeline.actions import Action, Kind

Key = tuple[Kind, int, int]  # (RECV_F / RECV_B / SEND_F / SEND_B, local chunk, micro-batch)
Timed = Callable[[str, Callable, object], None]


class Mailbox:
    def __init__(self, group_ranks: Sequence[int], group, activation_shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device, waits_per_op: bool, training: bool):
        """`training`: received activations require grad, so their backward yields input gradients."""
        self.group_ranks, self.group = list(group_ranks), group
        self.activation_shape, self.dtype, self.device = tuple(activation_shape), dtype, device
        self.waits_per_op, self.training = waits_per_op, training
        self.reset()

    def reset(self) -> None:
        self._inbox: dict[Key, torch.Tensor] = {}
        self._outbox: dict[Key, torch.Tensor] = {}
        self._pending: dict[Key, tuple[object, torch.Tensor]] = {}  # receives posted, not yet waited for
        self._sends_in_flight: list[tuple[object, torch.Tensor]] = []  # kept alive until waited for

    def deliver_locally(self, key: Key, tensor: torch.Tensor) -> None:
        """A tensor for a chunk of this rank (`key` is the receive it stands for)."""
        if key[0] == Kind.RECV_F:
            tensor.requires_grad_(self.training)
        self._inbox[key] = tensor

    def to_send(self, key: Key, tensor: torch.Tensor, what: str) -> None:
        """Keep a tensor for the SEND action `key`; `what` names it in a shape error."""
        if tuple(tensor.shape) != self.activation_shape or tensor.dtype != self.dtype:
            raise RuntimeError(f"{what}: tensor of shape {tuple(tensor.shape)} {tensor.dtype} to send, the "
                               f"pipeline passes {self.activation_shape} {self.dtype}")
        self._outbox[key] = tensor.contiguous()

    def take(self, key: Key) -> torch.Tensor:
        return self._inbox.pop(key)

    def wait_for_inputs(self, action: Action, timed: Timed) -> None:
        """Wait for the receives `action` consumes that are still in flight."""
        keys = []
        if action.forward_of:
            keys.append((Kind.RECV_F, *action.forward_of))
        if action.backward_of:
            keys.append((Kind.RECV_B, *action.backward_of))
        for key in keys:
            if key in self._pending:
                work, tensor = self._pending.pop(key)
                timed(f"comm:wait {key[0].value}{key[1]}.{key[2]}", lambda w: w.wait(), work)
                self.deliver_locally(key, tensor)

    def post(self, actions: list[Action]) -> None:
        """Post one batch of SEND/RECV actions."""
        ops, received = [], []
        for action in actions:
            peer = self.group_ranks[action.peer]
            if action.is_send:
                tensor = self._outbox.pop((action.kind, action.chunk, action.mb))
                ops.append(collectives.send(tensor, peer, self.group))
            else:
                tensor = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
                ops.append(collectives.receive(tensor, peer, self.group))
                received.append(((action.kind, action.chunk, action.mb), tensor))
        works = collectives.batch_isend_irecv(ops)
        if not self.waits_per_op:
            for work in works:
                work.wait()
            for key, tensor in received:
                self.deliver_locally(key, tensor)
            return
        receives = iter(received)
        for work, op in zip(works, ops, strict=True):
            if op.op is dist.isend:
                self._sends_in_flight.append((work, op.tensor))
            else:
                key, tensor = next(receives)
                self._pending[key] = (work, tensor)

    def finish_sends(self) -> None:
        for work, _tensor in self._sends_in_flight:
            work.wait()
        self._sends_in_flight = []

    def leftovers(self) -> dict[str, list]:
        return {"received but unused": list(self._inbox) + list(self._pending),
                "computed but not sent": list(self._outbox)}
