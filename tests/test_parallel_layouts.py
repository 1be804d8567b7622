"""Data, tensor (plus sequence) and expert parallelism across real processes give the one-process run,
checked by the layout checker (megadual/verify.py): the logged values and grad norm of every step,
every first-step gradient, every parameter and buffer after the last step, within the measured
tolerance of the layout's class; and every copy of a piece on different ranks equal."""
import dataclasses
import math

import pytest

from megadual import verify
from tests.helpers import TINY_MOE

ARGS = TINY_MOE + ["--train-iters", "4", "--moe-router-bias-update-rate", "1e-2"]
GQA = ["--group-query-attention", "--num-query-groups", "2"]
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


def max_nodes(m: int) -> list[str]:
    """Experts on 2 nodes, each token allowed on `m` of them."""
    return ["--moe-router-max-nodes", str(m)]


CASES = {  # name: (flags, layout)
    "DP3": (ARGS + ["--global-batch-size", "12"], "dp3"),
    "TP2-GQA": (ARGS + GQA, "tp2"),
    "TP2-SP": (ARGS, "tp2,sp"),
    "EP2": (ARGS, "ep2"),
    "TP2-SPxEP2xDP2": (ARGS, "tp2,sp,ep2,dp2"),
    "EP4-on-2-nodes-M1": (ARGS + max_nodes(1), "ep4,nodes2"),
    "EP4-on-2-nodes-M2": (ARGS + max_nodes(2), "ep4,nodes2"),
    "TP2-SPxEP2xDP2-dropout": (ARGS + DROPOUT, "tp2,sp,ep2,dp2"),
}


@pytest.fixture(scope="module")
def outcomes():
    return verify.check(CASES)


@pytest.mark.parametrize("case", CASES)
def test_layout_matches_one_process(outcomes, case):
    report = outcomes[case].report.format(case)
    print(report)
    assert outcomes[case].report.passed, report


def test_dropout_is_on_in_the_dropout_case(outcomes):
    with_dropout, without = outcomes["TP2-SPxEP2xDP2-dropout"].run, outcomes["TP2-SPxEP2xDP2"].run
    assert with_dropout.logged["lm loss"] != without.logged["lm loss"]


def test_node_limit_keeps_each_token_on_its_m_nodes(outcomes):
    nodes = lambda case: outcomes[case].run.logged["moe nodes per token max"]
    assert nodes("EP4-on-2-nodes-M1") == [1] * 4
    assert max(nodes("EP4-on-2-nodes-M2")) == 2  # the limit, not chance, kept them on one node


def test_a_parameter_off_by_ten_times_the_noise_fails_and_is_named(outcomes):
    outcome = outcomes["TP2-SPxEP2xDP2"]
    name = "layers.2.mlp.experts.local.5.up.weight"
    final = dict(outcome.run.final)
    final[name] = final[name] * (1 + 10 * outcome.spec.tolerance.final)
    report = verify.compare(dataclasses.replace(outcome.run, final=final), outcome.reference,
                            outcome.spec.tolerance)
    assert not report.passed and name in report.format("")


def test_fp8_dispatch_sends_quantized_tokens_and_tracks_bf16():
    base = ARGS + ["--expert-model-parallel-size", "2", "--fp8-format", "e4m3"]
    runs = verify.launch_all({"plain": (2, base), "fp8 dispatch": (2, base + ["--moe-fp8-dispatch"])})
    plain, fp8_dispatch = (runs[k].logged["lm loss"] for k in ("plain", "fp8 dispatch"))
    assert fp8_dispatch != plain  # the dispatched tokens really were quantized
    assert fp8_dispatch == pytest.approx(plain, rel=5e-3)
    assert all(math.isfinite(loss) for loss in fp8_dispatch)


def test_ep2_steps_hold_the_host_sync_budget(outcomes):
    """One transfer per MoE layer per micro-batch forward (the dispatch counts) and one per step
    (tests/test_host_syncs.py): TINY_MOE's 2 MoE layers, 2 micro-batches of 2 per DP rank (EP2 is DP2);
    EP4 over 2 nodes (the hierarchical dispatch, both hops' counts in the one transfer) 1 micro-batch."""
    assert outcomes["EP2"].run.host_syncs == [2 * 2 + 1] * 4
    assert outcomes["EP4-on-2-nodes-M2"].run.host_syncs == [2 * 1 + 1] * 4
