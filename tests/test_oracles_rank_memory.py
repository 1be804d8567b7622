"""The planner's rank memory against hand-written definitions, in one process: which layers each
pipeline rank holds for every schedule (and Megatron's --decoder-first/last-pipeline-num-layers), the
layout and the shapes a run's flags give, what a chunk adds for its head, which stages count as MoE
and which micro-batches are alive at a rank's peak for 1F1B and interleaved 1F1B (without overlap),
walked by hand. Peaks of paired (overlapped, DualPipe) schedules are left to test_oracles_planner.py."""
import pytest

from megadual.arguments import parse_args, resolve_device_defaults
from megadual.model.gpt import StageSpec
from megadual.parallel.recompute import RecomputePlan
from megadual.plan.memory_model import PeakMoment, stage_activations
from megadual.plan.rank_memory import (
    Layout,
    ParamCount,
    _has_moe_layer,
    _stage_layers,
    chunk_activations,
    layer_parameters,
    layout_of,
    peak_activations,
    predict,
    rank_stages,
    shape_of,
)
from megadual.plan.tensor_bytes import Precision, Shape
from tests.helpers import TINY_MOE

HEAD_COPY = "head and loss | BF16 weight copy"


def config(*flags):
    """TINY_MOE (hidden 64, vocab 512, seq 32, micro-batch 2, layer 0 dense) with 4 layers, 8 samples a step."""
    return resolve_device_defaults(parse_args(TINY_MOE + ["--num-layers", "4", "--global-batch-size", "8",
                                                          *flags]), "cpu")


def test_layout_of_the_flags():
    c = config("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
               "--expert-model-parallel-size", "2", "--pipeline-schedule", "interleaved",
               "--num-virtual-stages-per-pipeline-rank", "2", "--overlap-moe-expert-parallel-comm")
    assert layout_of(c, 8) == Layout(8, 2, 2, 2, "interleaved", 2, True)
    assert layout_of(c, 8).dp == 2
    assert layout_of(config(), 3) == Layout(3, 1, 1, 1, "1f1b", 1, False)
    # V from layers per virtual stage: 4 layers / (PP 2 x 1)
    per_stage = config("--pipeline-model-parallel-size", "2", "--pipeline-schedule", "interleaved",
                       "--num-layers-per-virtual-pipeline-stage", "1")
    assert layout_of(per_stage, 2) == Layout(2, 1, 2, 1, "interleaved", 2, False)


def spec(first, last, embedding=False, head=False):
    return StageSpec(first, last, embedding, head)


def test_each_rank_holds_its_schedules_stages_in_chunk_order():
    """4 layers. PP 1: the whole model. 1F1B over 2 ranks: 2 layers each, or 1 and 3 with the end
    stages' flags. Interleaved V 2: stages of 1 layer, rank r holding stages r and r + 2. DualPipe:
    rank 0 runs stage 0 on its first chunk (the forward path) and stage 1 on its second (the reverse
    path, which starts at rank 1); rank 1 the other way round."""
    def stages(layout, *flags):
        return rank_stages(config(*flags), layout, 4)

    assert stages(Layout(1, 1, 1, 1, "1f1b")) == [[spec(0, 4, True, True)]]
    one_f = Layout(2, 1, 2, 1, "1f1b")
    assert stages(one_f) == [[spec(0, 2, embedding=True)], [spec(2, 4, head=True)]]
    assert stages(one_f, "--decoder-first-pipeline-num-layers", "1", "--decoder-last-pipeline-num-layers", "3") == \
        [[spec(0, 1, embedding=True)], [spec(1, 4, head=True)]]
    # 6 layers over 4 stages: 1 first, 1 last, the middle 2 each
    assert stages(Layout(4, 1, 4, 1, "1f1b"), "--num-layers", "6", "--decoder-first-pipeline-num-layers", "1",
                  "--decoder-last-pipeline-num-layers", "1") == \
        [[spec(0, 1, embedding=True)], [spec(1, 3)], [spec(3, 5)], [spec(5, 6, head=True)]]
    assert stages(Layout(2, 1, 2, 1, "interleaved", 2)) == \
        [[spec(0, 1, embedding=True), spec(2, 3)], [spec(1, 2), spec(3, 4, head=True)]]
    assert stages(Layout(2, 1, 2, 1, "dualpipe")) == \
        [[spec(0, 2, embedding=True), spec(2, 4, head=True)], [spec(2, 4, head=True), spec(0, 2, embedding=True)]]


def test_shapes_per_rank_from_the_flags():
    """Sequence parallelism only with TP > 1; GEMM inputs saved in 4 bytes, 2 under --bf16, 1 with FP8;
    BF16 weights only under the distributed optimizer; `recast_weights` passed through."""
    def shape(world, flags, **kw):
        c = config(*flags)
        return shape_of(c, layout_of(c, world), **kw)

    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2"]
    assert shape(2, tp2 + ["--bf16"]) == Shape(32, 2, 2, True, 2, 2, precision=Precision(autocast=True))
    assert shape(2, tp2 + ["--bf16"], distributed=True, recast_weights=True) == \
        Shape(32, 2, 2, True, 2, 2, precision=Precision(True, True, False, True))
    assert shape(1, ["--sequence-parallel"]) == Shape(32, 2, 1, False, 1, 4, precision=Precision())
    assert shape(1, ["--bf16", "--fp8-format", "e4m3"]) == \
        Shape(32, 2, 1, False, 1, 1, precision=Precision(autocast=True, fp8=True))
    assert shape(1, ["--micro-batch-size", "4", "--seq-length", "16"]) == Shape(16, 4, 1, False, 1, 4,
                                                                               precision=Precision())


@pytest.mark.parametrize("flags, world, head_copy", [
    (["--bf16"], 1, 64 * 512 * 2),  # autocast's BF16 copy of the FP32 head weight: hidden x vocab x 2 bytes
    (["--bf16", "--tensor-model-parallel-size", "2"], 2, 64 * 256 * 2),  # this TP rank's vocabulary half
    (["--bf16", "--fp8-format", "e4m3"], 1, 64 * 512 * 2),  # the head is not an FP8 linear
    (["--bf16", "--use-distributed-optimizer"], 1, 0),  # BF16 weights: no copy
    ([], 1, 0),  # FP32: no autocast
])
def test_a_chunk_with_the_head_adds_autocasts_copy_of_its_weight(flags, world, head_copy):
    c = config(*flags)
    layout = layout_of(c, world)
    distributed = c.optim.use_distributed_optimizer
    with_head = chunk_activations(c, layout, spec(2, 4, head=True), distributed)
    assert with_head.kinds.get(HEAD_COPY, 0) == head_copy
    assert HEAD_COPY not in chunk_activations(c, layout, spec(0, 2, embedding=True), distributed).kinds
    # besides the copy, what the memory model's stage sum gives for the stage's layers, embedding and head
    shape, plan = shape_of(c, layout, distributed), RecomputePlan.from_flags(c.train)
    for stage, copy in ((spec(0, 2, embedding=True), 0), (spec(2, 4, head=True), head_copy)):
        reference = stage_activations(c.model, shape, range(stage.first_layer, stage.last_layer), stage.has_embedding,
                                      stage.has_head, plan)
        assert chunk_activations(c, layout, stage, distributed).kept == reference.kept + copy
    # a forward whose backward will be a BI keeps no copy: its backward casts the weight again
    assert HEAD_COPY not in chunk_activations(c, layout, spec(2, 4, head=True), distributed, recast_weights=True).kinds


def test_moe_stages_and_layers_counted_by_the_layers_index():
    """--moe-first-k-dense 4 with 4 layers and one MTP layer: only the MTP layer (index 4, beside the
    head) is MoE. A dense layer: 2 norms, q/k/v/o of 64 x 64, a 64 x 256 SwiGLU (3 matrices); an MoE one:
    the router (8 x 64), the shared expert (3 x 64 x 32) and this EP rank's experts (8 / EP of 3 x 64 x 32,
    as 3 stacked tensors)."""
    c = config("--moe-first-k-dense", "4", "--mtp-num-layers", "1").model
    assert _stage_layers(c, spec(0, 4, True, True)) == [0, 1, 2, 3, 4]
    assert _stage_layers(c, spec(1, 3)) == [1, 2]
    assert _has_moe_layer(c, spec(0, 4, True, True)) and _has_moe_layer(c, spec(3, 4, head=True))
    assert not _has_moe_layer(c, spec(0, 4, embedding=True))
    h, ffn = 64, c.ffn_hidden_size
    attention = ParamCount(2 * h + 4 * h * h, 6)
    assert layer_parameters(c, 3, 1, 1) == attention + ParamCount(3 * h * ffn, 3)
    assert layer_parameters(c, 3, 2, 1) == ParamCount(2 * h + 4 * h * h // 2 + 3 * h * ffn // 2, 9)
    for ep in (1, 2):
        experts = 8 // ep * 3 * h * 32
        assert layer_parameters(c, 4, 1, ep) == attention + ParamCount(8 * h + 3 * h * 32, 4) + \
            ParamCount(experts, 3, experts)
    assert ParamCount(1, 2, 3) + ParamCount(10, 20, 30) == ParamCount(11, 22, 33)


def test_one_process_peaks_at_a_micro_batch_and_its_recomputation():
    """PP 1: one micro-batch of the whole model alive, and its backward's rise where a recomputed
    region rises above the kept bytes (full recomputation of each layer); selective recomputation of
    this small model stays below them, no rise."""
    full = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    for flags, rises in (([], False), (["--recompute-granularity", "selective"], False), (full, True)):
        c = config(*flags)
        acts = chunk_activations(c, layout_of(c, 1), spec(0, 4, True, True), False)
        peak = peak_activations(c, 1, 0, False)
        if rises:
            assert acts.transient > 0
            assert peak == PeakMoment(acts.kept + acts.transient, (1,), (0,), 0, acts.transient, (0,))
        else:
            assert acts.transient < 0 and peak == PeakMoment(acts.kept, (1,), (0,), -1, 0.0, (0,))
        assert predict(c, 1)[0].peak_activations == peak.bytes


@pytest.mark.parametrize("split", [True, False])
def test_1f1b_peaks_with_the_warm_up_forwards_alive(split):
    """1F1B, PP 2, 4 micro-batches (8 samples of 2 on DP 1). Rank 0: one warm-up forward, then F1 B0
    ...: two micro-batches alive at F1. Rank 1 (last): F0 B0 F1 B1 ...: one alive, and with the W split
    (B0 a BI, its W deferred until after F1) the GEMM inputs micro-batch 0's W still needs."""
    c = config("--pipeline-model-parallel-size", "2", *([] if split else ["--no-pipeline-split-backward"]))
    first, last = (chunk_activations(c, layout_of(c, 2), s, False) for s in (spec(0, 2, embedding=True),
                                                                            spec(2, 4, head=True)))
    recast = (1,) if split else (0,)
    assert peak_activations(c, 2, 0, False) == PeakMoment(2 * first.kept, (2,), (0,), recast=(2,) if split else (0,))
    if split:
        assert peak_activations(c, 2, 1, False) == \
            PeakMoment(last.kept + last.weight_inputs, (1,), (1,), recast=recast)
    else:
        assert peak_activations(c, 2, 1, False) == PeakMoment(last.kept, (1,), (0,), recast=recast)
    assert [r.peak_activations for r in predict(c, 2)] == [2 * first.kept, peak_activations(c, 2, 1, False).bytes]


def test_interleaved_peaks_with_the_first_chunks_micro_batches_alive():
    """Interleaved, PP 2, V 2, 4 micro-batches in groups of PP: rank 0 warms up with (PP - 1) x 2 + (V - 1)
    x PP = 4 forwards, chunk 0 m0 m1, chunk 1 m0 m1; then each forward is followed by a backward: F(0, m2)
    B(1, m0) F(0, m3): chunk 0's four and chunk 1's m1 alive, more than the five before (chunk 0 of
    layer 0 and the embedding keeps more than chunk 1 of layer 2)."""
    c = config("--pipeline-model-parallel-size", "2", "--pipeline-schedule", "interleaved",
               "--num-virtual-stages-per-pipeline-rank", "2", "--no-pipeline-split-backward")
    chunk0, chunk1 = (chunk_activations(c, layout_of(c, 2), s, False) for s in (spec(0, 1, embedding=True),
                                                                               spec(2, 3)))
    assert chunk0.kept > chunk1.kept
    assert peak_activations(c, 2, 0, False) == PeakMoment(4 * chunk0.kept + chunk1.kept, (4, 1), (0, 0),
                                                          recast=(0, 0))
