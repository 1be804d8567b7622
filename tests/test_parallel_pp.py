"""Pipeline parallelism across real processes gives the one-process run, checked by the layout checker.

1F1B, DualPipe and DualPipeV at PP 4 and PP 2 x DP 2, the zero-bubble W split on and off, uneven
end stages, PP2 DualPipe x TP2 x EP2, and dropout with document boundaries (--reset-position-ids,
--reset-attention-mask, --eod-mask-loss: every stage's attention reads them); interleaved 1F1B at
PP4 x V2 (recomputing) and PP2 x V2 x EP2, and 1F1B at PP2 x EP2, with
--overlap-moe-expert-parallel-comm: the logged values (losses, routing statistics,
validation loss) and grad norm of every step, every parameter's first-step gradient (under DualPipe
after the two copies of a stage are summed), every parameter and buffer after the last step, and
the two DualPipe copies of each stage equal (megadual/verify.py).
"""
import pytest

from megadual import verify
from megadual.training.capture import relative_difference
from tests.helpers import TINY_MOE

ARGS = TINY_MOE + ["--num-layers", "8", "--micro-batch-size", "1", "--train-iters", "3",
                   "--moe-router-bias-update-rate", "1e-2", "--eval-interval", "3", "--eval-iters", "1"]
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
DOCUMENTS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
RAMP = TINY_MOE + ["--num-layers", "8", "--micro-batch-size", "1", "--moe-router-bias-update-rate", "1e-2",
                   "--lr-warmup-iters", "0", "--global-batch-size", "16", "--rampup-batch-size", "8", "4", "16",
                   "--train-samples", "40"]
NO_SPLIT = ",--no-pipeline-split-backward"
UNEVEN = "--decoder-first-pipeline-num-layers=0,--decoder-last-pipeline-num-layers=2"
FULL = "--recompute-granularity=full,--recompute-method=uniform,--recompute-num-layers=1"

CASES = {  # name: (flags, layout); PP 4 runs 8 micro-batches, PP 2 x DP 2 4 per pipeline
    "PP4-1f1b": (ARGS, "pp4"),
    "PP4-dualpipe": (ARGS, "pp4:dualpipe"),
    "PP4-dualpipev": (ARGS, "pp4:dualpipev"),
    "PP4-1f1b-nosplit": (ARGS, "pp4" + NO_SPLIT),
    "PP4-dualpipe-nosplit": (ARGS, "pp4:dualpipe" + NO_SPLIT),
    "PP4-dualpipev-nosplit": (ARGS, "pp4:dualpipev" + NO_SPLIT),
    "PP2xDP2-1f1b": (ARGS, "pp2,dp2"),
    "PP2xDP2-dualpipe": (ARGS, "pp2:dualpipe,dp2"),
    "PP2xDP2-dualpipev": (ARGS, "pp2:dualpipev,dp2"),
    # stages of 0, 1, 1, 1, 1, 1, 1, 2 layers
    "PP4-dualpipev-uneven": (ARGS, "pp4:dualpipev," + UNEVEN),
    "PP2-dualpipexTP2-SPxEP2": (ARGS, "pp2:dualpipe,tp2,sp,ep2"),
    # rank 1 holds stages 1 and 2 of 4 and still draws each sample's masks; it reads the tokens
    # only for their document boundaries
    "PP2xDP2-dualpipev-dropout": (ARGS + DROPOUT + DOCUMENTS, "pp2:dualpipev,dp2"),
    "PP2xDP2-dualpipe-dropout": (ARGS + DROPOUT + DOCUMENTS, "pp2:dualpipe,dp2"),
    # Megatron's interleaved 1F1B (V = 8 layers / (PP 4 x 1)) with full recomputation, bit for bit
    "PP4xV2-interleaved-recompute": (ARGS, "pp4:interleaved,--num-layers-per-virtual-pipeline-stage=1," + FULL),
    # the paired F&B of --overlap-moe-expert-parallel-comm over recomputed MoE layers
    "PP2xV2xEP2-interleaved-overlap": (ARGS, "pp2:interleaved,ep2,--num-virtual-stages-per-pipeline-rank=2,"
                                             "--overlap-moe-expert-parallel-comm,--recompute-granularity=selective,"
                                             "--recompute-modules=moe"),
    "PP2xEP2-1f1b-overlap": (ARGS, "pp2,ep2,--overlap-moe-expert-parallel-comm"),
    # --rampup-batch-size: 4, 6, then 8 micro-batches per pipeline, each count's schedule built once
    "PP2xDP2-dualpipe-ramp": (RAMP, "pp2:dualpipe,dp2"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Where a one-process run and the PP4 DualPipe run save their final state."""
    return {name: str(tmp_path_factory.mktemp("checkpoint")) for name in ("one process", "PP4-dualpipe")}


@pytest.fixture(scope="module")
def outcomes(checkpoints):
    saving = {"one process": (ARGS, "--save=" + checkpoints["one process"]),
              "PP4-dualpipe": (ARGS, "pp4:dualpipe,--save=" + checkpoints["PP4-dualpipe"])}
    return verify.check({**CASES, **saving})


@pytest.mark.parametrize("case", [*CASES, "one process"])
def test_pipeline_matches_one_process(outcomes, case):
    report = outcomes[case].report.format(case)
    print(report)
    assert outcomes[case].report.passed, report


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe", "dualpipev"])
def test_weight_split_gives_the_same_run(outcomes, schedule):
    split, whole = outcomes[f"PP4-{schedule}"], outcomes[f"PP4-{schedule}-nosplit"]
    assert verify.compare(split.run, whole.run, split.spec.tolerance).passed


def test_dualpipe_checkpoint_resumes_in_one_process(outcomes, checkpoints):
    """Both copies of every stage, saved under global names, load into the single model."""
    resumed = verify.launch_all({name: (1, ARGS + ["--train-iters", "4", "--load", path])
                                 for name, path in checkpoints.items()})
    losses = {name: capture.logged["lm loss"] for name, capture in resumed.items()}
    assert [len(v) for v in losses.values()] == [1, 1]
    limit = outcomes["PP4-dualpipe"].spec.tolerance.logged
    assert relative_difference(losses["PP4-dualpipe"][0], losses["one process"][0]) <= limit


def test_dualpipe_with_expert_parallelism_holds_the_host_sync_budget(outcomes):
    """One transfer per MoE layer per micro-batch forward and one per step (tests/test_host_syncs.py).
    Rank 0 of PP2 DualPipe x TP2 x EP2 holds stage 0 (layers 0-3, 3 MoE) of one direction and
    stage 1 (layers 4-7, 4 MoE) of the other; each direction carries 4 of the 8 micro-batches."""
    assert outcomes["PP2-dualpipexTP2-SPxEP2"].run.host_syncs == [4 * 3 + 4 * 4 + 1] * 3
