"""Schedule builders: structure, communication conventions, validation, static checks."""
import pytest

from megadual.pipeline.actions import Action, Kind, ScheduleError, UnmatchedCommError
from megadual.pipeline.schedules import (
    build_schedule,
    check_schedule,
    pipeline_layout,
    validate_schedule_args,
)
from megadual.pipeline.simulate import simulate

SIZES = {
    "1f1b": [(1, 3), (2, 1), (4, 3), (4, 8), (8, 20)],
    "dualpipe": [(2, 4), (4, 8), (4, 14), (8, 20), (16, 32)],
    "dualpipev": [(1, 2), (2, 5), (3, 6), (4, 10), (8, 19)],
}


def compute(actions):
    return [a for a in actions if not a.is_comm]


@pytest.mark.parametrize("name,pp,m", [(n, pp, m) for n, sizes in SIZES.items() for pp, m in sizes])
@pytest.mark.parametrize("split", [True, False])
def test_every_schedule_passes_check(name, pp, m, split):
    schedules = build_schedule(name, pp, m, split_backward=split)
    check_schedule(schedules, pipeline_layout(name, pp, m))
    kinds = {a.kind for actions in schedules for a in actions}
    assert (Kind.W in kinds) == split
    if not split:
        assert Kind.BI not in kinds


def reference_dualpipe_tokens(n, h, per_direction):
    """The eight phases of REFERENCE.md, written out for one rank (phase 0/1 per token)."""
    outer, inner = n - h - 1, h == n - 1
    tokens = ["F0"] * (2 * outer) + ["F0", "F1"] * (h + 1) + ["BI1", "W", "F1"] * outer
    for i in range(per_direction - 2 * n + h + 1):
        tokens += (["F0", "B1"] if i == 0 and inner else ["F0&B1"]) + ["F1&B0"]
    tokens += ["B1", "F1&B0"] * outer
    tokens += [("BI" if i >= h + 1 else "B") + ("1" if i % 2 == 0 else "0") for i in range(2 * (h + 1))]
    return tokens + ["W", "BI0"] * outer + ["W"] * (h + 1)


def tokens(actions, phase_of_chunk):
    out = []
    for a in compute(actions):
        if a.kind == Kind.FB:
            out.append(f"F{phase_of_chunk[a.chunk]}&B{phase_of_chunk[a.b_chunk]}")
        elif a.kind == Kind.W:
            out.append("W")
        else:
            out.append(f"{a.kind.value}{phase_of_chunk[a.chunk]}")
    return out


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (8, 20), (8, 26), (16, 32)])
def test_dualpipe_follows_the_eight_phases(pp, m):
    schedules = build_schedule("dualpipe", pp, m)
    for rank, actions in enumerate(schedules):
        flip = int(rank >= pp // 2)  # second half: phase 0 is the reverse direction (chunk 1)
        h = min(rank, pp - 1 - rank)
        assert tokens(actions, {flip: 0, 1 - flip: 1}) == reference_dualpipe_tokens(pp // 2, h, m // 2)


@pytest.mark.parametrize("pp,m", [(1, 2), (2, 4), (3, 7), (4, 10), (4, 13)])
def test_dualpipev_is_dualpipe_cut_in_half(pp, m):
    for rank, actions in enumerate(build_schedule("dualpipev", pp, m)):
        assert tokens(actions, {0: 0, 1: 1}) == reference_dualpipe_tokens(pp, rank, m)


@pytest.mark.parametrize("pp,m", [(4, 8), (8, 20), (16, 40)])
def test_dualpipe_phase_counts(pp, m):
    n, c = pp // 2, m // 2
    for rank, actions in enumerate(build_schedule("dualpipe", pp, m)):
        h = min(rank, pp - 1 - rank)
        inner = int(h == n - 1)
        count = {k: sum(a.kind == k for a in actions) for k in Kind}
        # phase 4 pairs both directions C-P+h+1 times (less the innermost ranks' first, unpaired),
        # phase 5 adds one pair per outer rank
        assert count[Kind.FB] == 2 * (c - pp + h + 1) + (n - h - 1) - inner
        assert count[Kind.F] == 3 * (n - h - 1) + 2 * (h + 1) + inner
        assert count[Kind.BI] == count[Kind.W] == 2 * (n - h - 1) + (h + 1)
        assert count[Kind.B] == (n - h - 1) + (h + 1) + inner
        assert count[Kind.F] + count[Kind.FB] == m  # every micro-batch of both directions, once
        assert count[Kind.B] + count[Kind.BI] + count[Kind.FB] == m


@pytest.mark.parametrize("pp,m", [(4, 4), (4, 9), (8, 16)])
def test_1f1b_is_warmup_steady_cooldown(pp, m):
    for rank, actions in enumerate(build_schedule("1f1b", pp, m, split_backward=False)):
        warmup = min(pp - 1 - rank, m)
        expected = ["F"] * warmup + ["F", "B"] * (m - warmup) + ["B"] * warmup
        assert [a.kind.value for a in compute(actions)] == expected


def test_zero_bubble_1f1b_splits_backwards_and_defers_w_by_rank():
    pp, m = 4, 8
    for rank, actions in enumerate(build_schedule("1f1b", pp, m)):
        kinds = [a.kind for a in compute(actions)]
        assert kinds.count(Kind.BI) == kinds.count(Kind.W) == m and Kind.B not in kinds
        first_w = kinds.index(Kind.W)
        assert kinds[:first_w].count(Kind.BI) == rank + 1


INTERLEAVED = [(2, 2, 2), (2, 2, 6), (4, 2, 4), (4, 2, 8), (4, 3, 12), (8, 4, 16), (3, 2, 9)]


def megatron_order(pp, v, m, rank, overlap):
    """Megatron's interleaved 1F1B written out for one rank (its get_model_chunk_id and warm-up
    count): the k-th forward on chunk (k // pp) % v, the k-th backward on the reverse; "F/B" tokens."""
    total = m * v
    warmup = min(2 * (pp - rank - 1) + (v - 1) * pp + int(overlap), total)
    fwd = [f"F{(k // pp) % v}" for k in range(total)]
    bwd = [f"B{v - 1 - (k // pp) % v}" for k in range(total)]
    steady = [f"{fwd[warmup + k]}&{bwd[k]}" if overlap else (fwd[warmup + k], bwd[k]) for k in range(total - warmup)]
    flat = [t for step in steady for t in ((step,) if overlap else step)]
    return fwd[:warmup] + flat + bwd[total - warmup:]


def chunk_tokens(actions):
    return [f"F{a.chunk}&B{a.b_chunk}" if a.kind == Kind.FB else f"{a.kind.value[0]}{a.chunk}"
            for a in compute(actions) if a.kind != Kind.W]


@pytest.mark.parametrize("pp,v,m", INTERLEAVED)
@pytest.mark.parametrize("split", [True, False], ids=["split", "whole"])
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_interleaved_follows_megatrons_order_and_runs(pp, v, m, split, overlap):
    schedules = build_schedule("interleaved", pp, m, split, virtual_stages=v, overlap=overlap)
    layout = pipeline_layout("interleaved", pp, m, v)
    assert layout.paths[0][:pp + 1] == (*((r, 0) for r in range(pp)), (0, 1))  # stage s on rank s % pp
    check_schedule(schedules, layout)
    for rank, actions in enumerate(schedules):
        assert chunk_tokens(actions) == megatron_order(pp, v, m, rank, overlap)
        # each chunk takes its micro-batches in order
        for c in range(v):
            assert [a.mb for a in compute(actions) if a.forward_of and a.forward_of[0] == c] == list(range(m))
    kinds = {a.kind for actions in schedules for a in actions}
    assert (Kind.W in kinds) == split and (Kind.FB in kinds) == overlap
    for rendezvous in (True, False):
        simulate(schedules, rendezvous=rendezvous)  # no deadlock


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 4), (4, 9)])
def test_overlapped_1f1b_pairs_each_steady_forward_with_an_earlier_backward(pp, m):
    schedules = build_schedule("1f1b", pp, m, overlap=True)
    check_schedule(schedules, pipeline_layout("1f1b", pp, m))
    simulate(schedules)
    for rank, actions in enumerate(schedules):
        warmup = min(pp - rank, m)  # one more than 1F1B's, so no pair is one micro-batch's F and B
        pairs = [a for a in actions if a.kind == Kind.FB]
        assert [(a.mb, a.b_mb) for a in pairs] == [(warmup + k, k) for k in range(m - warmup)]


def test_check_refuses_a_pair_of_one_micro_batchs_forward_and_backward():
    schedules = build_schedule("1f1b", 1, 3, split_backward=False, overlap=True)
    assert list(map(str, schedules[0])) == ["F0.0", "F0.1&B0.0", "F0.2&B0.1", "B0.2"]
    schedules[0][2:] = [Action(Kind.B, 0, 1), Action(Kind.FB, 0, 2, b_chunk=0, b_mb=2)]
    with pytest.raises(ScheduleError, match="backward before its forward"):
        check_schedule(schedules)


def peers(actions, kind, chunk):
    return {a.peer for a in actions if a.kind == kind and a.chunk == chunk}


def test_dualpipe_directions_and_micro_batch_numbering():
    pp, m = 4, 8
    schedules = build_schedule("dualpipe", pp, m)
    for rank, actions in enumerate(schedules):
        mbs = {c: {a.mb for a in compute(actions) if a.forward_of and a.forward_of[0] == c} for c in (0, 1)}
        assert mbs == {0: set(range(4)), 1: set(range(4, 8))}
        assert peers(actions, Kind.SEND_F, 0) == ({rank + 1} if rank < pp - 1 else set())
        assert peers(actions, Kind.SEND_F, 1) == ({rank - 1} if rank > 0 else set())
        assert peers(actions, Kind.SEND_B, 0) == ({rank - 1} if rank > 0 else set())
    first = next(a for a in schedules[0] if not a.is_comm)
    assert str(first) == "F0.0" and str(compute(schedules[-1])[0]) == "F1.4"


def test_dualpipev_turns_at_the_last_rank_without_communication():
    pp, m = 4, 8
    schedules = build_schedule("dualpipev", pp, m)
    last = schedules[-1]
    assert peers(last, Kind.SEND_F, 0) == set() and peers(last, Kind.RECV_F, 1) == set()
    assert peers(schedules[1], Kind.SEND_F, 0) == {2} and peers(schedules[1], Kind.SEND_F, 1) == {0}
    layout = pipeline_layout("dualpipev", pp, m)
    assert layout.locate(0, 1) == (0, 2 * pp - 1) and layout.is_last_stage(0, 1)
    assert layout.neighbour(pp - 1, 0, +1) == (pp - 1, 1)
    # the turn is local, so chunk 1 of the last rank may only run after chunk 0 did
    f0, f1 = (next(i for i, a in enumerate(last) if a.forward_of == (c, 0)) for c in (0, 1))
    last[f0], last[f1] = last[f1], last[f0]
    with pytest.raises(ScheduleError, match="not received or computed before it"):
        check_schedule(schedules, layout)


def test_action_notation():
    assert str(Action(Kind.F, 0, 3)) == "F0.3"
    assert str(Action(Kind.BI, 1, 7)) == "BI1.7"
    assert str(Action(Kind.FB, 0, 3, b_chunk=1, b_mb=7)) == "F0.3&B1.7"
    assert str(Action(Kind.SEND_F, 0, 3, peer=2)) == "SEND_F0.3>r2"
    assert str(Action(Kind.RECV_B, 1, 4, peer=0)) == "RECV_B1.4<r0"


def test_check_catches_a_dropped_receive():
    schedules = build_schedule("dualpipe", 4, 8)
    last_from_3 = max(i for i, a in enumerate(schedules[2]) if a.kind == Kind.RECV_B and a.peer == 3)
    del schedules[2][last_from_3]
    with pytest.raises(UnmatchedCommError, match="no matching receive"):
        check_schedule(schedules)


def test_check_catches_swapped_sends_as_out_of_order():
    schedules = build_schedule("1f1b", 2, 4)
    sends = [i for i, a in enumerate(schedules[0]) if a.kind == Kind.SEND_F]
    rank0 = schedules[0]
    rank0[sends[0]], rank0[sends[-1]] = rank0[sends[-1]], rank0[sends[0]]
    with pytest.raises(UnmatchedCommError, match="different orders"):
        check_schedule(schedules)


@pytest.mark.parametrize("break_it,message", [
    (lambda acts: acts.remove([a for a in acts if a.kind == Kind.W][-1]), "BI without a W"),
    (lambda acts: acts.remove(next(a for a in acts if a.kind == Kind.W)), "not for the oldest deferred BI"),
    (lambda acts: acts.append(Action(Kind.F, 0, 0)), "second forward"),
    (lambda acts: acts.insert(0, acts.pop(next(i for i, a in enumerate(acts) if a.kind == Kind.BI))),
     "backward before its forward"),
])
def test_check_catches_broken_compute(break_it, message):
    schedules = build_schedule("1f1b", 4, 8)
    break_it(schedules[0])
    with pytest.raises(ScheduleError, match=message):
        check_schedule(schedules)


@pytest.mark.parametrize("name,pp,m,flags", [
    ("gpipe", 4, 8, ["--pipeline-schedule"]),
    ("dualpipe", 3, 12, ["--pipeline-model-parallel-size"]),
    ("dualpipev", 0, 12, ["--pipeline-model-parallel-size"]),
    ("dualpipe", 4, 6, ["--num-microbatches", "--global-batch-size", "--pipeline-model-parallel-size"]),
    ("dualpipe", 4, 9, ["--num-microbatches", "--global-batch-size", "even"]),
    ("dualpipev", 4, 7, ["--num-microbatches", "--global-batch-size"]),
    ("1f1b", 4, 0, ["--num-microbatches", "--global-batch-size"]),
    ("interleaved", 4, 6, ["--num-microbatches", "multiple of --pipeline-model-parallel-size"]),
    ("interleaved", 4, 2, ["--num-microbatches", "multiple of --pipeline-model-parallel-size"]),
])
def test_validation_names_the_flags(name, pp, m, flags):
    with pytest.raises(ValueError) as error:
        validate_schedule_args(name, pp, m)
    for flag in flags:
        assert flag in str(error.value)
    with pytest.raises(ValueError):
        build_schedule(name, pp, m, virtual_stages=2 if name == "interleaved" else 1)


def test_validation_accepts_the_minimum_sizes():
    validate_schedule_args("dualpipe", 4, 8)
    validate_schedule_args("dualpipev", 4, 9)
    validate_schedule_args("dualpipev", 3, 6)  # V needs neither even ranks nor even micro-batches
    validate_schedule_args("1f1b", 4, 1)
    validate_schedule_args("interleaved", 4, 4)


@pytest.mark.parametrize("name,v", [("interleaved", 1), ("1f1b", 2), ("dualpipev", 2)])
def test_virtual_stages_belong_to_the_interleaved_schedule(name, v):
    with pytest.raises(ValueError, match="--num-virtual-stages-per-pipeline-rank"):
        build_schedule(name, 4, 8, virtual_stages=v)


def test_planner_searches_and_plans_the_new_schedules():
    """python -m megadual.plan --gpus tries interleaved 1F1B and the overlapped ones, and predicts their
    activations from their action lists: under interleaved, rank 0 warms up the most forwards."""
    from megadual.arguments import parse_args
    from megadual.plan.layout_search import Hardware, candidates
    from megadual.plan.rank_memory import predict
    from tests.helpers import TINY_MOE

    base = parse_args(TINY_MOE + ["--num-layers", "8", "--micro-batch-size", "1", "--global-batch-size", "16"])
    tried = {(c.parallel.pipeline_schedule, c.parallel.overlap_moe_expert_parallel_comm)
             for c, _, _ in candidates(base, 8, Hardware())}
    assert tried == {("1f1b", False), ("1f1b", True), ("interleaved", False), ("interleaved", True),
                     ("dualpipe", False), ("dualpipev", False)}
    config = parse_args(TINY_MOE + ["--num-layers", "8", "--micro-batch-size", "1", "--pipeline-model-parallel-size",
                                    "4", "--pipeline-schedule", "interleaved",
                                    "--num-virtual-stages-per-pipeline-rank", "2"])
    peaks = [rank.peak_activations for rank in predict(config, 4)]
    assert peaks[0] > peaks[1] > peaks[2]
