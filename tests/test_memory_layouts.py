"""The memory report against the planner's prediction, per rank, on the layouts of issue 13;
recomputation lowering the measured peak by what the planner says, and changing no bit of a
layout's run (losses, grad norms, gradients, final parameters) under every schedule, the W split
and DualPipe's paired F&B chunks with their all-to-alls."""
import pytest

from megadual import verify
from megadual.plan_check import measure_and_predict
from tests.helpers import TINY_MOE

ARGS = TINY_MOE + ["--num-layers", "8", "--micro-batch-size", "1", "--train-iters", "1", "--lr-warmup-iters", "0"]
SELECTIVE = ["--recompute-granularity", "selective"]
FULL = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"]
FULL_BLOCK = ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3"]
SELECTIVE_MOE = SELECTIVE + ["--recompute-modules", "moe", "core_attn", "layernorm"]
CASES = {
    "one process": (ARGS, ""),
    "one process, full recomputation": (ARGS + FULL, ""),
    "DP2xEP2-distributed-optimizer": (ARGS + ["--use-distributed-optimizer"], "dp2,ep2"),
    "PP2-dualpipexEP2": (ARGS, "pp2:dualpipe,ep2"),
    "PP2-dualpipexEP2-selective-moe": (ARGS + SELECTIVE_MOE, "pp2:dualpipe,ep2"),
    "PP2-1f1b": (ARGS, "pp2"),
    "PP2-1f1b-full-block": (ARGS + FULL_BLOCK, "pp2"),
    "PP2-1f1b-MTP2": (ARGS + ["--mtp-num-layers", "2"], "pp2"),  # MTP beside the head, a tied embedding
    "PP4-dualpipev": (ARGS, "pp4:dualpipev"),
    "PP4-dualpipev-selective": (ARGS + SELECTIVE, "pp4:dualpipev"),
}
RECOMPUTED = {  # the run with recomputation: the same layout's without
    "one process, full recomputation": "one process",
    "PP2-dualpipexEP2-selective-moe": "PP2-dualpipexEP2",
    "PP2-1f1b-full-block": "PP2-1f1b",
    "PP4-dualpipev-selective": "PP4-dualpipev",
}
EXACT = verify.Tolerance("recomputation", 0.0, 0.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def runs():
    return measure_and_predict(CASES)


@pytest.mark.parametrize("case", CASES)
def test_planner_predicts_the_memory_report(runs, case):
    checked = runs[case]
    assert len(checked.capture.memory) == checked.spec.world
    for report, rank in checked.pairs():
        print(case, report.format(), f"| predicted peak activations {rank.peak_activations / 2**20:.3f}")
        assert report.parameters == rank.parameters
        assert report.gradients == rank.gradients
        assert report.optimizer_state == rank.optimizer_state_held
        assert abs(report.peak_activations / rank.peak_activations - 1) < 0.10


def test_recomputation_lowers_the_peak_by_what_the_planner_says(runs):
    ((plain, plain_predicted),) = runs["one process"].pairs()
    ((full, full_predicted),) = runs["one process, full recomputation"].pairs()
    assert full.peak_activations < 0.6 * plain.peak_activations
    measured_saving = plain.peak_activations - full.peak_activations
    predicted_saving = plain_predicted.peak_activations - full_predicted.peak_activations
    assert abs(measured_saving / predicted_saving - 1) < 0.10


@pytest.mark.parametrize("case", RECOMPUTED)
def test_recomputation_changes_no_bit_of_a_layout(runs, case):
    report = verify.compare(runs[case].capture, runs[RECOMPUTED[case]].capture, EXACT)
    assert report.passed, report.format(case)
