"""scripts/bench_pipeline.py runs end to end at the tiniest size (no timing is checked)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_pipeline.py"
TINY = ["--pp", "2", "--num-layers", "4", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "2", "--seq-length", "16", "--vocab-size", "64", "--micro-batch-size", "1",
        "--num-microbatches", "4", "--warmup", "1", "--rounds", "1", "--cost-reps", "1"]


def test_bench_pipeline_tiny(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY], cwd=tmp_path, check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("ours 1F1B", "torch Schedule1F1B", "ours 1F1B + W split (ZB-H1)", "ours DualPipe ",
                "ours DualPipeV", "torch ScheduleDualPipeV"):
        assert f"\n{row}" in result.stdout, result.stdout
    assert "tokens/s ratio ours DualPipeV / torch ScheduleDualPipeV: " in result.stdout, result.stdout


def test_bench_pipeline_expert_parallel_on_emulated_links(tmp_path):
    rows = ["ours 1F1B", "ours DualPipe", "ours DualPipe, no overlap", "ours interleaved, overlap"]
    moe = ["--ep", "2", "--ep-across-nodes", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
           "--moe-router-topk", "2", "--moe-shared-expert-intermediate-size", "32",
           "--emulate-links", "inter=20MB/s,10us", "--schedules", *rows, "--save", "run.pkl"]
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY, *moe], cwd=tmp_path, check=False,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMM_F" in result.stdout and "emulated links: inter=0.02GB/s" in result.stdout, result.stdout
    assert "one node per EP rank" in result.stdout and "they match at inter = " in result.stdout, result.stdout
    for row in rows:  # its step time, then the simulator's from the costs alone and from the steps
        assert re.search(rf"\n{row} +\d+ +\d+ +\d+ +\d+ ", result.stdout), result.stdout
        # the comparison table: ratios to DualPipe, exposed waits, bubbles, memory measured / planned
        assert re.search(rf"\n\| {row.removeprefix('ours ')} \| \d+ \| [\d.]+ \(.*\) \|( [\d. ()]+/[\d. ]+\|){{3}}",
                         result.stdout), result.stdout
    assert "tokens/s ratio ours DualPipe / ours DualPipe, no overlap: " in result.stdout, result.stdout
    again = subprocess.run([sys.executable, str(SCRIPT), "--report-from", "run.pkl"], cwd=tmp_path, check=False,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == result.stdout.strip(), again.stdout + again.stderr


def test_step_compute_takes_the_waits_on_the_links_out_of_each_action():
    """What the simulator's sim* is given: each action's time less its waits on the emulated links; an
    all-to-all's wait past the moment its own bytes left counts as the action's (its peer came late)."""
    sys.path.insert(0, str(SCRIPT.parent))
    from pipeline_costs import action_compute, step_compute

    from megadual.parallel.emulate import Record

    events = [("F0.0", 0.0, 1.0), ("comm:SEND_F0.0>r1", 1.0, 1.5), ("F0.1", 2.0, 2.8), ("B0.0", 3.0, 5.0),
              ("F0.2&B0.1", 5.0, 9.0), ("W0.0", 9.0, 9.5)]
    records = [Record("all_to_all", 1, 0, 0.1, waited_at=0.5, blocked=0.25),  # in F0.0
               Record("send", 1, 0, 1.0, waited_at=1.2, blocked=0.3),  # in a comm batch: not compute
               Record("all_to_all", 1, 0, 3.1, waited_at=4.0, blocked=0.5),  # in B0.0
               # in the pair: its bytes left at 6.4, the last 0.6 s it waited for its EP peer (compute to the simulator)
               Record("all_to_all", 1, 0, 5.1, waited_at=6.0, blocked=1.0, sent=6.4)]
    per_action = action_compute(events, records)
    assert per_action == pytest.approx({"F0.0": 0.75, "F0.1": 0.8, "B0.0": 1.5, "F0.2&B0.1": 3.6, "W0.0": 0.5})
    assert step_compute(per_action) == pytest.approx({"f": (0.75 + 0.8) / 2, "b": 1.5, "fb": 3.6, "w": 0.5})


def test_sim_star_times_each_action_by_its_own_compute_in_the_steps():
    """On a CPU shared by more ranks than cores one forward runs faster than another (others idle in the
    warm-up): sim* takes each action's own compute, on its chunk's hops."""
    sys.path.insert(0, str(SCRIPT.parent))
    from pipeline_report import TracedCosts

    from megadual.pipeline.actions import Action, Kind
    from megadual.pipeline.hops import Pieces
    from megadual.pipeline.simulate import SimCosts, StageCosts

    halves = Pieces((1.0, 1.0), (3.0,))
    chunk = SimCosts(f=1.0, b=2.0, w=1.0, comm_f=3.0, comm_b=3.0, hops_f=halves, hops_b=halves)
    traced = TracedCosts(StageCosts({(0, 0): chunk}), {0: {"F0.0": 4.0, "F0.1": 2.0, "F0.2&B0.0": 6.0, "W0.0": 0.5}})
    # alone, the pieces scale to the action's compute and the hop shows: 2 + 3 + 2, 1 + 3 + 1
    assert traced.duration(Action(Kind.F, 0, 0), 0) == 7.0 and traced.duration(Action(Kind.F, 0, 1), 0) == 5.0
    assert traced.duration(Action(Kind.W, 0, 0), 0) == 0.5
    # the pair's 6 s scale its pieces to 1.5: B0 0-1.5, hop 1.5-4.5; F0 1.5-3, its hop queues 4.5-7.5;
    # B1 4.5-6; F1 7.5-9
    assert traced.duration(Action(Kind.FB, 0, 2, b_chunk=0, b_mb=0), 0) == 9.0


def test_a_chunk_at_hop_level_has_each_hop_with_its_lead_and_lag_and_each_drain():
    """What sim* is given of a chunk: its compute between pauses, each pause's link time, how much of it
    the piece before (lead) and after (lag) hid, and where a piece waited on its own exchange (drain)."""
    sys.path.insert(0, str(SCRIPT.parent))
    from pipeline_costs import hop_pieces

    from megadual.parallel.emulate import Link, LinkModel, Record

    links = LinkModel(inter=Link(1000.0, 0.0))  # one byte, one millisecond
    records = [Record("all_to_all", 10, 0, 0.2, waited_at=0.25),  # the counts: waited for in piece 0
               Record("all_to_all", 500, 0, 0.6, waited_at=1.3),  # the dispatch: launched 0.4 before the pause
               Record("all_to_all", 300, 0, 1.9, waited_at=2.1),
               Record("all_to_all", 10, 0, 2.5, waited_at=2.55)]  # counts in the last piece: no hop's lag
    pieces = hop_pieces([0.0, 1.0, 2.0, 3.0], records, links)
    assert pieces.compute == (1.0, 1.0, 1.0) and pieces.drain == pytest.approx((0.2, None, 0.5))
    assert pieces.hops == pytest.approx((0.51, 0.31))
    assert pieces.lead == pytest.approx((0.4, 0.1)) and pieces.lag == pytest.approx((0.3, 0.1))


def test_an_ep_group_times_a_chunk_by_its_slowest_rank_hiding_what_its_ranks_hide_on_average():
    sys.path.insert(0, str(SCRIPT.parent))
    from pipeline_costs import median_pieces
    from pipeline_report import slowest_per_stage

    from megadual.pipeline.hops import Pieces

    ranks = [Pieces((1.0, 3.0), (2.0,), (0.4,), (0.2,), (0.5, None)), Pieces((2.0, 1.0), (1.0,), (0.2,), (0.0,),
                                                                            (0.3, None))]
    stage = slowest_per_stage([{0: {"f": 1.0, "hops_f": ranks[0]}}, {0: {"f": 2.0, "hops_f": ranks[1]}}])[0]
    assert stage["f"] == 2.0
    merged = stage["hops_f"]
    assert (merged.compute, merged.hops, merged.drain) == ((2.0, 3.0), (2.0,), (0.3, None))
    assert merged.lead == pytest.approx((0.3,)) and merged.lag == pytest.approx((0.1,))
    runs = [Pieces((1.0, 5.0), (2.0,), (0.1,), (0.0,), (0.2, None)), Pieces((3.0, 4.0), (9.0,), (0.3,), (0.5,),
                                                                           (0.4, None)), *ranks]
    assert median_pieces(runs[:3]) == Pieces((1.0, 4.0), (2.0,), (0.3,), (0.2,), (0.4, None))
