"""The planner's parameter count (rank_memory.predict, what `python -m megadual.plan` prints) equals
the parameters of the model each rank really builds, for MLA, TP, SP, EP, PP, MTP, FP8 and BF16
configurations. Each rank's model is built in this one process under a fake process group of the
layout's size (collectives are no-ops; the groups and this rank's shards are the real ones).
Below that, the planner's shared pieces against their definitions, the bytes written out from
shapes and dtypes: an RMSNorm's and a SwiGLU MLP's saved tensors in each precision, FP8 copies
with their scales, the expected EP ranks a token reaches (all top-k choices enumerated), how a
recomputed piece rises above what a micro-batch keeps, ZeRO-1's optimizer shard, and the layers
the end stages take."""
import itertools
import math

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from megadual.arguments import parse_args, resolve_device_defaults
from megadual.config import ConfigError, ModelConfig
from megadual.plan.layout_search import end_stage_layers
from megadual.plan.memory_model import PeakMoment, mlp_bytes, peak_moment
from megadual.plan.rank_memory import Layout, ParamCount, StateBytes, _distributed_adam_bytes, predict
from megadual.plan.tensor_bytes import (
    Activations,
    Precision,
    Shape,
    codec_bytes,
    distinct_ranks_per_token,
    norm_bytes,
    per_expert_keeps,
)
from megadual.training.loop import build_model, build_topology
from tests.helpers import TINY_MOE

MLA = ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-head-dim", "8",
       "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8"]
CASES = {
    "MLA-no-q-lora": (1, MLA[:1] + MLA[3:]),
    "MLA-TP2-SP-MTP": (2, MLA + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--mtp-num-layers", "1"]),
    "GQA-TP2xEP2-FP8": (4, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                            "--group-query-attention", "--num-query-groups", "2", "--fp8-format", "e4m3"]),
    "MLA-PP2-1f1b-MTP-BF16": (2, MLA + ["--pipeline-model-parallel-size", "2", "--mtp-num-layers", "1", "--bf16"]),
    "PP2-dualpipe-EP2-MTP-BF16-distopt": (4, MLA + ["--pipeline-model-parallel-size", "2", "--pipeline-schedule",
                                                     "dualpipe", "--expert-model-parallel-size", "2",
                                                     "--mtp-num-layers", "1", "--bf16",
                                                     "--use-distributed-optimizer", "--ddp-bucket-size", "1000"]),
    "dense-layers-MTP2": (1, ["--moe-first-k-dense", "4", "--mtp-num-layers", "2"]),  # MoE in the MTP layers only
}


def built_parameters(config, world: int, rank: int) -> tuple[int, int, int]:
    """(elements, tensors, routed experts' elements) of the parameters rank `rank` builds."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        model = build_model(config, build_topology(config), torch.device("cpu"))
        named = dict(model.named_parameters())
        return (sum(p.numel() for p in named.values()), len(named),
                sum(p.numel() for name, p in named.items() if ".experts." in name))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES)
def test_planner_counts_every_parameter_each_rank_builds(case):
    world, flags = CASES[case]
    config = resolve_device_defaults(parse_args(TINY_MOE + ["--num-layers", "4", "--global-batch-size", "16",
                                                            *flags]), "cpu")
    weight_bytes = 2 if config.train.bf16 and config.optim.use_distributed_optimizer else 4
    predicted = predict(config, world, activations=False)
    tp, pp = config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size
    for rank in range(0, world, world // pp):  # the first rank of each pipeline stage: TP rank 0, EP rank 0
        elements, tensors, experts = built_parameters(config, world, rank)
        got = predicted[rank // (world // pp)]
        assert got.parameters == elements * weight_bytes and got.peak_activations == 0, (case, rank)
        # FP32 gradients; AdamW's two FP32 moments per element and an FP32 step count per tensor
        assert (got.gradients, got.optimizer_state) == (4 * elements, 8 * elements + 4 * tensors), (case, rank)
        if config.optim.ddp_bucket_size:  # ZeRO-1 over DP 2 (the experts' expert-DP group: 1 rank), 1000-element
            # buckets: FP32 moments and masters (12 bytes) of this rank's shard, a step count per bucket
            dense = elements - experts
            assert got.optimizer_state_distributed == 12 * (-(-dense // 2) + experts) + \
                4 * (-(-dense // 1000) - (-experts // 1000)), (case, rank)
    assert tp * pp <= world


# --- the memory model's pieces, from shapes and dtypes --------------------------------------------

BF16_WEIGHTS = Precision(autocast=True, bf16_weights=True)


@pytest.mark.parametrize("precision, stream", [(Precision(), 4), (Precision(autocast=True), 4), (BF16_WEIGHTS, 2)])
def test_an_rmsnorm_saves_its_fp32_input_normed_values_and_inverse_rms(precision, stream):
    """16 tokens on this rank (seq 16 x micro-batch 2, halved by sequence parallelism), hidden 8:
    per token 8 FP32 inputs, 8 FP32 normed values and one FP32 1/rms; recomputed, its input as it came."""
    s = Shape(16, 2, tp=2, sequence_parallel=True, precision=precision)
    assert norm_bytes(s, 8) == (16 * (8 * 4 + 8 * 4 + 4), 16 * 8 * stream)
    assert norm_bytes(Shape(16, 2, tp=2, precision=precision), 8)[0] == 32 * (8 * 4 + 8 * 4 + 4)


def test_fp8_copies_hold_one_byte_per_element_and_an_fp32_scale_per_128():
    """moe_act's cache: 1 x 128 tiles along the columns. A linear's FP8 input: 128 tokens per scale of each
    column (as the experts' GEMMs do it, per expert: 300 pairs over 3 experts is 100 each, one scale)."""
    assert codec_bytes(10, 300) == 10 * 300 + 10 * 3 * 4
    assert codec_bytes(10, 129) == 10 * 129 + 10 * 2 * 4
    assert Precision(fp8=True).keeps(300, 16, 4) == 300 * 16 + 16 * 3 * 4
    assert Precision(fp8=True).keeps(129, 16, 4) == 129 * 16 + 16 * 2 * 4
    assert per_expert_keeps(Precision(fp8=True), 300, 16, 3, 4) == 300 * 16 + 3 * 16 * 1 * 4
    assert per_expert_keeps(Precision(fp8=True), 387, 16, 3, 4) == 387 * 16 + 3 * 16 * 2 * 4  # 129 pairs each
    assert per_expert_keeps(Precision(fp8=True), 300, 16, 1, 4) == 300 * 16 + 16 * 3 * 4
    assert per_expert_keeps(Precision(autocast=True), 300, 16, 3, 4) == 300 * 16 * 2
    assert per_expert_keeps(Precision(), 300, 16, 3, 4) == 300 * 16 * 4


@pytest.mark.parametrize("precision", ["fp32", "autocast", "bf16-weights", "fp8"])
def test_a_swiglu_mlp_saves_its_inputs_gate_up_and_the_down_projections_input(precision):
    """t = 6 tokens, hidden 8, ffn 5: gate and up keep their input, the SwiGLU keeps gate and up (their
    outputs), down keeps its input; autocast casts the FP32 input and weights to BF16 once, BF16 weights
    keep their input as it came and FP8 keeps an E4M3 copy (one FP32 scale per 128 tokens of a column)."""
    t, h, f = 6, 8, 5
    p, x_in, out, down_in, weights = {
        "fp32": (Precision(), t * h * 4, 4, t * f * 4, 0),
        "autocast": (Precision(autocast=True), t * h * 2, 2, t * f * 2, 3 * h * f * 2),
        "bf16-weights": (BF16_WEIGHTS, t * h * 2, 2, t * f * 2, 0),
        "fp8": (Precision(fp8=True), t * h + h * 4, 4, t * f + f * 4, 0),
    }[precision]
    def kept(acts):
        return acts.kept, acts.weight_inputs

    assert kept(mlp_bytes(p, t, h, f)) == (x_in + t * out * 2 * f + down_in + weights, x_in + down_in)
    held = 0 if precision in ("fp32", "bf16-weights") else x_in  # an input already held elsewhere
    assert kept(mlp_bytes(p, t, h, f, input_new=False)) == (held + t * out * 2 * f + down_in + weights, held + down_in)


def test_expected_ep_ranks_a_token_reaches_every_top_k_choice_counted():
    """8 experts on 4 EP ranks (2 each), top-3: the mean over all C(8, 3) choices of the ranks they hold."""
    config = ModelConfig(num_experts=8, moe_router_topk=3)
    choices = list(itertools.combinations(range(8), 3))
    mean = sum(len({e // 2 for e in chosen}) for chosen in choices) / len(choices)
    assert distinct_ranks_per_token(config, 4) == pytest.approx(mean)
    assert distinct_ranks_per_token(config, 1) == 1 and distinct_ranks_per_token(config, 8) == pytest.approx(3)


def rise_above_kept(pieces) -> tuple[float, float]:
    """The backward walked piece by piece, last first: (how far the bytes alive rise above what the
    micro-batch keeps; the same when each finished piece leaves its GEMM inputs to the W)."""
    kept = sum(piece["kept"] for piece in pieces)
    rises = []
    for deferring in (False, True):
        live, rise = kept, -math.inf
        for piece in reversed(pieces):
            if "transient" in piece:
                rise = max(rise, live + piece["transient"] - kept)
            live -= piece["kept"] - (piece["gemm"] if deferring else 0)
        rises.append(rise)
    return rises[0], rises[1]


def test_a_recomputed_piece_rises_above_the_kept_bytes_less_what_the_pieces_after_it_freed():
    """Pieces in forward order (saved, GEMM inputs, recomputed, kept inputs, recomputed copies)."""
    pieces = [(100.0, 10.0, False, 0.0, 0.0), (50.0, 20.0, True, 5.0, 100.0), (40.0, 30.0, False, 0.0, 0.0),
              (70.0, 0.0, True, 8.0, 0.0), (25.0, 15.0, False, 0.0, 0.0)]
    acts = Activations()
    for saved, gemm, recomputed, kept_inputs, extra in pieces:
        acts.add(saved, gemm, recomputed, kept_inputs=kept_inputs, recomputed_extra=extra, kind=f"piece {saved:g}")
    walked = [{"kept": kept_inputs if recomputed else saved, "gemm": gemm}
              | ({"transient": saved - kept_inputs + extra} if recomputed else {})
              for saved, gemm, recomputed, kept_inputs, extra in pieces]
    assert acts.kept == 100 + 5 + 40 + 8 + 25 and acts.weight_inputs == 10 + 20 + 30 + 0 + 15
    assert (acts.transient, acts.transient_deferring) == rise_above_kept(walked)
    assert acts.kinds == {"piece 100": 100, "piece 50": 5, "piece 40": 40, "piece 70": 8, "piece 25": 25}
    assert dict(acts.named("layer 3").kinds) == {f"layer 3 | {k}": v for k, v in acts.kinds.items()}
    acts.add(10.0, kind={"piece 25": 4.0, "router": 6.0})  # bytes by kind; a kind seen before adds up
    assert acts.kinds == {"piece 100": 100, "piece 50": 5, "piece 40": 40, "piece 70": 8, "piece 25": 29, "router": 6}
    kept, recomputed = Activations(), Activations()
    kept.add(30.0)  # nothing of it a GEMM input, nothing recomputed
    recomputed.add(30.0, recomputed=True)  # nothing kept, all of it recomputed
    assert (kept.kept, kept.weight_inputs, kept.transient, kept.kinds) == (30.0, 0.0, -math.inf, {"other": 30.0})
    assert (recomputed.kept, recomputed.transient, recomputed.transient_deferring) == (0.0, 30.0, 30.0)


def test_precision_of_the_flags():
    """--bf16 autocasts; its weights are BF16 only under the distributed optimizer; --fp8-format."""
    assert Precision.of_run(True, False, False) == Precision(autocast=True)
    assert Precision.of_run(True, True, True) == Precision(autocast=True, bf16_weights=True, fp8=True)
    assert Precision.of_run(False, True, False) == Precision()


def test_the_peak_of_a_schedule_walked_by_hand():
    """Chunk 0 keeps 100 bytes a micro-batch (30 of them GEMM inputs a W needs; its recomputation rises 7,
    11 when deferring), chunk 1 1000 (300; 70, 110), neither pausing at an all-to-all. Steps: F0, F1, F0,
    BI1 (its W deferred), paired F1 & B0, W1. Without pauses the paired forward runs after B0."""
    chunks = [Activations(100.0, 30.0, 7.0, 11.0), Activations(1000.0, 300.0, 70.0, 110.0)]
    steps = ((0, -1, False, -1, False), (1, -1, False, -1, True), (0, -1, False, -1, False),
             (-1, 1, True, -1, False), (1, 0, False, -1, False), (-1, -1, False, 1, False))
    # F0 F1 F0: 1200 alive; BI1 rises 110 above it (1310), then leaves 1200 - 1000 + 300 = 500; B0 rises 7
    # (507), leaves 400; then F1: 1400, the most alive with nothing rising; W1: 1100
    assert peak_moment(steps, chunks) == PeakMoment(1400.0, (1, 1), (0, 1), recast=(0, 0))
    assert peak_moment(steps, chunks, [False, True]) == PeakMoment(1400.0, (1, 1), (0, 1), recast=(0, 0))
    # without the paired step the peak is BI1's rise over the three forwards
    assert peak_moment(steps[:4], chunks) == PeakMoment(1310.0, (2, 1), (0, 0), 1, 110.0, (0, 1))
    plain = ((0, -1, False, -1, False), (-1, 0, False, -1, False))  # F0 then B0: 100 alive at most
    assert peak_moment(plain, [Activations(100.0, 30.0)]) == PeakMoment(100.0, (1,), (0,), recast=(0,))
    # a tie keeps the first moment; nothing run, nothing alive
    tie = ((0, -1, False, -1, False), (-1, 0, False, -1, False), (1, -1, False, -1, False))
    assert peak_moment(tie, [Activations(100.0), Activations(100.0)]) == \
        PeakMoment(100.0, (1, 0), (0, 0), recast=(0, 0))
    assert peak_moment((), chunks) == PeakMoment(0.0, (0, 0), (0, 0), recast=(0, 0))


def test_a_paired_backward_frees_down_to_each_pause_as_the_forward_fills():
    """A micro-batch of 100 bytes (30 GEMM inputs) whose forward pauses at two all-to-alls, with 60 kept
    (20 GEMM inputs) and then 90 (30). F0, F0, then a paired F0 & B0 (pipeline/overlap.py): B0 frees
    down to 90 and launches, F0 steps to its first pause (60); B0 frees down to 60, F0 steps to 90;
    B0 ends, F0 finishes. Not both whole (300): one whole and 150 of the pair at most (250)."""
    mb = [Activations(100.0, 30.0, pauses=((60.0, 20.0), (90.0, 30.0)))]
    f, f_b = (0, -1, False, -1, False), (0, 0, False, -1, False)
    assert peak_moment((f, f, f_b), mb) == PeakMoment(250.0, (1,), (0,), recast=(0,), paired=150.0)
    # without all-to-alls in the backward's chunk the forward runs after it: two whole at most
    assert peak_moment((f, f, f_b), mb, [False]) == PeakMoment(200.0, (2,), (0,), recast=(0,))
    # the backward a BI: what it frees down to keeps the GEMM inputs after the pause for the W:
    # 90 + (30 - 30) + 60, then 60 + (30 - 20) + 90 = 160 of the pair
    f_bi, split = (0, 0, True, -1, False), (0, -1, False, -1, True)
    assert peak_moment((split, f, f_bi), mb) == PeakMoment(260.0, (1,), (0,), recast=(0,), paired=160.0)


def test_the_peak_after_deferred_ws_walked_by_hand():
    """The chunks above. F0 F0: 200; BI0 rises 11 (211) and leaves 130, BI0 again leaves 60 (two W0 owed);
    F0 F1: 1160; W0: 1130; paired F0 & B1 (B1 without all-to-alls: F0 after it): B1 rises 70 (1200), leaves
    130, F0: 230; W0: 200; F1 F1: 2200."""
    chunks = [Activations(100.0, 30.0, 7.0, 11.0), Activations(1000.0, 300.0, 70.0, 110.0)]
    f0, f1, bi0 = (0, -1, False, -1, False), (1, -1, False, -1, False), (-1, 0, True, -1, False)
    w0 = (-1, -1, False, 0, False)
    split = (0, -1, False, -1, True)  # an F0 whose backward is a BI
    steps = (split, split, bi0, bi0, f0, f1, w0, (0, 1, False, -1, False), w0, f1, f1)
    assert peak_moment(steps[:8], chunks, [True, False]) == PeakMoment(1200.0, (1, 1), (1, 0), 1, 70.0, (0, 0))
    assert peak_moment(steps, chunks, [True, False]) == PeakMoment(2200.0, (2, 2), (0, 0), recast=(0, 0))


def test_zero1_keeps_each_ranks_shard_of_moments_and_masters_and_a_step_per_bucket():
    """1000 elements, 401 of them routed experts; DP 4 x TP 2, EP 4: the dense 599 over DP 4 (150 each),
    the experts' 401 over their expert-DP group of 4 x 2 / 4 = 2 ranks (201 each); buckets of 256
    elements (3 dense, 2 expert) each with an FP32 step count. BF16 weights: FP32 masters beside FP32
    moments, 4 + 8 bytes per element; with BF16 moments (--use-precision-aware-optimizer) 4 + 4."""
    params = ParamCount(elements=1000, tensors=9, expert_elements=401)
    layout = Layout(world=8, tp=2, pp=1, ep=4, schedule="1f1b")
    assert _distributed_adam_bytes(params, layout, StateBytes(2, 8, 4), 256) == 12 * (150 + 201) + 4 * (3 + 2)
    assert _distributed_adam_bytes(params, layout, StateBytes(2, 4, 4), 256) == 8 * (150 + 201) + 4 * (3 + 2)
    flags = TINY_MOE + ["--use-distributed-optimizer", "--bf16"]
    assert StateBytes.of(parse_args(flags), True) == StateBytes(2, 8, 4)
    assert StateBytes.of(parse_args(flags), False) == StateBytes(4, 8, 0)  # the plain AdamW: FP32 weights
    bf16_moments = parse_args(flags + ["--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16"])
    assert StateBytes.of(bf16_moments, True) == StateBytes(2, 2 + 4, 4)
    assert StateBytes.of(parse_args(TINY_MOE + ["--use-distributed-optimizer"]), True) == StateBytes(4, 8, 0)


def test_end_stages_take_what_an_even_split_leaves_over():
    """Megatron's --decoder-first/last-pipeline-num-layers: the middle stages take ceil(L / S) layers
    each, the first and last the rest, the last one more when it is odd; an even split sets neither."""
    for layers, stages in itertools.product(range(1, 40), range(2, 9)):
        middle = -(-layers // stages)
        if layers % stages == 0:
            assert end_stage_layers(layers, stages) == (None, None)
        elif middle * (stages - 2) > layers:
            with pytest.raises(ConfigError, match=f"{layers} layers do not split over {stages} stages"):
                end_stage_layers(layers, stages)
        else:
            first, last = end_stage_layers(layers, stages)
            assert first + last + middle * (stages - 2) == layers and last - first in (0, 1), (layers, stages)
