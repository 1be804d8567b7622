"""Simulator: the bubble and memory columns of the DualPipe README, deadlocks, the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from megadual.pipeline.actions import Action, Kind, UnmatchedCommError
from megadual.pipeline.hops import Pieces, paired_seconds
from megadual.pipeline.schedules import build_schedule
from megadual.pipeline.simulate import DeadlockError, SimCosts, StageCosts, simulate

REPO = Path(__file__).resolve().parents[1]

# Costs drawn as in the README's figure: backward-for-input as long as a forward
# (B = F + W), W <= F; F&B is 18, well below F + B = 25, so the overlap is measured.
F, W, B = 10.0, 5.0, 15.0
OVERLAPPED = SimCosts(f=F, b=B, w=W, fb=18.0)


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("extra", [0, 3, 11])
def test_1f1b_bubble_is_pp_minus_1_times_f_plus_b(pp, extra):
    costs = SimCosts(f=10, b=20, w=6)
    result = simulate(build_schedule("1f1b", pp, pp + extra, split_backward=False), costs)
    assert result.bubble == [(pp - 1) * (costs.f + costs.b)] * pp


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_zero_bubble_1f1b_bubble_is_pp_minus_1_times_f_plus_b_minus_2w(pp):
    costs = SimCosts(f=10, b=20, w=6)
    result = simulate(build_schedule("1f1b", pp, 2 * pp + 1), costs)
    assert result.bubble == [(pp - 1) * (costs.f + costs.b - 2 * costs.w)] * pp


@pytest.mark.parametrize("pp,v,m", [(2, 2, 4), (4, 2, 4), (4, 2, 12), (4, 4, 8), (8, 2, 16), (8, 3, 24)])
def test_interleaved_bubble_is_the_published_fraction(pp, v, m):
    """Narayanan et al. 2021 (Megatron's interleaved schedule): a stage's F and B split into v chunks
    of F/v and B/v; the bubble is (pp-1)/(v m) of the ideal time m (F + B), v times 1F1B's fraction."""
    stage_f, stage_b = 12.0, 24.0
    costs = SimCosts(f=stage_f / v, b=stage_b / v, w=0.0)
    result = simulate(build_schedule("interleaved", pp, m, split_backward=False, virtual_stages=v), costs)
    ideal = m * (stage_f + stage_b)
    assert result.busy == [ideal] * pp
    assert result.bubble == pytest.approx([(pp - 1) / (v * m) * ideal] * pp, rel=1e-12)
    plain = simulate(build_schedule("1f1b", pp, m, split_backward=False), SimCosts(f=stage_f, b=stage_b))
    assert plain.max_bubble == pytest.approx(v * result.max_bubble, rel=1e-12)


def dualpipe_bubble(stages, costs):
    return (stages / 2 - 1) * (costs.fb + costs.b - 3 * costs.w)


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("extra", [0, 4, 10])
@pytest.mark.parametrize("fb", [18.0, 22.0])
def test_dualpipe_bubble_matches_the_table(pp, extra, fb):
    costs = SimCosts(f=F, b=B, w=W, fb=fb)
    result = simulate(build_schedule("dualpipe", pp, 2 * pp + extra), costs)
    assert result.max_bubble == dualpipe_bubble(pp, costs)
    # the busy time is what the table's bubble is measured against
    assert result.max_bubble == result.makespan - min(result.busy)


@pytest.mark.parametrize("ranks", [2, 3, 4, 8])
@pytest.mark.parametrize("extra", [0, 5])
def test_dualpipev_has_the_dualpipe_bubble_on_half_the_ranks(ranks, extra):
    result = simulate(build_schedule("dualpipev", ranks, 2 * ranks + extra), OVERLAPPED)
    assert result.max_bubble == dualpipe_bubble(2 * ranks, OVERLAPPED)


def test_bubble_is_the_same_whether_sends_wait_for_their_receive():
    schedules = build_schedule("dualpipe", 8, 20)
    assert simulate(schedules, OVERLAPPED, rendezvous=False).bubble == simulate(schedules, OVERLAPPED).bubble


def test_latency_delays_every_message_on_the_critical_path():
    schedules = build_schedule("1f1b", 2, 1, split_backward=False)  # F, send, F, B, send back, B
    for rendezvous in (True, False):
        result = simulate(schedules, SimCosts(f=1, b=2, latency=0.5), rendezvous=rendezvous)
        assert result.makespan == 1 + 0.5 + 1 + 2 + 0.5 + 2


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_peak_activations_match_the_memory_column(pp):
    one_f_one_b = simulate(build_schedule("1f1b", pp, 2 * pp, split_backward=False), OVERLAPPED)
    assert one_f_one_b.peak_activations == [pp - r for r in range(pp)]
    zero_bubble = simulate(build_schedule("1f1b", pp, 2 * pp), OVERLAPPED)
    assert zero_bubble.peak_activations[0] == pp
    dualpipe = simulate(build_schedule("dualpipe", pp, 2 * pp + 6), OVERLAPPED)
    assert dualpipe.peak_activations == [pp + 1] * pp
    dualpipev = simulate(build_schedule("dualpipev", pp // 2, pp + 3), OVERLAPPED)
    assert dualpipev.peak_activations == [pp + 1] * (pp // 2)


def test_a_receive_hoisted_above_the_send_it_waits_for_deadlocks():
    schedules = build_schedule("1f1b", 2, 1, split_backward=False)
    rank0 = schedules[0]  # F0.0 SEND_F0.0>r1 RECV_B0.0<r1 B0.0
    rank0.insert(0, rank0.pop(rank0.index(Action(Kind.RECV_B, 0, 0, peer=1))))
    with pytest.raises(DeadlockError, match=r"rank 0 waits at RECV_B0\.0<r1; rank 1 waits at RECV_F0\.0<r0"):
        simulate(schedules)


def test_sends_that_wait_for_their_receive_can_deadlock_where_eager_ones_do_not():
    schedules = [
        [Action(Kind.F, 0, 0), Action(Kind.SEND_F, 0, 0, peer=1), Action(Kind.F, 0, 1),
         Action(Kind.RECV_F, 1, 5, peer=1), Action(Kind.F, 1, 5)],
        [Action(Kind.F, 1, 5), Action(Kind.SEND_F, 1, 5, peer=0), Action(Kind.F, 1, 6),
         Action(Kind.RECV_F, 0, 0, peer=0), Action(Kind.F, 0, 0)],
    ]
    assert simulate(schedules, rendezvous=False).makespan == 3.0
    with pytest.raises(DeadlockError):
        simulate(schedules)


def test_a_dropped_receive_is_reported_unmatched():
    schedules = build_schedule("dualpipev", 4, 8)
    schedules[3] = [a for a in schedules[3] if a != Action(Kind.RECV_F, 0, 7, peer=2)]
    with pytest.raises(UnmatchedCommError, match=r"SEND_F0\.7>r3 has no matching receive"):
        simulate(schedules)


def test_cli_prints_the_table_and_writes_a_png(tmp_path):
    out = tmp_path / "timeline.png"
    run = subprocess.run(
        [sys.executable, "-m", "megadual.pipeline.simulate", "--schedule", "dualpipe", "--pp", "8",
         "--microbatches", "20", "--cost-fb", "2.5", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=60)
    assert "worst bubble 4.5" in run.stdout  # (8/2-1)(2.5 + 2 - 3*1)
    assert len([line for line in run.stdout.splitlines() if line.split()[:1] == ["7"]]) == 1
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        width, height = image.size
        assert image.format == "PNG" and width > 600 and 8 * 25 < height < 600
        assert len(set(image.convert("RGB").get_flattened_data())) > 10  # coloured boxes, not a blank page


def test_cli_rejects_bad_sizes_naming_the_flag():
    run = subprocess.run(
        [sys.executable, "-m", "megadual.pipeline.simulate", "--schedule", "dualpipe", "--pp", "8",
         "--microbatches", "10"], cwd=REPO, check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "--num-microbatches" in run.stderr


def test_stage_costs_time_each_chunk_by_its_own_costs():
    """A last stage twice as slow bounds 1F1B: its first forward waits for rank 0's (1), then it
    computes M forwards and backwards (6 each), then rank 0's last backward follows (2)."""
    fast, slow = SimCosts(f=1, b=2, w=1), SimCosts(f=2, b=4, w=1)
    result = simulate(build_schedule("1f1b", 2, 4, split_backward=False),
                      StageCosts({(0, 0): fast, (1, 0): slow}))
    assert result.makespan == 1 + 4 * 6 + 2
    assert result.busy == [4 * 3, 4 * 6]
    # a paired F&B costs its forward chunk's F plus its backward chunk's B
    result = simulate(build_schedule("dualpipev", 1, 4, split_backward=False),
                      StageCosts({(0, 0): fast, (0, 1): SimCosts(f=3, b=5, w=1)}))
    assert result.busy == [4 * (1 + 3) + 4 * (2 + 5)]


def test_communication_is_exposed_alone_and_hidden_in_a_paired_chunk():
    costs = SimCosts(f=10, b=20, w=5, comm_f=4, comm_b=6)
    durations = {kind: costs.duration(Action(kind, 0, 0, b_chunk=0, b_mb=1))
                 for kind in (Kind.F, Kind.B, Kind.BI, Kind.W, Kind.FB)}
    assert durations == {Kind.F: 14, Kind.B: 26, Kind.BI: 21, Kind.W: 5, Kind.FB: 30}  # FB: compute covers
    slow_links = SimCosts(f=10, b=20, w=5, comm_f=20, comm_b=25)
    assert slow_links.duration(Action(Kind.FB, 0, 0, b_chunk=0, b_mb=1)) == 45  # FB: the links bound it
    stages = StageCosts({(0, 0): costs, (0, 1): slow_links})
    assert stages.duration(Action(Kind.FB, 0, 0, b_chunk=1, b_mb=1), 0) == max(10 + 20, 4 + 25)
    # a pair's own compute, where measured, replaces F + B; the links still bound it
    assert SimCosts(f=10, b=20, fb=50, comm_f=20, comm_b=25).duration(Action(Kind.FB, 0, 0, b_chunk=0, b_mb=1)) == 50
    assert SimCosts(f=10, b=20, fb=40, comm_f=20, comm_b=25).duration(Action(Kind.FB, 0, 0, b_chunk=0, b_mb=1)) == 45


# Hop level: a forward of pieces 1, 1, 1 with hops of 3 between them, paired with a backward of
# pieces 2, 2, 2 with hops of 1. Compute 9 and communication 8 give 9 at chunk level. Written out
# (one compute stream; hops queue on the rank's link; the forward steps at each backward hop):
#   B piece 0  0-2, its hop 2-3;  F piece 0  2-3, its hop 3-6
#   B piece 1  3-5, its hop queues behind F's: 6-7;  F piece 1 waits for its hop (6), 6-7, hop 7-10
#   B piece 2 waits for its hop (7): 7-9;  F piece 2 waits for its hop (10): 10-11  -> 11
LONG_HOPS = Pieces((1, 1, 1), (3, 3))
SHORT_HOPS = Pieces((2, 2, 2), (1, 1))


def test_a_paired_chunk_at_hop_level_shows_the_hops_that_outlast_their_step():
    assert paired_seconds(LONG_HOPS, SHORT_HOPS) == 11
    # forward first: F0 0-1, hop 1-4; B0 1-3, hop 4-5; F1 4-5, hop 5-8; B1 5-7, hop 8-9;
    # F2 waits for 8: 8-9; B2 waits for 9: 9-11 -> 11
    assert paired_seconds(LONG_HOPS, SHORT_HOPS, forward_first=True) == 11
    # short hops on both sides hide behind the other side's pieces: compute alone, 9
    assert paired_seconds(Pieces((1, 1, 1), (1, 1)), SHORT_HOPS) == 9
    # a backward without hops: the forward runs after it, exposing its own
    assert paired_seconds(LONG_HOPS, Pieces((6,))) == 6 + LONG_HOPS.alone()
    # both sides' hops on one link: B0 0-1, its hop 1-5; F0 1-2, its hop queues 5-9; B1 5-6; F1 9-10
    assert paired_seconds(Pieces((1, 1), (4,)), Pieces((1, 1), (4,))) == 10


def test_a_hop_launched_before_its_piece_ends_overlaps_the_rest_of_the_piece():
    """The shared expert computes while the dispatch is in flight (lead): alone, a hop of 3 launched
    0.5 before the end of its piece exposes 2.5; hops on one link still queue."""
    led = Pieces((1, 1, 1), (3, 3), lead=(0.5, 0.0))
    # piece 0 ends at 1, its hop left at 0.5 and arrives at 3.5; piece 1 3.5-4.5, hop 4.5-7.5; piece 2 7.5-8.5
    assert led.alone() == 8.5 and led.exposed() == 5.5
    # a lead longer than the link was busy before: F0 0-2 launches at 0.5 behind nothing, so 0.5-3.5
    assert Pieces((2, 1), (3,), lead=(1.5,)).alone() == 2 + 1.5 + 1
    assert led.scaled(2).lead == (1.0, 0.0)
    # paired: B0 0-1 hop 1-2; F0 1-3, its hop launched at 1.5 waits for the link: 2-5; B1 3-4; F1 waits, 5-6
    assert paired_seconds(Pieces((2, 1), (3,), lead=(1.5,)), Pieces((1, 1), (1,))) == 6
    assert paired_seconds(Pieces((2, 1), (3,)), Pieces((1, 1), (1,))) == 7  # launched at 3: 3-6, F1 6-7
    assert SimCosts(f=3, comm_f=6, hops_f=led).duration(Action(Kind.F, 0, 0)) == 8.5
    # a lag: the next piece computes 0.5 before waiting; alone F0 0-1 hop 1-4, F1 1-1.5 then waits: 4-4.5
    lagging = Pieces((1, 1), (3,), lag=(0.5,))
    assert lagging.alone() == 4.5 and lagging.scaled(2).lag == (1.0,)
    # paired, the backward lagging: B0 0-1 hop 1-4; F0 1-2, its hop queues 4-4.5; B1 2-2.5 (lag), waits for 4:
    # 4-4.5; F1 4.5-5.5. Without the lag B1 runs 4-5 and F1 5-6.
    assert paired_seconds(Pieces((1, 1), (0.5,)), lagging) == 5.5
    assert paired_seconds(Pieces((1, 1), (0.5,)), Pieces((1, 1), (3,))) == 6
    with pytest.raises(ValueError, match="2 hops need as many leads"):
        Pieces((1, 1, 1), (1, 1), lead=(0.5,))


def test_a_piece_that_exchanges_token_counts_waits_for_its_link_to_drain():
    """The counts a dispatch sends first queue behind the hops in flight on the link (collectives of
    one group run in order), and the piece waits for them: in a pair, the other side's long hop."""
    counts_first = Pieces((2, 1), (1,), drain=(1.0, None))
    # B0 0-1, its hop 1-5; F0 computes 1-2, waits for the link to drain at 5, computes 5-6, its hop 6-7;
    # B1 waits for 5: 6-7; F1 waits for 7: 7-8.  Without the drain: F0 1-3, hop 5-6; B1 5-6; F1 6-7.
    assert paired_seconds(counts_first, Pieces((1, 1), (4,))) == 8
    assert paired_seconds(Pieces((2, 1), (1,)), Pieces((1, 1), (4,))) == 7
    # alone, behind its own hop: F0 0-1, hop 1-4; F1 computes 0.5 of its 1 s lag, drains at 4, 4-5.5
    lagging = Pieces((1, 2), (3,), lag=(1.0,), drain=(None, 0.5))
    assert lagging.alone() == 5.5 and Pieces((1, 2), (3,), lag=(1.0,)).alone() == 5
    assert lagging.scaled(2).drain == (None, 1.0)
    with pytest.raises(ValueError, match="2 compute pieces need as many drains"):
        Pieces((1, 1), (1,), drain=(0.5,))


def test_the_simulator_times_a_pair_hop_by_hop_where_the_pieces_are_given():
    pair = Action(Kind.FB, 0, 1, b_chunk=0, b_mb=0)
    chunk = SimCosts(f=3, b=6, w=2, comm_f=6, comm_b=2)
    assert chunk.duration(pair) == 9  # chunk level: max(compute 9, links 8)
    hops = SimCosts(f=3, b=6, w=2, comm_f=6, comm_b=2, hops_f=LONG_HOPS, hops_b=SHORT_HOPS)
    assert hops.duration(pair) == 11
    assert hops.duration(Action(Kind.F, 0, 0)) == LONG_HOPS.alone()  # alone: everything in turn
    # the pair's measured compute (fb) scales every piece: 18 / 9 = 2x, hops as they were:
    # B0 0-4 hop 4-5; F0 4-6 hop 6-9; B1 6-10 hop 10-11; F1 10-12 hop 12-15; B2 12-16; F2 16-18 -> 18
    assert SimCosts(f=3, b=6, fb=18, hops_f=LONG_HOPS, hops_b=SHORT_HOPS).duration(pair) == 18
    # a backward whose dispatcher asks the forward to go first: F pieces 1, 3 and B pieces 3, 1, hops of 2
    #   backward first: B0 0-3 hop 3-5; F0 3-4 hop 5-7; B1 5-6; F1 7-10 -> 10
    #   forward first:  F0 0-1 hop 1-3; B0 1-4 hop 4-6; F1 4-7; B1 7-8 -> 8
    costs = {"f": 4, "b": 4, "hops_f": Pieces((1, 3), (2,)), "hops_b": Pieces((3, 1), (2,))}
    assert SimCosts(**costs).duration(pair) == 10
    assert SimCosts(**costs, forward_first=True).duration(pair) == 8
    with pytest.raises(ValueError, match="3 compute pieces need 2 hops"):
        Pieces((1, 1, 1), (1,))
