"""The memory report against the planner's prediction, per rank, on the layouts of issue 13;
recomputation lowering the measured peak by what the planner says, and changing no bit of a
layout's run (losses, grad norms, gradients, final parameters) under every schedule, the W split
and DualPipe's paired F&B chunks with their all-to-alls."""
import pytest

from megadual import verify
from megadual.plan.check import measure_and_predict
from tests.helpers import TINY_MOE

ARGS = TINY_MOE + ["--num-layers", "8", "--micro-batch-size", "1", "--train-iters", "1", "--lr-warmup-iters", "0"]
SELECTIVE = ["--recompute-granularity", "selective"]
FULL = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"]
FULL_BLOCK = ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3"]
SELECTIVE_MOE = SELECTIVE + ["--recompute-modules", "moe", "core_attn", "layernorm"]
FEWER = ["--global-batch-size", "2"]  # without a pipeline the peak is one micro-batch's: two show the accumulation
CASES = {
    "one process": (ARGS + FEWER, ""),
    "one process, full recomputation": (ARGS + FULL + FEWER, ""),
    "DP2xEP2-distributed-optimizer": (ARGS + ["--use-distributed-optimizer", "--global-batch-size", "4"], "dp2,ep2"),
    "PP2-dualpipexEP2": (ARGS, "pp2:dualpipe,ep2"),
    "PP2-dualpipexEP2-selective-moe": (ARGS + SELECTIVE_MOE, "pp2:dualpipe,ep2"),
    "PP2-1f1b": (ARGS, "pp2"),
    "PP2-1f1b-full-block": (ARGS + FULL_BLOCK, "pp2"),
    "PP2-1f1b-MTP2": (ARGS + ["--mtp-num-layers", "2"], "pp2"),  # MTP beside the head, a tied embedding
    "PP4-dualpipev": (ARGS, "pp4:dualpipev"),
    "PP4-dualpipev-selective": (ARGS + SELECTIVE, "pp4:dualpipev"),
}
# --overlap-moe-expert-parallel-comm's paired F&B (and DualPipe's): the backward frees its micro-batch
# while the forward's fills (pipeline/overlap.py); world 4, so they share the PP2 DualPipe x EP2 launch
PAIRED = {
    "PP2-1f1bxEP2-overlap": (ARGS, "pp2,ep2,--overlap-moe-expert-parallel-comm"),
    "PP2xV2xEP2-interleaved-overlap": (ARGS, "pp2:interleaved,ep2,--num-virtual-stages-per-pipeline-rank=2,"
                                             "--overlap-moe-expert-parallel-comm"),
}
CASES.update(PAIRED)
# Issue 19's matrix: FP32, --bf16, FP8 and FP8 + --bf16, each with the plain and the distributed
# optimizer, without and with recomputation, each precision at the quick-start shape and at V3's
# proportions (MLA, top-8 of 32 experts, hidden 4x the expert FFN) and under one process, DP2 x EP2
# and PP2 DualPipe x EP2, added to the launches above (one per world size: the layouts share them,
# so a row costs a run, not a spawn). Parameters, gradients and optimizer state (BF16 weights, BF16
# moments) must be exact; the peak activations within 5%.
QUICK_START = ["--mock-data", "--vocab-size", "512", "--num-layers", "4", "--hidden-size", "128",  # (sequence 128 there)
               "--num-attention-heads", "4", "--seq-length", "64", "--multi-latent-attention", "--q-lora-rank", "64",
               "--kv-lora-rank", "32", "--qk-head-dim", "32", "--qk-pos-emb-head-dim", "16", "--v-head-dim", "32",
               "--mtp-num-layers", "1", "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "128",
               "--moe-shared-expert-intermediate-size", "128", "--moe-first-k-dense", "1", "--micro-batch-size", "4",
               "--global-batch-size", "4", "--train-iters", "1", "--lr-warmup-iters", "0"]
V3_SHAPED = ["--mock-data", "--vocab-size", "512", "--num-layers", "4", "--hidden-size", "128",
             "--num-attention-heads", "4", "--seq-length", "64", "--multi-latent-attention", "--q-lora-rank", "48",
             "--kv-lora-rank", "32", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "16", "--v-head-dim", "16",
             "--num-experts", "32", "--moe-router-topk", "8", "--moe-ffn-hidden-size", "32",
             "--moe-shared-expert-intermediate-size", "32", "--moe-first-k-dense", "1", "--micro-batch-size", "1",
             "--global-batch-size", "8", "--train-iters", "1", "--lr-warmup-iters", "0"]
FP32, BF16, FP8 = ["--no-bf16"], ["--bf16"], ["--fp8-format", "e4m3"]
ZERO1 = ["--use-distributed-optimizer"]
BF16_MOMENTS = ZERO1 + ["--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16"]
SHAPES = {"quick-start": QUICK_START, "V3-shaped": V3_SHAPED}
PRECISIONS = {"FP32": FP32, "BF16": BF16, "FP8": FP32 + FP8, "FP8+BF16": BF16 + FP8}
OPTIMIZERS = {"plain": [], "distributed": ZERO1, "BF16-moments": BF16_MOMENTS}
RECOMPUTATIONS = {"": [], "full": FULL} | {
    f"selective {' '.join(modules)}": SELECTIVE + ["--recompute-modules", *modules]
    for modules in (("layernorm", "mla_up_proj"), ("core_attn", "moe_act"), ("mla_up_proj", "core_attn", "moe_act"),
                    ("layernorm", "mla_up_proj", "moe_act"), ("core_attn", "layernorm"), ("core_attn",))}
LAYOUTS = {"": "", "DP2xEP2": "dp2,ep2", "PP2-dualpipexEP2": "pp2:dualpipe,ep2", "TP2-SPxEP2": "tp2,sp,ep2"}
BATCHES = {  # a layout's (micro-batch, global batch) where the shape's does not suit it: V3's one process
    ("V3-shaped", ""): ["--global-batch-size", "1"],  # keeps one micro-batch alive, so it runs one
    ("V3-shaped", "DP2xEP2"): ["--global-batch-size", "2"],
    ("quick-start", "DP2xEP2"): ["--global-batch-size", "8"],
    ("quick-start", "PP2-dualpipexEP2"): ["--micro-batch-size", "1", "--global-batch-size", "8"],
}
MATRIX = [  # (shape, precision, optimizer, recomputation, layout)
    ("quick-start", "FP32", "plain", "", ""),
    ("V3-shaped", "FP32", "plain", "selective layernorm mla_up_proj", ""),
    ("V3-shaped", "FP32", "distributed", "", "PP2-dualpipexEP2"),
    ("quick-start", "FP32", "distributed", "selective core_attn moe_act", "DP2xEP2"),
    ("V3-shaped", "BF16", "plain", "", "DP2xEP2"),
    ("quick-start", "BF16", "plain", "selective mla_up_proj core_attn moe_act", "PP2-dualpipexEP2"),
    ("quick-start", "BF16", "distributed", "", ""),
    ("quick-start", "BF16", "distributed", "", "TP2-SPxEP2"),  # MLA, MTP under TP+SP
    ("V3-shaped", "BF16", "distributed", "selective layernorm mla_up_proj moe_act", ""),
    ("quick-start", "FP8", "plain", "", ""),
    ("V3-shaped", "FP8", "plain", "selective core_attn layernorm", "PP2-dualpipexEP2"),
    ("V3-shaped", "FP8", "BF16-moments", "", "DP2xEP2"),
    ("quick-start", "FP8", "distributed", "full", ""),
    ("quick-start", "FP8+BF16", "plain", "", ""),
    ("V3-shaped", "FP8+BF16", "plain", "selective core_attn", "DP2xEP2"),
    ("V3-shaped", "FP8+BF16", "BF16-moments", "", "PP2-dualpipexEP2"),
    ("quick-start", "FP8+BF16", "BF16-moments", "selective layernorm mla_up_proj", ""),
]
PRECISION_CASES = {
    " ".join(filter(None, row)): (SHAPES[row[0]] + PRECISIONS[row[1]] + OPTIMIZERS[row[2]] + RECOMPUTATIONS[row[3]]
                                  + BATCHES.get((row[0], row[4]), []), LAYOUTS[row[4]])
    for row in MATRIX}
PRECISION_CASES["quick-start BF16 distributed grouped GEMM"] = (QUICK_START + BF16 + ZERO1 + ["--moe-grouped-gemm"], "")
CASES.update(PRECISION_CASES)
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


@pytest.mark.parametrize("case", [case for case in CASES if case not in PRECISION_CASES])
def test_planner_predicts_the_memory_report(runs, case):
    checked = runs[case]
    assert len(checked.capture.memory) == checked.spec.world
    for report, rank in checked.pairs():
        print(case, report.format(), f"| predicted peak activations {rank.peak_activations / 2**20:.3f}")
        assert report.parameters == rank.parameters
        assert report.gradients == rank.gradients
        assert report.optimizer_state == rank.optimizer_state_held
        assert abs(report.peak_activations / rank.peak_activations - 1) < 0.10


@pytest.mark.parametrize("case", [*PAIRED, "PP2-dualpipexEP2"])
def test_planner_predicts_the_paired_schedules_within_5_percent(runs, case):
    for report, rank in runs[case].pairs():
        assert abs(report.peak_activations / rank.peak_activations - 1) < 0.05


def test_the_precision_cases_cover_the_issues_matrix():
    """Every precision with both optimizers, without and with recomputation, at both shapes and
    under the three layouts (each row of the issue at least once; the runs cost time, not spawns)."""
    rows = {(precision, optimizer != "plain", recompute != "") for _, precision, optimizer, recompute, _ in MATRIX}
    assert rows == {(p, d, r) for p in PRECISIONS for d in (False, True) for r in (False, True)}
    for precision in PRECISIONS:
        assert {row[0] for row in MATRIX if row[1] == precision} == set(SHAPES)
        assert {row[4] for row in MATRIX if row[1] == precision} >= {"", "DP2xEP2", "PP2-dualpipexEP2"}


@pytest.mark.parametrize("case", PRECISION_CASES)
def test_planner_counts_what_each_precision_holds(runs, case):
    """Parameters (BF16 under the distributed optimizer with --bf16), gradients and optimizer state
    (its moments in their dtype) exactly, every rank; their counts equal the built model's."""
    checked = runs[case]
    assert len(checked.capture.memory) == checked.spec.world
    for report, rank in checked.pairs():
        print(case, report.format(), f"| predicted peak activations {rank.peak_activations / 2**20:.3f}")
        assert (report.parameters, report.gradients, report.optimizer_state) == \
            (rank.parameters, rank.gradients, rank.optimizer_state_held)


@pytest.mark.parametrize("case", PRECISION_CASES)
def test_planner_predicts_each_precisions_activations_within_5_percent(runs, case):
    for report, rank in runs[case].pairs():
        assert abs(report.peak_activations / rank.peak_activations - 1) < 0.05


def test_the_grouped_gemm_keeps_no_stack_of_expert_weights(runs):
    """The grouped GEMM keeps what the per-expert loop keeps (no stacked copy of the experts'
    weights per micro-batch), measured and planned."""
    ((grouped, grouped_predicted),) = runs["quick-start BF16 distributed grouped GEMM"].pairs()
    ((looped, looped_predicted),) = runs["quick-start BF16 distributed"].pairs()
    assert grouped.peak_activations == pytest.approx(looped.peak_activations, rel=0.01)
    assert grouped_predicted.peak_activations == looped_predicted.peak_activations


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
