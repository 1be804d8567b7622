"""Multi-token prediction across real processes gives the one-process run, under every schedule.

D = 1 and D = 2 under TP2+SP x EP2 (x DP2), PP2 DualPipe x EP2 (x DP2) and PP4 DualPipeV (with
multi-head latent attention in two of them: without query compression under TP2+SP, with it
under DualPipe), D = 2 under PP2 1F1B x TP2+SP (the last stage's tied embedding) and PP2 x V2
interleaved 1F1B x EP2 (x DP2), the W split
on, checked by the layout checker (megadual/verify.py) in one launch per world size: every
logged value of every step (the lm loss, each `mtp_k loss`, the validation losses with MTP's)
and its grad norm, every first-step gradient, every parameter and buffer after the last step,
and the copies of each piece equal across ranks (the tied embedding's included). A checkpoint
saved under PP2 1F1B x TP2 resumes under PP4 DualPipeV.
"""
import pytest

from megadual import verify
from megadual.training.capture import relative_difference
from tests.helpers import TINY_MOE
from tests.test_mla_layouts import MLA

# 6 layers: 1 per stage of PP4 DualPipeV with the end stages holding none (the embedding alone;
# head and MTP alone). The learning rate decays over 3 iterations whatever --train-iters, so
# that a run resumed for a third has the rates of one that never stopped.
ARGS = TINY_MOE + ["--num-layers", "6", "--micro-batch-size", "1", "--lr-decay-iters", "3",
                   "--moe-router-bias-update-rate", "1e-2", "--eval-interval", "2", "--eval-iters", "1",
                   "--mtp-eval-loss"]
DUALPIPEV = "pp4:dualpipev,--decoder-first-pipeline-num-layers=0,--decoder-last-pipeline-num-layers=0"
TP_SP, DUALPIPE = "tp2,sp,ep2,dp2", "pp2:dualpipe,ep2,dp2"
SAVER = "D2-PP2-1f1bxTP2-SP"  # its run saves the checkpoint the resume test loads
CASES = {  # name: (MTP depth, model flags, layout); each layout at both depths, MLA in some
    "D1-MLA-TP2-SPxEP2xDP2": (1, MLA, TP_SP),
    "D2-TP2-SPxEP2xDP2": (2, [], TP_SP),
    "D1-PP2-dualpipexEP2xDP2": (1, [], DUALPIPE),
    "D2-MLA-q-lora-PP2-dualpipexEP2xDP2": (2, MLA + ["--q-lora-rank", "24"], DUALPIPE),
    "D1-PP4-dualpipev": (1, [], DUALPIPEV),
    "D2-PP4-dualpipev": (2, [], DUALPIPEV),
    SAVER: (2, [], "pp2,tp2,sp"),
    # the last of 4 stages (rank 1, chunk 1) keeps a tied embedding, as 1F1B's last rank
    "D2-PP2xV2-interleavedxEP2xDP2": (2, [], "pp2:interleaved,ep2,dp2,--num-virtual-stages-per-pipeline-rank=2,"
                                             "--decoder-first-pipeline-num-layers=1,"
                                             "--decoder-last-pipeline-num-layers=1"),
}


def mtp(depth: int, model: list[str] = ()) -> list[str]:
    return ARGS + list(model) + ["--mtp-num-layers", str(depth)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mtp-checkpoint"))


@pytest.fixture(scope="module")
def outcomes(checkpoint):
    """Every case, 2 iterations; the PP2 1F1B x TP2 run saves its state."""
    saving = {SAVER: ",--save=" + checkpoint}
    return verify.check({name: (mtp(depth, model) + ["--train-iters", "2"], layout + saving.get(name, ""))
                         for name, (depth, model, layout) in CASES.items()})


@pytest.mark.parametrize("case", CASES)
def test_mtp_matches_one_process(outcomes, case):
    outcome, depth = outcomes[case], CASES[case][0]
    report = outcome.report.format(case)
    print(report)
    assert outcome.report.passed, report
    logged = outcome.reference.logged
    assert all(len(logged[f"mtp_{k} loss"]) == 2 and len(logged[f"validation mtp_{k} loss"]) == 1
               for k in range(1, depth + 1))
    assert any(name.startswith(f"mtp.{depth - 1}.layer.mlp.experts") for name in outcome.run.first_grads)


def test_mtp_checkpoint_resumes_under_another_layout(outcomes, checkpoint):
    """Saved by PP2 x TP2 1F1B (the last stage's tied embedding saved once), loaded by PP4 DualPipeV
    for a third iteration: as PP4 DualPipeV training 3 at once."""
    spec = verify.parse_layout(DUALPIPEV, ARGS)
    runs = verify.launch_all({
        "straight": (spec.world, mtp(2) + spec.flags + ["--train-iters", "3"]),
        "resumed": (spec.world, mtp(2) + spec.flags + ["--train-iters", "3", "--load", checkpoint])})
    straight, resumed = runs["straight"], runs["resumed"]
    limit = outcomes[SAVER].spec.tolerance
    assert len(resumed.logged["lm loss"]) == 1
    for name in ("lm loss", "mtp_1 loss", "mtp_2 loss"):
        assert relative_difference(resumed.logged[name][0], straight.logged[name][2]) <= limit.logged, name
    assert resumed.final.keys() == straight.final.keys()
    worst = max(resumed.final, key=lambda name: relative_difference(resumed.final[name], straight.final[name]))
    assert relative_difference(resumed.final[worst], straight.final[worst]) <= limit.final, worst
