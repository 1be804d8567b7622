"""python -m megadual.plan's command line and what it shares with the rest: the dtype held per
optimizer column, --device, --json and --breakdown against the predictions they show, refused
search arguments, and the search's step-time model using --log-throughput's FLOP count and the
topology's expert groups. (Predictions against the memory report: tests/test_memory_layouts.py.)"""
import json
import math

import pytest

from megadual.arguments import resolve_device_defaults
from megadual.model.flops import forward_flops_per_token
from megadual.parallel.topology import Layout
from megadual.plan.cli import MB, format_breakdown, main
from megadual.plan.layout_search import Hardware, chunk_costs
from megadual.plan.rank_memory import predict
from pretrain_moe import load_config
from tests.helpers import TINY_MOE

PP4 = TINY_MOE + ["--num-layers", "8", "--micro-batch-size", "1", "--pipeline-model-parallel-size", "4",
                  "--pipeline-schedule", "dualpipev", "--mtp-num-layers", "1", "--use-distributed-optimizer"]


def config(*flags, device="cuda"):
    return resolve_device_defaults(load_config(list(flags)), device)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bf16_default_follows_the_device_planned_for(capsys):
    assert "; bf16" in run(capsys, *PP4, "--world-size", "4")[1]
    assert "; fp32" in run(capsys, *PP4, "--world-size", "4", "--device", "cpu")[1]
    assert "; fp32" in run(capsys, *PP4, "--no-bf16", "--world-size", "4")[1]


def test_parameters_are_counted_in_the_dtype_held():
    """BF16 weights only under the distributed optimizer with --bf16; its moments in their dtypes."""
    plain, sharded = predict(config(*PP4), 4, False), predict(config(*PP4), 4, True)
    fp32 = predict(config(*PP4, device="cpu"), 4, True)
    aware = predict(config(*PP4, "--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16",
                           "--exp-avg-sq-dtype", "bf16"), 4, True)
    for p, d, f, a in zip(plain, sharded, fp32, aware):
        assert p.parameters == f.parameters == 2 * d.parameters == p.gradients
        assert d.optimizer_state_distributed - a.optimizer_state_distributed == pytest.approx(p.parameters, rel=0.01)
        assert p.peak_activations > d.peak_activations  # autocast's BF16 copies of FP32 weights


def test_json_prints_the_chosen_optimizers_ranks_in_mb(capsys):
    code, out, _ = run(capsys, *PP4, "--world-size", "4", "--json")
    ranks = json.loads(out)["ranks"]
    assert code == 0 and [r["pipeline_rank"] for r in ranks] == [0, 1, 2, 3]
    for shown, rank in zip(ranks, predict(config(*PP4), 4)):
        assert rank.distributed_optimizer
        for key, value in (("parameters", rank.parameters), ("gradients", rank.gradients),
                           ("optimizer_state", rank.optimizer_state_held),
                           ("peak_activations", rank.peak_activations), ("total", rank.total)):
            assert shown[key] == round(value / MB, 3), key


ONE_F_ONE_B = TINY_MOE + ["--num-layers", "8", "--micro-batch-size", "1", "--pipeline-model-parallel-size", "4"]


@pytest.mark.parametrize("flags", [PP4, PP4 + ["--recompute-granularity", "selective", "--recompute-modules", "moe"],
                                   ONE_F_ONE_B])  # 1F1B: micro-batches down to their W's GEMM inputs at the peak
def test_breakdown_adds_up_to_the_peak(flags):
    c = config(*flags)
    for rank in predict(c, 4):
        text = format_breakdown(c, 4, rank.pp_rank)
        rows = text.splitlines()[2:-1]
        assert sum(float(row.split()[-2]) for row in rows) == pytest.approx(rank.peak_activations / MB, abs=0.002 * len(rows))
        assert any(row.startswith("layer ") for row in rows)


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "8"], "--gpus needs --gpu-memory-gib"),
    (["--gpus", "-8", "--gpu-memory-gib", "80"], "--gpus must be positive"),
    (["--gpus", "0", "--gpu-memory-gib", "80"], "--gpus must be positive"),
    (["--gpus", "8", "--gpu-memory-gib", "0"], "--gpus needs --gpu-memory-gib"),
    (["--world-size", "4", "--breakdown", "7"], "--breakdown 7"),
])
def test_bad_arguments_are_refused_in_one_line(capsys, argv, message):
    code, out, err = run(capsys, *PP4, *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_search_compute_is_the_throughput_flop_count():
    """The chunks' forward seconds over all ranks add up to forward_flops_per_token (MTP and the
    head included, attention not halved) at the assumed rate."""
    c, hw = config(*PP4), Hardware(tflops=1e-6)
    tokens = c.model.seq_length * c.train.micro_batch_size
    costs = chunk_costs(c, 4, hw)
    assert len(costs) == 8
    assert sum(cost.f for cost in costs.values()) * 1e6 == pytest.approx(forward_flops_per_token(c.model) * tokens)


def test_search_takes_expert_groups_as_the_topology_builds_them():
    """TP8 x EP2 on 8-GPU nodes: the EP group is two consecutive ranks of one node (TP folded in),
    so its all-to-all runs over NVLink, not InfiniBand."""
    layout = Layout(16, tp=8, ep=2, ranks_per_node=8)
    assert layout.nodes_per_ep_group == 1
    assert all(len({rank // 8 for rank in group}) == 1 for group in layout.group_members()["ep"])
    c = config(*TINY_MOE, "--tensor-model-parallel-size", "8", "--num-attention-heads", "8",
               "--expert-model-parallel-size", "2", "--global-batch-size", "4")
    nvlink, ib = (chunk_costs(c, 16, Hardware(nvlink_gbps=n, ib_gbps=i))[0, 0].comm_f for n, i in ((10, 1), (1, 10)))
    assert nvlink < ib


def test_search_times_a_paired_chunk_hop_by_hop():
    """The search's step time pairs F&B chunks at hop level (pipeline/hops.py). DualPipe PP2 x EP2
    with the EP group over two nodes: a chunk's forward is, per MoE layer, attention with the router
    and shared expert, the dispatch hop, the routed experts, the combine hop (written out here from
    the throughput FLOP count; the shared expert while the dispatch is in flight); its backward is the same reversed at twice the compute. Where one hop
    outlasts the routed experts' piece beside it, the pair takes longer than its compute though its
    links take less in all (the chunk-level model's max(compute, links) would say compute)."""
    from megadual.model.flops import attention_flops, gemm, swiglu_flops
    from megadual.pipeline.actions import Action, Kind
    from megadual.pipeline.hops import paired_seconds
    from megadual.pipeline.simulate import StageCosts

    c = config(*TINY_MOE, "--num-layers", "4", "--moe-first-k-dense", "0", "--pipeline-model-parallel-size", "2",
               "--pipeline-schedule", "dualpipe", "--expert-model-parallel-size", "2", "--global-batch-size", "16")
    m, tokens = c.model, c.model.seq_length * c.train.micro_batch_size
    per_second = 1e9  # Hardware's 1e-3 TFLOP/s
    routed = tokens * m.moe_router_topk * swiglu_flops(m.hidden_size, m.moe_ffn_hidden_size) / per_second
    before = tokens * (attention_flops(m) + gemm(m.hidden_size, m.num_experts)
                       + swiglu_flops(m.hidden_size, m.moe_shared_expert_intermediate_size)) / per_second
    pair = Action(Kind.FB, 0, 1, b_chunk=1, b_mb=0)  # rank 0: chunk 0 (layers 0-1) forward, chunk 1's backward
    for ib_gbps, long_hop in ((2e-3, True), (1e-2, False)):
        hw = Hardware(gpus_per_node=1, tflops=1e-3, ib_gbps=ib_gbps)
        costs = chunk_costs(c, 4, hw)
        # each hop: a token's hidden state (BF16) once to each other EP rank holding one of its top-2 of 8
        # experts (4 per rank); uniform routing leaves the other rank out with C(4, 2) / C(8, 2)
        hop = tokens * m.hidden_size * 2 * (1 - math.comb(4, 2) / math.comb(8, 2)) / (ib_gbps * 1e9)
        forward, backward = costs[0, 0].hops_f, costs[0, 1].hops_b
        assert forward.compute == pytest.approx((before, routed, before, routed, 0.0))
        assert forward.hops == pytest.approx((hop,) * 4)
        shared = tokens * swiglu_flops(m.hidden_size, m.moe_shared_expert_intermediate_size) / per_second
        assert forward.lead == pytest.approx((shared, 0.0, shared, 0.0))  # computed beside its dispatch
        assert forward.drain == pytest.approx((before - shared, None, before - shared, None, None))  # counts first
        head = costs[0, 1].f - 2 * (before + routed)  # chunk 1 (layers 2-3 of the reverse copy) holds the head
        assert backward.compute == pytest.approx((2 * head, 2 * routed, 2 * before, 2 * routed, 2 * before))
        assert backward.hops == pytest.approx((hop,) * 4)
        compute = costs[0, 0].f + costs[0, 1].b
        assert costs[0, 0].comm_f + costs[0, 1].comm_b < compute
        duration = StageCosts(costs, 0.0).duration(pair, 0)
        assert duration == pytest.approx(paired_seconds(costs[0, 0].hops_f, costs[0, 1].hops_b))
        assert (duration > 1.05 * compute) if long_hop else duration == pytest.approx(compute)
        assert (hop > routed) == long_hop


def test_gpus_lists_every_schedule_with_its_step_time(capsys):
    """--gpus ranks interleaved 1F1B and the overlapped schedules beside DualPipe(V) and 1F1B, each with
    a throughput from the hop-level simulation (tiny MoE, EP over nodes of 2 GPUs)."""
    code, out, _ = run(capsys, *TINY_MOE, "--num-layers", "8", "--micro-batch-size", "1", "--global-batch-size", "16",
                       "--gpus", "8", "--gpu-memory-gib", "80", "--gpus-per-node", "2", "--top", "1000")
    assert code == 0
    listed = {line.split()[2] for line in out.splitlines() if line.startswith("TP") and float(line.split()[-1]) > 0}
    assert listed == {"1f1b", "1f1b+ov", "interleaved", "interleaved+ov", "dualpipe", "dualpipev"}
