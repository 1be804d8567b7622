"""Oracles written from the definitions, for what every parallel layout does alike (so comparing
layouts cannot see a bug there): the router's two score functions, Megatron's learning-rate
schedule, the E4M3 limits, the sampler's boundaries, the dropout masks of every site, and which
parameters each optimizer decays. Nothing here takes an expectation from the module it checks."""
import math
from dataclasses import replace

import pytest
import torch

from megadual.arguments import parse_args
from megadual.config import OptimConfig, TrainConfig
from megadual.data.sampler import PretrainingSampler
from megadual.fp8.quant import quantize_blocks, quantize_tiles
from megadual.model.dropout import AttentionDropout, HiddenDropout
from megadual.moe.router import Router
from megadual.parallel.topology import Layout, Topology
from megadual.pipeline.stage_model import build_full_model
from megadual.training.dist_optimizer import DistributedOptimizer
from megadual.training.lr_schedule import LRSchedule
from megadual.training.optimizer import build_optimizer, set_learning_rate
from tests.helpers import TINY_MOE, single_process_group
from tests.megatron_lr import megatron_lr

# --- the router -------------------------------------------------------------------------------

def reference_routing(x, weight, bias, score_function, topk, num_nodes, max_nodes, scaling):
    """Token by token in float64, as the DeepSeek-V3 report (2.1.2) and Megatron define it."""
    indices, gates = [], []
    experts = weight.shape[0]
    per_node = experts // num_nodes
    for token in x.double():
        logits = [float(token @ w) for w in weight.double()]
        if score_function == "sigmoid":
            s = [1 / (1 + math.exp(-u)) for u in logits]
        else:  # softmax over the experts of this token
            z = sum(math.exp(u) for u in logits)
            s = [math.exp(u) / z for u in logits]
        choice = [s[e] + float(bias[e]) for e in range(experts)]
        allowed = set(range(experts))
        if num_nodes > max_nodes:
            node_score = {n: sum(sorted(choice[n * per_node:(n + 1) * per_node], reverse=True)[:topk // max_nodes])
                          for n in range(num_nodes)}
            nodes = sorted(node_score, key=node_score.get, reverse=True)[:max_nodes]
            allowed = {e for e in range(experts) if e // per_node in nodes}
        chosen = sorted(allowed, key=lambda e: choice[e], reverse=True)[:topk]
        g = [s[e] for e in chosen]
        if score_function == "sigmoid":
            g = [v / sum(g) for v in g]
        indices.append(chosen)
        gates.append([v * scaling for v in g])
    return indices, gates


@pytest.mark.parametrize("score_function", ["sigmoid", "softmax"])
@pytest.mark.parametrize("num_nodes,max_nodes", [(1, 4), (4, 2)], ids=["no-node-limit", "4-nodes-M2"])
def test_router_equals_the_written_out_formula(score_function, num_nodes, max_nodes):
    config = parse_args(TINY_MOE + ["--num-experts", "16", "--moe-router-topk", "4",
                                    "--moe-router-score-function", score_function,
                                    "--moe-router-topk-scaling-factor", "2.5"]).model
    config = replace(config, moe_router_max_nodes=max_nodes)
    router = Router(config, num_nodes)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        router.expert_bias.copy_(torch.randn(16, generator=g) * 0.3)
    x = torch.randn(24, config.hidden_size, generator=g) * 0.2
    routing = router(x, num_sequences=2)
    indices, gates = reference_routing(x, router.weight.detach(), router.expert_bias, score_function, 4,
                                       num_nodes, max_nodes, 2.5)
    order = routing.indices.argsort(-1)
    got_indices = routing.indices.gather(-1, order)
    got_gates = routing.gates.detach().gather(-1, order).double()
    want_order = [sorted(range(4), key=lambda k: row[k]) for row in indices]
    assert got_indices.tolist() == [[row[k] for k in o] for row, o in zip(indices, want_order)]
    want_gates = torch.tensor([[row[k] for k in o] for row, o in zip(gates, want_order)], dtype=torch.float64)
    torch.testing.assert_close(got_gates, want_gates, rtol=1e-5, atol=1e-6)
    if num_nodes > max_nodes:  # the limit binds: some token would have gone to more nodes unrestricted
        assert max(len({e // 4 for e in row}) for row in indices) <= max_nodes


# --- the learning rate ---------------------------------------------------------------------------

def learning_rate(iteration: int, cfg: OptimConfig, train_iters: int) -> float:
    """The LR of the update after `iteration` iterations of an iteration-based run."""
    return LRSchedule.from_flags(cfg, replace(TrainConfig(), train_iters=train_iters)).lr(iteration, 0, 1)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_learning_rate_follows_megatrons_formula(style):
    """The update at 0-based iteration i takes Megatron's LR after i steps of decay; warm-up counts the
    update itself (so the first update's LR is not 0): lr * (i + 1) / warmup. Checked at the warm-up's
    last step, the first decayed step, mid-decay, the decay's end and after it."""
    cfg = replace(OptimConfig(), lr=3e-3, min_lr=3e-4, lr_warmup_iters=10, lr_decay_iters=90,
                  lr_decay_style=style)
    warmup, decay = 10, 90
    for i in (0, 4, warmup - 1):
        assert learning_rate(i, cfg, 100) == pytest.approx(megatron_lr(i + 1, 3e-3, 3e-4, warmup, decay, style))
    assert learning_rate(warmup - 1, cfg, 100) == pytest.approx(3e-3)
    for i in (warmup, 30, 50, 77, decay, 99):
        assert learning_rate(i, cfg, 100) == pytest.approx(megatron_lr(i, 3e-3, 3e-4, warmup, decay, style)), i
    if style != "constant":
        assert learning_rate(50, cfg, 100) == pytest.approx(3e-4 + 0.5 * (3e-3 - 3e-4))  # half-way, both shapes
        assert learning_rate(decay, cfg, 100) == pytest.approx(3e-4)
    # A decay of one step: the step after the warm-up is already at min_lr.
    short = replace(cfg, lr_warmup_iters=9, lr_decay_iters=10)
    assert learning_rate(10, short, 100) == pytest.approx(megatron_lr(10, 3e-3, 3e-4, 9, 10, style))
    # --lr-decay-iters left out: the decay spans --train-iters.
    default = replace(cfg, lr_decay_iters=None)
    assert learning_rate(60, default, 110) == pytest.approx(megatron_lr(60, 3e-3, 3e-4, warmup, 110, style))


# --- FP8 limits ----------------------------------------------------------------------------------

def test_e4m3_scales_put_each_blocks_maximum_on_torchs_e4m3_maximum():
    e4m3_max = torch.finfo(torch.float8_e4m3fn).max
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    x[1, 130] = -37.0  # the largest magnitude of row 1's second tile
    x[2] *= 1e-3  # tiles of small values (amax < 1) get their own small scale too
    q = quantize_tiles(x)
    amax = x.abs().view(3, 2, 128).amax(-1)
    torch.testing.assert_close(q.scale, amax / e4m3_max, rtol=0, atol=0)
    assert q.data.float().abs().view(3, 2, 128).amax(-1).eq(e4m3_max).all()
    assert q.data[1, 130].float() == -e4m3_max
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    qw = quantize_blocks(w)
    torch.testing.assert_close(qw.scale, w.abs().view(2, 128, 1, 128).amax(dim=(1, 3)) / e4m3_max, rtol=0, atol=0)
    # Everything but the maximum of a block rounds to E4M3's 3-bit mantissa: relative error <= 2^-4.
    err = (qw.dequantize() - w).abs() / w.abs().clamp_min(qw.scale.max() * torch.finfo(torch.float8_e4m3fn).tiny)
    assert err[w.abs() > qw.scale.max() * 2 ** -6].max() <= 2 ** -4


def test_power_of_two_scales_are_the_least_power_of_two_not_below_amax_over_the_e4m3_maximum():
    """--fp8-pow2-scales's definition, exact powers of two included (amax / 448 = 2^-3 stays 2^-3)."""
    e4m3_max = torch.finfo(torch.float8_e4m3fn).max
    amax = torch.tensor([e4m3_max / 8, e4m3_max * 0.3, e4m3_max, 100.0, e4m3_max * 2 ** 20])
    x = torch.zeros(5, 128)
    x[:, 7] = -amax
    q = quantize_tiles(x, pow2_scales=True)
    want = [2.0 ** math.ceil(math.log2(a / e4m3_max)) for a in amax.tolist()]
    assert q.scale.flatten().tolist() == want
    exact = [0, 2, 4]  # amax a power of two times 448: stored as -448 exactly
    assert (q.data[exact, 7].float() * q.scale.flatten()[exact]).tolist() == (-amax[exact]).tolist()


# --- the sampler ---------------------------------------------------------------------------------

def megatron_steps(total, consumed, mbs, dp_rank, dp):
    """MegatronPretrainingSampler: consecutive global steps of mbs * dp samples from `consumed` on,
    rank r taking the r-th slice of each; a trailing partial step is dropped."""
    steps, batch = [], []
    for idx in range(consumed, total):
        batch.append(idx)
        if len(batch) == mbs * dp:
            steps.append(batch[dp_rank * mbs:(dp_rank + 1) * mbs])
            batch = []
    return steps


@pytest.mark.parametrize("total,consumed", [(24, 0), (24, 12), (24, 18), (25, 0), (29, 6), (30, 24), (24, 24),
                                            (23, 0)],
                         ids=["exact", "resume-exact", "resume-last-step", "remainder-1", "resume-remainder",
                              "last-step-only", "at-the-end", "short-by-1"])
def test_sampler_at_multiples_remainders_and_resume_points(total, consumed):
    mbs, dp = 2, 3
    for rank in range(dp):
        sampler = PretrainingSampler(total, consumed, mbs, rank, dp)
        steps = list(sampler)
        assert steps == megatron_steps(total, consumed, mbs, rank, dp)
        assert len(steps) == len(sampler) == (total - consumed) // (mbs * dp)
    # A run resumed after k steps sees exactly the rest of the uninterrupted run's steps.
    whole = list(PretrainingSampler(total, 0, mbs, 1, dp))
    done = (consumed // (mbs * dp))
    assert list(PretrainingSampler(total, done * mbs * dp, mbs, 1, dp)) == whole[done:]


# --- dropout masks -------------------------------------------------------------------------------

def dropout_masks(extra_flags, samples):
    """Every dropout module of the built model, each applied to ones: {module name: kept-mask}."""
    config = parse_args(TINY_MOE + ["--num-layers", "3", "--attention-dropout", "0.5", "--hidden-dropout", "0.5",
                                    "--mtp-num-layers", "1", *extra_flags]).model
    (chunk,) = build_full_model(config, seed=1).train().chunks
    masks = {}
    for name, module in chunk.named_modules():
        if isinstance(module, AttentionDropout):
            masks[name] = module(torch.ones(2, 4, 8, 8), samples, head_offset=0) != 0
        elif isinstance(module, HiddenDropout):
            masks[name] = module(torch.ones(8, 2, 16), samples) != 0
    return masks


@pytest.mark.parametrize("extra_flags", [[], ["--multi-latent-attention", "--kv-lora-rank", "16",
                                               "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8",
                                               "--v-head-dim", "8"]], ids=["GQA", "MLA"])
def test_every_dropout_site_and_layer_and_micro_batch_draws_its_own_mask(extra_flags):
    first, second = dropout_masks(extra_flags, torch.tensor([0, 1])), dropout_masks(extra_flags, torch.tensor([2, 3]))
    attention = [n for n in first if first[n].dim() == 4]
    hidden = [n for n in first if first[n].dim() == 3]
    assert len(attention) == 4 and len(hidden) == 1 + 2 * 4 + 1  # 3 layers + MTP's; the embedding's, 2 per layer, MTP's embedding's
    for names in (attention, hidden):
        for i, a in enumerate(names):
            assert not torch.equal(first[a][:, :1], first[a][:, 1:]) if first[a].dim() == 3 else \
                not torch.equal(first[a][0], first[a][1])  # two samples of one micro-batch
            assert not torch.equal(first[a], second[a]), a  # the next micro-batch
            for b in names[i + 1:]:
                assert not torch.equal(first[a], first[b]), (a, b)  # another layer or site


# --- decayed and undecayed parameters ------------------------------------------------------------

def decay_by_definition(name: str) -> bool:
    """Megatron's rule: weight decay on weight matrices (embedding, projections, router, experts);
    none on normalization weights or biases."""
    return "norm" not in name.rsplit(".", 2)[-2] and not name.endswith(".bias")


@pytest.mark.parametrize("distributed", [False, True], ids=["adamw", "distributed-optimizer"])
def test_weight_decay_on_matrices_only(distributed):
    """Zero gradients and one step: AdamW's update is then the decay alone, p * (1 - lr * wd)."""
    config = parse_args(TINY_MOE + ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16",
                                    "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8",
                                    "--mtp-num-layers", "1", "--weight-decay", "0.25"])
    with single_process_group():
        model = build_full_model(config.model, seed=1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        if distributed:
            optimizer = DistributedOptimizer(model.param_table, Topology(Layout(1), 0), config.optim)
            optimizer.zero_grad()
            optimizer.reduce_gradients()
        else:
            optimizer = build_optimizer(list(model.named_parameters()), config.optim)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        set_learning_rate(optimizer, 0.5)
        optimizer.step()
    kinds = {True: 0, False: 0}
    for name, p in model.named_parameters():
        decay = decay_by_definition(name)
        kinds[decay] += 1
        want = before[name] * (1 - 0.5 * 0.25) if decay else before[name]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=name)
    assert kinds[True] and kinds[False] >= 3 * 2 + 3  # every layer's two norms, MLA's q/kv norms, MTP's norms
