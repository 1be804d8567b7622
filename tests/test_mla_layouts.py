"""Multi-head latent attention, with and without query compression, gives the one-process run
under TP2 x EP2 (x DP2) with and without sequence parallelism, PP2 DualPipe x EP2 (x DP2) and
PP4 DualPipeV, the W split on, checked by the layout checker (megadual/verify.py): the logged
values and grad norm of every step, every first-step gradient, every parameter and buffer after
the last step.
"""
import pytest

from megadual import verify
from tests.helpers import TINY_MOE

MLA = ["--multi-latent-attention", "--kv-lora-rank", "16", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
       "--v-head-dim", "12"]
ARGS = TINY_MOE + MLA + ["--num-layers", "8", "--hidden-size", "32", "--seq-length", "16", "--micro-batch-size", "1",
                         "--train-iters", "2", "--moe-router-bias-update-rate", "1e-2"]
VARIANTS = {  # V3's shape (query latent, YaRN with a softmax mscale) and V2-Lite's (queries from h)
    "q-lora": ARGS + ["--q-lora-rank", "24", "--rope-scaling-factor", "4", "--original-max-position-embeddings",
                      "16", "--mscale-all-dim", "1"],
    "no-q-lora": ARGS,
}
LAYOUTS = {
    "TP2-SPxEP2xDP2": "tp2,sp,ep2,dp2",
    "TP2xEP2xDP2": "tp2,ep2,dp2",  # without sequence parallelism the replicated weights' gradients are whole
    "PP2-dualpipexEP2xDP2": "pp2:dualpipe,ep2,dp2",
    "PP4-dualpipev": "pp4:dualpipev",
}
# Each variant under each kind of layout once (the MTP layout tests run MLA under these layouts too,
# tests/test_parallel_mtp.py); both variants where TP splits the latents' projections, with and without SP.
PAIRS = [("no-q-lora", "TP2-SPxEP2xDP2"), ("q-lora", "TP2xEP2xDP2"), ("no-q-lora", "PP2-dualpipexEP2xDP2"),
         ("q-lora", "PP4-dualpipev")]
CASES = {f"{variant}-{layout}": (VARIANTS[variant], LAYOUTS[layout]) for variant, layout in PAIRS}
# MLA draws its attention-dropout masks by global head, as MHA does.
CASES["q-lora-TP2-SPxEP2xDP2-dropout"] = (VARIANTS["q-lora"] + ["--attention-dropout", "0.2"], LAYOUTS["TP2-SPxEP2xDP2"])


@pytest.fixture(scope="module")
def outcomes():
    return verify.check(CASES)


@pytest.mark.parametrize("case", CASES)
def test_mla_layout_matches_one_process(outcomes, case):
    report = outcomes[case].report.format(case)
    print(report)
    assert outcomes[case].report.passed, report
