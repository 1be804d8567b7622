"""The memory report against the planner's prediction, per rank, on the layouts of issue 13, and
recomputation lowering the measured peak by what the planner says."""
import pytest

from megadual import verify
from megadual.config import resolve_device_defaults
from megadual.plan import predict
from pretrain_moe import load_config
from tests.helpers import TINY_MOE

ARGS = TINY_MOE + ["--num-layers", "8", "--micro-batch-size", "1", "--train-iters", "1", "--lr-warmup-iters", "0"]
SELECTIVE = ["--recompute-granularity", "selective"]
FULL = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"]
CASES = {
    "one process": (ARGS, ""),
    "one process, full recomputation": (ARGS + FULL, ""),
    "DP2xEP2": (ARGS, "dp2,ep2"),
    "PP2-dualpipexEP2": (ARGS, "pp2:dualpipe,ep2"),
    "PP2-1f1b": (ARGS, "pp2"),
    "PP4-dualpipev-selective": (ARGS + SELECTIVE, "pp4:dualpipev"),
}


@pytest.fixture(scope="module")
def runs():
    specs = {name: verify.parse_layout(layout, flags) for name, (flags, layout) in CASES.items()}
    flags = {name: CASES[name][0] + spec.flags for name, spec in specs.items()}
    captures = verify.launch_all({name: (spec.world, flags[name]) for name, spec in specs.items()})
    return {name: (captures[name].memory, predict(resolve_device_defaults(load_config(flags[name]), "cpu"),
                                                  specs[name].world), specs[name]) for name in CASES}


@pytest.mark.parametrize("case", CASES)
def test_planner_predicts_the_memory_report(runs, case):
    measured, predicted, spec = runs[case]
    assert len(measured) == spec.world
    for report in measured:
        rank = predicted[report.rank // (spec.world // spec.pp)]
        print(case, report.format(), f"| predicted peak activations {rank.peak_activations / 2**20:.3f}")
        assert report.parameters == rank.parameters
        assert report.gradients == rank.gradients
        assert report.optimizer_state == rank.optimizer_state
        assert abs(report.peak_activations / rank.peak_activations - 1) < 0.10


def test_recomputation_lowers_the_peak_by_what_the_planner_says(runs):
    (plain,), (plain_predicted,), _ = runs["one process"]
    (full,), (full_predicted,), _ = runs["one process, full recomputation"]
    assert full.peak_activations < 0.6 * plain.peak_activations
    measured_saving = plain.peak_activations - full.peak_activations
    predicted_saving = plain_predicted.peak_activations - full_predicted.peak_activations
    assert abs(measured_saving / predicted_saving - 1) < 0.10
