"""Pipeline parallelism across real processes gives the one-process run.

1F1B, DualPipe and DualPipeV at PP 4 and PP 2 (x DP 2), the zero-bubble W split on and
off, and PP2 x TP2 x EP2: losses of several optimizer steps, the validation loss, and
every parameter's gradient at the first step (gathered by global name; under DualPipe
after the two copies of a stage are summed).
"""
import re

import pytest

from tests.helpers import TINY_MOE
from tests.multiproc import spawn_runs

ARGS = TINY_MOE + ["--num-layers", "8", "--micro-batch-size", "1", "--train-iters", "3",
                   "--moe-router-bias-update-rate", "1e-2", "--eval-interval", "3", "--eval-iters", "1",
                   "--log-interval", "1"]
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5


def pipeline(pp: int, schedule: str, *extra: str) -> list[str]:
    return ARGS + ["--pipeline-model-parallel-size", str(pp), "--pipeline-schedule", schedule, *extra]


NO_SPLIT = "--no-pipeline-split-backward"
WORLD4 = {  # PP 4 with 8 micro-batches; PP 2 x DP 2 with 4 micro-batches per pipeline
    "PP4-1f1b": pipeline(4, "1f1b"),
    "PP4-dualpipe": pipeline(4, "dualpipe"),
    "PP4-dualpipev": pipeline(4, "dualpipev"),
    "PP4-1f1b-nosplit": pipeline(4, "1f1b", NO_SPLIT),
    "PP4-dualpipe-nosplit": pipeline(4, "dualpipe", NO_SPLIT),
    "PP4-dualpipev-nosplit": pipeline(4, "dualpipev", NO_SPLIT),
    "PP2xDP2-1f1b": pipeline(2, "1f1b"),
    "PP2xDP2-dualpipe": pipeline(2, "dualpipe"),
    "PP2xDP2-dualpipev": pipeline(2, "dualpipev"),
    "PP4-dualpipev-uneven": pipeline(4, "dualpipev", "--decoder-first-pipeline-num-layers", "0",
                                     "--decoder-last-pipeline-num-layers", "2"),  # stages of 0,1,1,...,1,2
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Where the one-process run and the PP4 DualPipe run save their final state."""
    return {name: str(tmp_path_factory.mktemp("checkpoint")) for name in ("one process", "PP4-dualpipe")}


@pytest.fixture(scope="module")
def reference(checkpoints):
    return spawn_runs(1, [ARGS + ["--save", checkpoints["one process"]]])[0]


@pytest.fixture(scope="module")
def world4(checkpoints):
    arg_lists = {**WORLD4, "PP4-dualpipe": WORLD4["PP4-dualpipe"] + ["--save", checkpoints["PP4-dualpipe"]]}
    return dict(zip(WORLD4, spawn_runs(4, list(arg_lists.values()))))


def validation_losses(log: list[str]) -> list[float]:
    pattern = r"validation loss at iteration \d+ \| lm loss value: (\S+)"
    return [float(v) for v in re.findall(pattern, "\n".join(log))]


def step_statistics(log: list[str]) -> list[float]:
    """Balance loss, max/mean expert load, nodes per token (mean, max) and grad norm of every step,
    as rank 0 logs them: each is reduced over the whole pipeline."""
    pattern = (r"load_balancing_loss: (\S+) \| moe max/mean expert load: (\S+) \| "
               r"moe nodes per token: mean (\S+) max (\d+) \| grad norm: (\S+)")
    return [float(v) for values in re.findall(pattern, "\n".join(log)) for v in values]


def gradient_errors(run, reference) -> dict[str, float]:
    assert run.grads.keys() == reference.grads.keys()
    return {name: float((run.grads[name] - grad).norm() / grad.norm().clamp_min(1e-12))
            for name, grad in reference.grads.items()}


def assert_same_run(run, reference):
    assert run.losses == pytest.approx(reference.losses, rel=LOSS_RTOL)
    assert len(validation_losses(reference.log)) == 1
    assert validation_losses(run.log) == pytest.approx(validation_losses(reference.log), rel=LOSS_RTOL)
    assert len(step_statistics(reference.log)) == 5 * 3
    # printed with 3 decimals (grad norm, load ratio) or 2 (nodes per token)
    assert step_statistics(run.log) == pytest.approx(step_statistics(reference.log), rel=LOSS_RTOL, abs=0.011)
    name, error = max(gradient_errors(run, reference).items(), key=lambda item: item[1])
    assert error < GRAD_RTOL, f"{name}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("layout", WORLD4)
def test_pipeline_matches_one_process(world4, reference, layout):
    assert_same_run(world4[layout], reference)


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe", "dualpipev"])
def test_weight_split_gives_the_same_gradients(world4, schedule):
    split, whole = world4[f"PP4-{schedule}"], world4[f"PP4-{schedule}-nosplit"]
    assert max(gradient_errors(split, whole).values()) < 1e-6


def test_dualpipe_checkpoint_resumes_in_one_process(world4, reference, checkpoints):
    """Both copies of every stage, saved under global names, load into the single model."""
    resumed = spawn_runs(1, [ARGS + ["--train-iters", "4", "--load", path] for path in checkpoints.values()])
    assert [len(run.losses) for run in resumed] == [1, 1]
    assert resumed[1].losses == pytest.approx(resumed[0].losses, rel=LOSS_RTOL)


def test_pp2_tp2_ep2_matches_one_process(reference):
    run = spawn_runs(8, [pipeline(2, "dualpipe", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                  "--expert-model-parallel-size", "2")])[0]
    assert_same_run(run, reference)
