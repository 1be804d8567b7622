"""The distributed optimizer (--use-distributed-optimizer) takes the plain optimizer's steps.

Each layout trains 2 steps with the plain and with the distributed optimizer (through the layout
checker's launcher, megadual/verify.py) and saves at the end; clipping is on and acts every step.
The distributed run is compared with the plain one on every logged value and grad norm, every
first-step gradient (gathered whole from the shards) and every final parameter and buffer, every
copy of a piece across ranks (DP replicas, DualPipe's mirrored copies) must be equal, and the two
checkpoints must hold the same weights and optimizer state; plain layouts' losses are compared
with one process too. One layout runs MLA, one FP8. A checkpoint written with the distributed
optimizer at DP4 resumes at DP2 and on one process without it, and one written by one process
without it resumes with it at DP4, each continuing with the losses of a run that never stopped.
With BF16 weights, DualPipe, 1F1B and one process agree; the multi-rank saves are verified file by
file (every rank's shards in the manifest, a flipped byte in any of them named).
"""
import json
import math
import re

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megadual import verify
from megadual.arguments import parse_args
from megadual.config import ConfigError
from megadual.parallel.topology import Layout, Topology
from megadual.pipeline.stage_model import build_full_model
from megadual.training.buckets import shard_pieces
from megadual.training.capture import Capture, capture_run, relative_difference
from megadual.training.checkpoint.coordination import Coordination
from megadual.training.checkpoint.integrity import file_checksum
from megadual.training.checkpoint.integrity import verify as verify_checkpoint
from megadual.training.checkpoint.layout import MANIFEST
from megadual.training.dist_optimizer import DistributedOptimizer, optimizer_state_bytes
from megadual.training.step import train_step
from tests.helpers import TINY_MOE, single_process_group
from tests.test_mla_layouts import MLA

# A dense and an MoE layer; 8 micro-batches of one sample; gradient norms are near 1, so every step
# clips. Runs stop (and save) after 2 of 4 steps.
ARGS = TINY_MOE + ["--num-layers", "2", "--micro-batch-size", "1", "--train-iters", "4", "--exit-interval", "2",
                   "--moe-router-bias-update-rate", "1e-2", "--clip-grad", "0.5"]
DIST = ["--use-distributed-optimizer", "--ddp-bucket-size", "5000"]  # several buckets even in the tiny model
LAYOUTS = {"DP2": ("dp2", []),
           "DP4xEP2": ("ep2,dp4", []),  # dense weights sharded over 4 ranks, experts over their expert-DP group of 2
           "TP2xDP2-SP-MLA": ("tp2,sp,dp2", MLA + ["--q-lora-rank", "24"]),  # latents' gradients summed over TP
           "PP2xDP2xEP2-dualpipe-FP8": ("pp2:dualpipe,ep2,dp2", ["--fp8-format", "e4m3", "--moe-fp8-dispatch"])}
# Against the plain optimizer. Sums over 2 ranks are exact in any order; over 4 the reduce-scatter
# adds in another order than the all-reduce (DP4 x EP2; TP2 x DP2, whose experts' expert-DP group
# has 4 ranks). Measured there (clipping on): logged values 1.9e-8, grad norms 4.5e-9, first-step
# gradients 5.5e-8, final weights 2.8e-7 and checkpointed optimizer state 3.9e-7; the tolerances
# are about 10x that.
REORDERED = verify.Tolerance("reordered", logged=2e-7, grad_norm=4e-8, grads=6e-7, final=3e-6)
PLAIN_TOLERANCE = {name: REORDERED if name in ("DP4xEP2", "TP2xDP2-SP-MLA") else verify.TOLERANCES["exact"]
                   for name in LAYOUTS}
BF16 = ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "1f1b", "--bf16", "--fp8-format", "e4m3"]
BF16_DUALPIPE = [*BF16[:3], "dualpipe", *BF16[4:]]


def spec(name: str) -> verify.LayoutSpec:
    layout, extra = LAYOUTS[name]
    return verify.parse_layout(layout, ARGS + extra)


def flags(name: str) -> list[str]:
    return ARGS + LAYOUTS[name][1] + spec(name).flags


def saved(tmp, name: str) -> list[str]:
    return ["--save", str(tmp / name)]


def loaded(tmp, name: str) -> list[str]:
    return ["--load", str(tmp / name)]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("dist_optimizer")


def one_process(runs: dict[str, list[str]]) -> dict[str, Capture]:
    """Each run in this process (a launch costs more than these small runs), on one thread as
    the launched runs are."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with single_process_group() as device:
            return {key: capture_run(parse_args(args), device) for key, args in runs.items()}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp):
    """Every layout with each optimizer; what resumes from their checkpoints (each launch after
    the one writing what it loads), one process, and BF16 weights."""
    layouts = {(kind, name): (spec(name).world, flags(name) + extra + saved(tmp, f"{kind}-{name}"))
               for name in LAYOUTS for kind, extra in (("plain", []), ("dist", DIST))}
    of_world = lambda world: {key: run for key, run in layouts.items() if run[0] == world}
    captures = one_process({"plain DP1": ARGS + saved(tmp, "plain-DP1")})
    captures.update(verify.launch_all({**of_world(4), "bf16": (4, ARGS + DIST + BF16),
                                       "bf16 dualpipe": (4, ARGS + DIST + BF16_DUALPIPE),
                                       "plain DP1 -> dist DP4xEP2": (4, flags("DP4xEP2") + DIST + loaded(tmp, "plain-DP1"))}))
    captures.update(verify.launch_all({**of_world(2), "dist DP4 -> dist DP2": (2, ARGS + DIST + loaded(tmp, "dist-DP4xEP2"))}))
    captures.update(one_process({"uninterrupted": ARGS + ["--exit-interval", "0"],
                                 "bf16 one process": ARGS + DIST + BF16[4:],
                                 "dist DP4 -> plain DP1": ARGS + loaded(tmp, "dist-DP4xEP2")}))
    return captures


def checkpoint(tmp, name: str) -> dict:
    """The final checkpoint of run `name`, read whole in this process."""
    whole = tmp / f"{name}.pt"
    dcp_to_torch_save(tmp / name / "iter_0000002", whole)
    return torch.load(whole, weights_only=False)


@pytest.mark.parametrize("name", LAYOUTS)
def test_distributed_optimizer_takes_the_plain_steps(tmp, runs, name):
    plain, sharded = runs[("plain", name)], runs[("dist", name)]
    assert all(norm > 0.5 for norm in plain.grad_norms)  # clipped
    report = verify.compare(sharded, plain, PLAIN_TOLERANCE[name])
    print(report.format(f"{name}: distributed against plain optimizer"))
    assert report.passed
    ckpt_plain, ckpt_dist = checkpoint(tmp, f"plain-{name}"), checkpoint(tmp, f"dist-{name}")
    for part in ("model", "optimizer"):
        assert ckpt_dist[part].keys() == ckpt_plain[part].keys()
        state = {k: relative_difference(ckpt_dist[part][k], v) for k, v in ckpt_plain[part].items() if torch.is_tensor(v)}
        print(f"  checkpoint {part}: max {max(state.values()):.1e}")
        assert max(state.values()) <= PLAIN_TOLERANCE[name].final
    if not LAYOUTS[name][1]:
        one_process = runs["uninterrupted"].logged["lm loss"][:2]
        assert sharded.logged["lm loss"] == pytest.approx(one_process, rel=spec(name).tolerance.logged, abs=0)


@pytest.mark.parametrize("name", ["DP2", "PP2xDP2xEP2-dualpipe-FP8"])
@pytest.mark.parametrize("kind", ["plain", "dist"])
def test_every_ranks_shards_are_in_the_manifest_and_a_flip_in_any_is_named(tmp, runs, kind, name):
    """The multi-rank saves above, file by file: the manifest lists every file of the folder with its
    own size and CRC-32, every rank wrote a DCP shard, and a byte flipped in any rank's shard is named
    by the verification --load runs."""
    folder, world = tmp / f"{kind}-{name}" / "iter_0000002", spec(name).world
    manifest = json.loads((folder / MANIFEST).read_text())["files"]
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    assert sorted(manifest) == on_disk
    assert {int(m[1]) for n in on_disk if (m := re.match(r"__(\d+)_", n))} == set(range(world))
    for n in on_disk:
        assert {k: manifest[n][k] for k in ("size", "crc32")} == file_checksum(str(folder / n)), n
    with single_process_group():
        coord = Coordination()
        assert verify_checkpoint(str(folder), coord) is None
        for rank in range(world):
            shard = next(folder.glob(f"__{rank}_*.distcp"))
            original = shard.read_bytes()
            middle = len(original) // 2
            shard.write_bytes(original[:middle] + bytes([original[middle] ^ 0x40]) + original[middle + 1:])
            try:
                assert verify_checkpoint(str(folder), coord).startswith(f"{shard.name} is corrupt (CRC-32 "), rank
            finally:
                shard.write_bytes(original)


def test_checkpoints_resume_across_layouts_and_optimizers(runs):
    """Saved with the distributed optimizer at DP4 x EP2: resumed by it at DP2 and by the plain one on one
    process; saved by the plain one on one process: resumed by the distributed one at DP4 x EP2."""
    rest = runs["uninterrupted"].logged["lm loss"][2:]
    limit = spec("DP4xEP2").tolerance.logged
    for key in ("dist DP4 -> dist DP2", "dist DP4 -> plain DP1", "plain DP1 -> dist DP4xEP2"):
        losses = runs[key].logged["lm loss"]
        print(f"{key}: {max(relative_difference(a, b) for a, b in zip(losses, rest)):.1e}")
        assert losses == pytest.approx(rest, rel=limit, abs=0)


def test_optimizer_state_falls_as_one_over_dp(runs):
    """FP32 weights (their masters are the weights themselves): each rank holds Adam's moments, 8 bytes
    per element, over DP, up to each bucket's padding to a multiple of DP and its step count (DP4 x EP2:
    each rank holds half of the experts, sharded over 2 ranks). BF16 weights at PP2 x DP2: FP32 masters
    too, and the four ranks together hold what one process would."""
    config = parse_args(ARGS + DIST)
    state_bytes = {}
    for dtype in (torch.float32, torch.bfloat16):
        optimizer = DistributedOptimizer(build_full_model(config.model, seed=1).param_table, Topology(Layout(1), 0),
                                         config.optim, dtype, config.optim.ddp_bucket_size)
        state_bytes[dtype] = optimizer_state_bytes(optimizer)
    one, padding = state_bytes[torch.float32], 12 * len(optimizer.buckets)
    for name, dp in (("DP2", 2), ("DP4xEP2", 4)):
        for size in runs[("dist", name)].optimizer_state_bytes:
            assert one <= size * dp <= one + padding * dp, (name, size)
    assert state_bytes[torch.bfloat16] == pytest.approx(one * 1.5, rel=1e-3)
    assert sum(runs["bf16"].optimizer_state_bytes) == pytest.approx(state_bytes[torch.bfloat16], rel=1e-3)
    plain = runs[("plain", "DP2")].optimizer_state_bytes[0]
    assert one < plain < one * 1.01  # the same moments; a step count per parameter instead of per bucket


def test_bf16_weights_with_fp32_masters_track_fp32(runs):
    """1F1B x DP2 with BF16 weights (BF16 activations between the stages, deferred W gradients into the
    FP32 buckets) and FP8 GEMMs: the losses stay near FP32's (measured: 7e-5 relative)."""
    losses, fp32 = runs["bf16"].logged["lm loss"], runs["uninterrupted"].logged["lm loss"][:2]
    print(f"bf16: {max(relative_difference(a, b) for a, b in zip(losses, fp32)):.1e}")
    assert losses == pytest.approx(fp32, rel=7e-4)


def test_shards_cover_every_element_once():
    numels = [5, 1, 17, 3, 64, 2]
    for group_size in (1, 2, 3, 4, 7):
        held = [[0] * n for n in numels]
        for rank in range(group_size):
            for piece in shard_pieces(numels, group_size, rank):
                for i in range(piece.end - piece.start):
                    held[piece.index][piece.param_start + i] += 1
        assert all(count == 1 for counts in held for count in counts), group_size


def tiny_dist_optimizer(dtype: torch.dtype):
    config = parse_args(TINY_MOE)
    model = build_full_model(config.model, seed=1)
    initial = {r.name: r.param.detach().clone() for r in model.param_table}  # experts: rows of the stacks
    topo = Topology(Layout(1), 0)
    return config, model, topo, initial, DistributedOptimizer(model.param_table, topo, config.optim, dtype, 5000)


def train(model, optimizer, topo, device):
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    return train_step(model, optimizer, [{"tokens": tokens, "labels": tokens}], topo, 1e-3, 1.0, 1e-2, device,
                      bf16=True)


def test_bf16_layouts_agree_with_one_process_and_dualpipe_with_1f1b(runs):
    """BF16 weights (FP32 masters) and BF16 autocast as on a GPU, FP8 GEMMs: PP2 x DP2 under DualPipe,
    under 1F1B and one process. Measured (CPU, `pytest -s` prints them): DualPipe against 1F1B and
    against one process 3.8e-8 on the losses, 3e-14 and 2.3e-13 on the grad norms; 1F1B against one
    process 0 and 2.3e-13. The limits are about 10x that: a paired F&B forward without autocast
    moves the losses by ~2e-6 (issue 23), BF16 rounding of a weight by up to 2^-9."""
    dualpipe, onef1b, one = runs["bf16 dualpipe"], runs["bf16"], runs["bf16 one process"]
    for name, (a, b) in (("dualpipe vs 1f1b", (dualpipe, onef1b)), ("dualpipe vs one process", (dualpipe, one)),
                         ("1f1b vs one process", (onef1b, one))):
        losses = max(relative_difference(x, y) for x, y in zip(a.logged["lm loss"], b.logged["lm loss"]))
        norms = max(relative_difference(x, y) for x, y in zip(a.grad_norms, b.grad_norms))
        print(f"{name}: losses {losses:.1e}, grad norms {norms:.1e}")
        assert losses <= 4e-7 and norms <= 3e-12, name


def test_bf16_model_holds_bf16_weights_and_steps_fp32_masters():
    with single_process_group() as device:
        _, model, topo, initial, optimizer = tiny_dist_optimizer(torch.bfloat16)
        weights, _ = optimizer.state_dict_for_checkpoint()
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert all(torch.equal(weights[n], w) for n, w in initial.items())  # masters: the FP32 initial weights
        result = train(model, optimizer, topo, device)
        weights, _ = optimizer.state_dict_for_checkpoint()
    assert not result.skipped
    for name, param in ((r.name, r.param) for r in model.param_table):
        assert weights[name].dtype == torch.float32 and not torch.equal(weights[name], initial[name])
        assert torch.equal(param, weights[name].to(torch.bfloat16)), name


def test_skipped_step_updates_nothing_masters_included():
    with single_process_group() as device:
        _, model, topo, _, optimizer = tiny_dist_optimizer(torch.bfloat16)
        train(model, optimizer, topo, device)
        before = optimizer.state_dict_for_checkpoint()
        with torch.no_grad():
            model.layers["0"].attention.q.weight[0, 0] = float("nan")
        result = train(model, optimizer, topo, device)
        after = optimizer.state_dict_for_checkpoint()
    assert result.skipped and math.isnan(result.lm_loss)
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        assert all(torch.equal(a[k], v) for k, v in b.items() if torch.is_tensor(v))


PRECISION_AWARE = ["--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16"]


def test_precision_aware_optimizer_needs_the_distributed_one():
    with pytest.raises(ConfigError, match="--use-precision-aware-optimizer needs --use-distributed-optimizer"):
        parse_args(TINY_MOE + PRECISION_AWARE)
    with pytest.raises(ConfigError, match="--exp-avg-dtype"):
        parse_args(TINY_MOE + ["--use-distributed-optimizer", "--exp-avg-dtype", "bf16"])


def test_bf16_moments_step_as_adam_with_rounded_moments():
    """Two steps on given gradients against AdamW written out in float64, its moments rounded to
    BF16 after each step (what the optimizer stores) and the update computed from the unrounded
    ones; FP32 moments land elsewhere, so the rounding is what is checked."""
    config = parse_args(TINY_MOE + ["--use-distributed-optimizer", "--weight-decay", "0"] + PRECISION_AWARE)
    o, lr = config.optim, 1e-2
    model = build_full_model(config.model, seed=1)
    param = model.layers["0"].attention.q.weight
    start = param.detach().double().clone()
    optimizer = DistributedOptimizer(model.param_table, Topology(Layout(1), 0), o, torch.float32, 5000)
    optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = lr
    grads = [torch.randn(param.shape, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    master, m, v = start.clone(), torch.zeros_like(start), torch.zeros_like(start)
    for step, grad in enumerate(grads, 1):
        for p in model.parameters():
            optimizer.accumulate_grad(p, torch.zeros_like(p))
        optimizer.accumulate_grad(param, grad)
        optimizer.step()
        optimizer.zero_grad()
        g = grad.double()
        m = o.adam_beta1 * m + (1 - o.adam_beta1) * g
        v = o.adam_beta2 * v + (1 - o.adam_beta2) * g * g
        master -= lr * (m / (1 - o.adam_beta1 ** step)) / ((v / (1 - o.adam_beta2 ** step)).sqrt() + o.adam_eps)
        m, v = m.to(torch.bfloat16).double(), v.to(torch.bfloat16).double()
    state = optimizer.state_dict_for_checkpoint()[1]
    name = next(r.name for r in model.param_table if r.param is param)
    for key, reference in (("exp_avg", m), ("exp_avg_sq", v)):
        stored = state[f"state.{name}.{key}"]
        assert stored.dtype == torch.bfloat16
        assert (stored.double() - reference).abs().max() <= 2 ** -7 * reference.abs().max()  # one BF16 ulp
    assert relative_difference(param.detach().double(), master) < 1e-6


def test_bf16_moments_resume_exactly(tmp):
    """Saved after 2 of 4 steps with BF16 moments (the checkpoint holds them in BF16), resumed:
    the last 2 steps equal those of a run that never stopped, bit for bit."""
    args = ARGS + DIST + PRECISION_AWARE
    runs = one_process({"stopped": args + saved(tmp, "bf16-moments"), "uninterrupted": args + ["--exit-interval", "0"]})
    runs.update(one_process({"resumed": args + ["--exit-interval", "0"] + loaded(tmp, "bf16-moments")}))
    optimizer = checkpoint(tmp, "bf16-moments")["optimizer"]
    moments = [v for k, v in optimizer.items() if k.endswith((".exp_avg", ".exp_avg_sq"))]
    assert moments and all(t.dtype == torch.bfloat16 for t in moments)
    assert runs["resumed"].logged["lm loss"] == runs["uninterrupted"].logged["lm loss"][2:]
    assert runs["resumed"].grad_norms == runs["uninterrupted"].grad_norms[2:]
    assert runs["stopped"].logged["lm loss"] == runs["uninterrupted"].logged["lm loss"][:2]
    final = runs["uninterrupted"].final
    assert final.keys() == runs["resumed"].final.keys()
    assert all(torch.equal(runs["resumed"].final[k], v) for k, v in final.items())
