"""Pipeline schedule builders: 1F1B, interleaved 1F1B, DualPipe and DualPipeV as per-rank action lists.

`build_schedule` returns one list of `Action`s per pipeline rank (see actions.py
for the notation). Conventions a runtime relies on:

- 1F1B: one chunk per rank (chunk 0 = stage r); micro-batches 0..M-1 enter at rank 0.
- Interleaved 1F1B (V chunks per rank): chunk v is stage v*PP + r; activations flow r -> r+1,
  and from the last rank's chunk v to rank 0's chunk v+1. With `overlap` (1F1B or interleaved)
  the steady state's forward and backward are one FB action.
- DualPipe: chunk 0 is stage r of the forward-direction model (micro-batches
  0..M/2-1 enter at rank 0), chunk 1 is stage PP-1-r of the reverse-direction
  model (micro-batches M/2..M-1 enter at rank PP-1). Chunk 0 activations flow
  r -> r+1, chunk 1 activations r -> r-1; gradients flow the other way.
- DualPipeV: chunk 0 is stage r and chunk 1 stage 2PP-1-r of one model; all
  micro-batches enter at rank 0's chunk 0. Chunk 0 flows r -> r+1, chunk 1
  r -> r-1; at rank PP-1 chunk 0 hands its output to chunk 1 of the same rank
  (and chunk 1's input gradient to chunk 0) without any communication action.
- Communication: a RECV is always before the compute that consumes its tensor
  and a SEND after the compute that produces it; usually in the batch right
  before / right after, but some are posted a compute early or late so that
  neighbouring ranks post matching batches together. A runtime runs each maximal
  run of consecutive SEND/RECV actions as one batch (batch_isend_irecv) and waits
  for it before the next compute, keeping received tensors by (kind, chunk,
  micro-batch) until used; the lists are deadlock-free even when a send only
  completes once its receive is posted (the simulator's default model). Between
  two ranks, the sends in one direction and their receives are in the same
  order, as NCCL's in-order matching needs.
- W names the BI it completes: the oldest deferred BI of its chunk (FIFO per
  chunk, and also per rank). Under DualPipe, paired F&B actions always run a full
  backward; BI/W appear only in phases 3, 6 and 7, and not at all with
  split_backward=False.
"""
from __future__ import annotations

from collections import defaultdict, deque

from megadual.config import SCHEDULES, ConfigError
from megadual.config_validate import validate_schedule_args
from megadual.pipeline.actions import Action, Kind, Layout, ScheduleError, match_messages
from megadual.pipeline.program import RankProgram


def pipeline_layout(name: str, pp_size: int, num_microbatches: int, virtual_stages: int = 1) -> Layout:
    """Which (rank, chunk) runs each stage, and which micro-batches take which path."""
    ranks = range(pp_size)
    if name in ("1f1b", "interleaved"):
        path = tuple((r, v) for v in range(virtual_stages if name == "interleaved" else 1) for r in ranks)
        return Layout((path,), (range(num_microbatches),))
    if name == "dualpipe":
        half = num_microbatches // 2
        forward_path = tuple((r, 0) for r in ranks)
        reverse_path = tuple((pp_size - 1 - s, 1) for s in ranks)
        return Layout((forward_path, reverse_path), (range(half), range(half, num_microbatches)))
    if name == "dualpipev":
        v_path = tuple((r, 0) for r in ranks) + tuple((pp_size - 1 - s, 1) for s in ranks)
        return Layout((v_path,), (range(num_microbatches),))
    raise ValueError(f"--pipeline-schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")


def build_schedule(name: str, pp_size: int, num_microbatches: int, split_backward: bool = True,
                   virtual_stages: int = 1, overlap: bool = False) -> list[list[Action]]:
    """One action list per rank. `virtual_stages`: V of the interleaved schedule (1 elsewhere);
    `overlap` (--overlap-moe-expert-parallel-comm): 1F1B's and interleaved's steady state pairs
    each forward with a backward of another micro-batch (DualPipe's and DualPipeV's always do)."""
    validate_schedule_args(name, pp_size, num_microbatches)
    if (name == "interleaved") != (virtual_stages > 1):
        raise ConfigError(f"--num-virtual-stages-per-pipeline-rank ({virtual_stages}) must be >= 2 under "
                          f"--pipeline-schedule interleaved and 1 under {name}")
    layout = pipeline_layout(name, pp_size, num_microbatches, virtual_stages)
    schedules = []
    for rank in range(pp_size):
        program = RankProgram(layout, rank, split_backward)
        if name == "interleaved" or (name == "1f1b" and overlap):
            _megatron_1f1b(program, pp_size, num_microbatches, virtual_stages, overlap)
        elif name == "1f1b":
            _one_f_one_b(program, pp_size, num_microbatches)
        else:
            _dual(program, *_dual_shape(name, pp_size, num_microbatches, rank))
        schedules.append(program.actions)
    return schedules


def _one_f_one_b(program: RankProgram, pp_size: int, num_microbatches: int) -> None:
    """Megatron's non-interleaved 1F1B: warm-up forwards, one forward one backward,
    cool-down backwards. With split_backward it is ZB-H1 (Qi et al., Zero Bubble
    Pipeline Parallelism): backwards are BI and rank r keeps r W's deferred, so the
    last ranks return gradients sooner and the first ranks' cool-down waits are
    filled by W's; peak activations stay those of 1F1B."""
    warmup = min(pp_size - 1 - program.rank, num_microbatches)
    steady = num_microbatches - warmup

    def backward(upstream_busy: bool) -> None:
        # While the previous rank is busy with a forward, running W before sending
        # the gradient costs nothing and keeps its send/receive batch paired with ours.
        program.backward(0, defer_weights=True, send=not upstream_busy)
        if len(program.deferred) > program.rank:
            program.weights()
        if upstream_busy:
            program.send_backward(0)

    for _ in range(warmup):
        program.forward(0)
    for i in range(steady):
        program.forward(0)
        backward(upstream_busy=i < steady - 1)
    for _ in range(warmup):
        backward(upstream_busy=False)
    while program.deferred:
        program.weights()


def _megatron_1f1b(program: RankProgram, pp_size: int, num_microbatches: int, virtual_stages: int,
                   overlap: bool) -> None:
    """Megatron's 1F1B as it runs with V chunks per rank (interleaved when V > 1; Narayanan et al.
    2021): the k-th forward of a rank is on chunk (k // PP) % V, the k-th backward on V-1 minus
    that, so groups of PP micro-batches go through the chunks in turn; rank r runs
    2(PP-r-1) + (V-1)PP forwards before its first backward (PP-r-1 when V = 1).

    Steps are a warm-up forward, a steady forward and backward, or a cool-down backward. As in
    Megatron, one communication batch sits between two steps: the first's sends and the
    second's receives, so neighbours post matching batches. With `overlap` each steady forward
    and backward is one paired F&B (a full backward), and one more forward warms up, so that a
    last stage never pairs a micro-batch's backward with its own forward. Other backwards are BI
    with the W split; rank r keeps up to r W's deferred, each run right after a batch."""
    total, rank, chunks = num_microbatches * virtual_stages, program.rank, virtual_stages
    warmup = pp_size - rank - 1 if chunks == 1 else 2 * (pp_size - rank - 1) + (chunks - 1) * pp_size
    warmup = min(warmup + int(overlap), total)

    def forward_chunk(k: int) -> int:
        return (k // pp_size) % chunks

    steps: list[list[tuple[str, int]]] = [[("F", forward_chunk(k))] for k in range(warmup)]
    for k in range(total - warmup):
        f, b = ("F", forward_chunk(warmup + k)), ("B", chunks - 1 - forward_chunk(k))
        steps.append([("FB", f[1], b[1])] if overlap else [f, b])
    steps += [[("B", chunks - 1 - forward_chunk(k))] for k in range(total - warmup, total)]

    def receives(step: list[tuple]) -> None:
        for kind, *chunk in step:
            if "F" in kind:
                program.recv_forward(chunk[0])
            if "B" in kind:
                program.recv_backward(chunk[-1])

    receives(steps[0])
    for i, step in enumerate(steps):
        for kind, *chunk in step:
            if kind == "FB":
                program.pair(*chunk)
            elif kind == "F":
                program.forward(chunk[0], recv=False, send=False)
            else:
                program.backward(chunk[0], defer_weights=True, recv=False, send=False)
        for kind, *chunk in step:
            if "F" in kind:
                program.send_forward(chunk[0])
            if "B" in kind:
                program.send_backward(chunk[-1])
        if i + 1 < len(steps):
            receives(steps[i + 1])
        while len(program.deferred) > rank:
            program.weights()
    while program.deferred:
        program.weights()


def _dual_shape(name: str, pp_size: int, num_microbatches: int, rank: int) -> tuple[int, int, int, int]:
    """(n, h, micro-batches per direction, chunk of phase 0) of a rank. DualPipeV on PP
    ranks gives each rank exactly the list of DualPipe's first half on 2PP ranks with
    all micro-batches in each direction (the "cut in half" of deepseek-ai/DualPipe)."""
    if name == "dualpipe":
        return (pp_size // 2, min(rank, pp_size - 1 - rank), num_microbatches // 2,
                int(rank >= pp_size // 2))
    return pp_size, rank, num_microbatches, 0


def _dual(program: RankProgram, n: int, h: int, per_direction: int, p0: int) -> None:
    """The eight phases of DualPipe (DeepSeek-V3 report 3.2.1, deepseek-ai/DualPipe) on
    a rank h ranks in from its end of a 2n-stage pipe.

    Phase 0 (chunk p0) is the direction that enters nearest this rank, phase 1 the
    other. Where a receive is posted early or a send late, it is so that the batch it
    joins is posted by the peer at about the same moment: a batch completes only
    when all its messages do.
    """
    p1 = 1 - p0
    outer = n - h - 1  # ranks between this one and its end of the pipeline
    inner = h == n - 1  # where the two directions meet

    # 1. forwards of the near direction
    for _ in range(2 * outer):
        program.forward(p0)
    # 2. forwards of both directions; each next phase-0 input is fetched a step early
    program.recv_forward(p0)
    for i in range(h + 1):
        program.forward(p0, recv=False, send=inner)
        program.recv_forward(p0)
        program.forward(p1, send=not inner or i < h)
        if not inner:
            program.send_forward(p0)
    # 3. backward (weights deferred), W, forward, all on the far direction
    for _ in range(outer):
        program.backward(p1, defer_weights=True)
        program.recv_forward(p1)
        program.weights()
        program.forward(p1, recv=False)
    # 4. steady state: paired F0&B1, F1&B0
    for i in range(per_direction - 2 * n + h + 1):
        if i == 0 and inner:
            # Unpaired, as in the reference (the bubble formula assumes it), with the
            # phase-1 output held back in phase 2 sent in between.
            program.forward(p0, recv=False, send=False)
            program.send_forward(p1)
            program.backward(p1, send=False)
            program.send_forward(p0)
            program.send_backward(p1)
        else:
            program.forward_backward(p0, p1, recv_forward=i > 0)
        program.forward_backward(p1, p0)
    # 5. draining the far direction's forwards
    for _ in range(outer):
        program.backward(p1)
        program.forward_backward(p1, p0)
    # 6. backwards of both directions; the last h+1 defer their weights
    for i in range(2 * (h + 1)):
        program.backward(p1 if i % 2 == 0 else p0, defer_weights=i >= h + 1)
    # 7. W, then backward (weights deferred) of the near direction
    for _ in range(outer):
        program.weights()
        program.backward(p0, defer_weights=True)
    # 8. the remaining W's
    for _ in range(h + 1):
        program.weights()


def check_schedule(schedules: list[list[Action]], layout: Layout | None = None) -> None:
    """Static checks any schedule must pass; raises ScheduleError naming the first fault.

    Per rank and chunk: each micro-batch's forward and backward exactly once, forward
    first; each BI completed by exactly one later W, oldest first; each receive before
    the compute that consumes it and each send after the compute that produces it;
    sends and receives pair up in the same order between every two ranks. With a
    layout, also: every stage runs all micro-batches of its path, and each input comes
    from where the layout puts the neighbouring stage (a receive from that rank, or
    the same rank's earlier compute).
    """
    match_messages(schedules)
    for rank, actions in enumerate(schedules):
        _check_rank(rank, actions)
    if layout is not None:
        _check_layout(schedules, layout)


def _check_rank(rank: int, actions: list[Action]) -> None:
    forwards: dict[tuple[int, int], int] = {}
    backwards: dict[tuple[int, int], int] = {}
    deferred: defaultdict[int, deque[int]] = defaultdict(deque)

    def fail(index: int, why: str) -> None:
        raise ScheduleError(f"rank {rank} action {index} {actions[index]}: {why}")

    for index, action in enumerate(actions):
        if action.forward_of:
            if action.forward_of in forwards:
                fail(index, "second forward of this micro-batch")
            forwards[action.forward_of] = index
        if action.backward_of:
            if action.backward_of not in forwards or action.backward_of == action.forward_of:
                fail(index, "backward before its forward")
            if action.backward_of in backwards:
                fail(index, "second backward of this micro-batch")
            backwards[action.backward_of] = index
        if action.kind == Kind.BI:
            deferred[action.chunk].append(action.mb)
        if action.kind == Kind.W:
            queue = deferred[action.chunk]
            if not queue or queue.popleft() != action.mb:
                fail(index, "W is not for the oldest deferred BI of its chunk")
    if set(forwards) != set(backwards):
        missing = sorted(set(forwards) - set(backwards))
        raise ScheduleError(f"rank {rank}: forwards without a backward: {missing}")
    if any(deferred.values()):
        raise ScheduleError(f"rank {rank}: BI without a W: {dict(deferred)}")

    for index, action in enumerate(actions):
        if not action.is_comm:
            continue
        key = (action.chunk, action.mb)
        compute = forwards if action.kind in (Kind.SEND_F, Kind.RECV_F) else backwards
        if key not in compute:
            fail(index, "no compute on this rank produces or consumes it")
        if action.is_send and index < compute[key]:
            fail(index, "sent before it is computed")
        if not action.is_send and index > compute[key]:
            fail(index, "received after the compute that needs it")


def _check_layout(schedules: list[list[Action]], layout: Layout) -> None:
    for path, microbatches in zip(layout.paths, layout.microbatches):
        for stage, (rank, chunk) in enumerate(path):
            actions = schedules[rank]
            done = sorted(a.forward_of[1] for a in actions if a.forward_of and a.forward_of[0] == chunk)
            if done != list(microbatches):
                raise ScheduleError(f"rank {rank} chunk {chunk} (stage {stage}) runs micro-batches "
                                    f"{done}, expected {list(microbatches)}")
            if stage > 0:
                _check_input(actions, rank, chunk, path[stage - 1], Kind.RECV_F, "forward_of")
            if stage < len(path) - 1:
                _check_input(actions, rank, chunk, path[stage + 1], Kind.RECV_B, "backward_of")


def _check_input(actions: list[Action], rank: int, chunk: int, source: tuple[int, int],
                 recv: Kind, part: str) -> None:
    """Each compute of `part` on (rank, chunk) gets its input from `source`: a receive
    from that rank, or, when it is this rank, the same compute on its chunk earlier."""
    src_rank, src_chunk = source
    for index, action in enumerate(actions):
        if getattr(action, part) is None or getattr(action, part)[0] != chunk:
            continue
        mb = getattr(action, part)[1]
        if src_rank == rank:
            feeds = [i for i, a in enumerate(actions[:index]) if getattr(a, part) == (src_chunk, mb)]
        else:
            feeds = [i for i, a in enumerate(actions[:index])
                     if a.kind == recv and (a.chunk, a.mb, a.peer) == (chunk, mb, src_rank)]
        if not feeds:
            raise ScheduleError(f"rank {rank} action {index} {action}: its input from rank {src_rank} "
                                f"chunk {src_chunk} is not received or computed before it")
