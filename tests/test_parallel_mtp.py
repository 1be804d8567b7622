"""Multi-token prediction across real processes gives the one-process run, under every schedule.

D = 1 and D = 2 under TP2+SP x EP2 (x DP2), PP2 DualPipe x EP2 (x DP2), PP4 DualPipeV and PP2 1F1B
(x TP2+SP; the last stage's tied embedding), the W split on: the lm and MTP losses of 2 steps,
the gradient norm and the validation losses (MTP's included), and every parameter's gradient at
the first step (gathered by global name). A checkpoint saved under PP2 1F1B resumes under PP4
DualPipeV.
"""
import re

import pytest

from tests.helpers import TINY_MOE
from tests.multiproc import spawn_runs
from tests.test_parallel_pp import gradient_errors, validation_losses

# 6 layers: 1 per stage of PP4 DualPipeV with the end stages holding none (embedding alone; head
# and MTP alone). The runs stop after 2 of 3 iterations, so that their learning rates are those
# of the resumed run.
ARGS = TINY_MOE + ["--num-layers", "6", "--micro-batch-size", "1", "--train-iters", "3", "--exit-interval", "2",
                   "--moe-router-bias-update-rate", "1e-2", "--eval-interval", "2", "--eval-iters", "1",
                   "--mtp-eval-loss", "--log-interval", "1"]
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5
LAYOUTS = {
    "TP2-SP-EP2-DP2": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size",
                       "2"],
    "PP2-dualpipe-EP2-DP2": ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipe",
                             "--expert-model-parallel-size", "2"],
    "PP4-dualpipev": ["--pipeline-model-parallel-size", "4", "--pipeline-schedule", "dualpipev",
                      "--decoder-first-pipeline-num-layers", "0", "--decoder-last-pipeline-num-layers", "0"],
    "PP2-1f1b-TP2-SP": ["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                        "--sequence-parallel"],
}
DEPTHS = (1, 2)


def mtp(depth: int) -> list[str]:
    return ["--mtp-num-layers", str(depth)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mtp-checkpoint"))


@pytest.fixture(scope="module")
def reference():
    """One process, 3 iterations."""
    runs = spawn_runs(1, [ARGS + mtp(depth) + ["--exit-interval", "0"] for depth in DEPTHS])
    return dict(zip(DEPTHS, runs))


@pytest.fixture(scope="module")
def world4(checkpoint):
    """Every layout at both depths, then the resume of the PP2 1F1B checkpoint (D=2) under PP4 DualPipeV."""
    runs = {(name, depth): ARGS + mtp(depth) + extra for depth in DEPTHS for name, extra in LAYOUTS.items()}
    runs[("PP2-1f1b-TP2-SP", 2)] += ["--save", checkpoint]
    runs[("resumed", 2)] = ARGS + mtp(2) + LAYOUTS["PP4-dualpipev"] + ["--load", checkpoint, "--exit-interval", "0"]
    return dict(zip(runs, spawn_runs(4, list(runs.values()))))


def logged(log: list[str], field: str) -> list[float]:
    """Every value of a field of the iteration lines, e.g. "mtp_2 loss" or "grad norm"."""
    return [float(v) for v in re.findall(rf"\| {field}: (\S+) \|", "\n".join(log))]


def validation(log: list[str], name: str) -> list[float]:
    return [float(v) for v in re.findall(rf"\| {name} value: (\S+) \|", "\n".join(log))]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mtp_matches_one_process(world4, reference, layout, depth):
    run, one = world4[(layout, depth)], reference[depth]
    assert run.losses == pytest.approx(one.losses[:2], rel=LOSS_RTOL)
    for k in range(1, depth + 1):
        assert len(logged(one.log, f"mtp_{k} loss")) == 3 and len(validation(one.log, f"mtp_{k} loss")) == 1
        assert logged(run.log, f"mtp_{k} loss") == pytest.approx(logged(one.log, f"mtp_{k} loss")[:2], rel=LOSS_RTOL)
        assert validation(run.log, f"mtp_{k} loss") == pytest.approx(validation(one.log, f"mtp_{k} loss"),
                                                                     rel=LOSS_RTOL)
    assert validation_losses(run.log) == pytest.approx(validation_losses(one.log), rel=LOSS_RTOL)
    # printed with 3 decimals
    assert logged(run.log, "grad norm") == pytest.approx(logged(one.log, "grad norm")[:2], abs=0.0011)
    name, error = max(gradient_errors(run, one).items(), key=lambda item: item[1])
    assert error < GRAD_RTOL, f"{name}: relative gradient error {error:.2e}"
    assert any(name.startswith(f"mtp.{depth - 1}.layer.mlp.experts") for name in run.grads)


def test_mtp_checkpoint_resumes_under_another_layout(world4, reference):
    """Saved by PP2 x TP2 1F1B (with the last stage's tied embedding), loaded by PP4 DualPipeV."""
    resumed = world4[("resumed", 2)]
    assert len(resumed.losses) == 1
    assert resumed.losses == pytest.approx(reference[2].losses[2:], rel=LOSS_RTOL)
    assert logged(resumed.log, "mtp_2 loss") == pytest.approx(logged(reference[2].log, "mtp_2 loss")[2:],
                                                              rel=LOSS_RTOL)
