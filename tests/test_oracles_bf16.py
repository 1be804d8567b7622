"""BF16 as the GPU runs it, on one rank: DualPipeV with PP=1 (whose paired F&B actions run on the
one rank) under BF16 autocast, with and without recomputation. Every GEMM of the step - the F
actions', the paired F&B chunks' forward and backward, and the recomputed regions' - runs in
BF16 (a dispatch mode records each matmul's operand dtypes); only the router's gate is FP32 by
design. With attention dropout, so the core attention is the explicit matmuls (CPU autocast leaves
SDPA, which CUDA's autocasts, in FP32). Recomputation repeats the BF16 forward bit for bit, so its losses and gradients equal the
run without it exactly."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megadual.arguments import parse_args
from megadual.parallel.context import BuildContext
from megadual.parallel.recompute import RecomputePlan, _Region
from megadual.pipeline.actions import Kind
from megadual.pipeline.runtime import PipelineRuntime
from megadual.pipeline.schedules import build_schedule, pipeline_layout
from megadual.pipeline.stage_model import build_stage_model
from tests.helpers import TINY_MOE

GEMMS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_attention_math", "_scaled_mm", "_grouped_mm"}
PLANS = {"no-recompute": RecomputePlan(),
         "full": RecomputePlan("full", "uniform", 1),
         "selective": RecomputePlan("selective", modules=frozenset({"core_attn", "layernorm", "mlp", "moe",
                                                                    "mla_up_proj"}))}


class GemmDtypes(TorchDispatchMode):
    """(op, operand dtypes, shapes) of every GEMM run while active, forward and backward."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in GEMMS:
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            self.seen.append((name, {t.dtype for t in tensors}, [tuple(t.shape) for t in tensors]))
        return func(*args, **(kwargs or {}))


def config():
    return parse_args(TINY_MOE + ["--num-layers", "2", "--multi-latent-attention", "--q-lora-rank", "16",
                                  "--kv-lora-rank", "16", "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8",
                                  "--v-head-dim", "8", "--num-experts", "6", "--attention-dropout", "0.1"]).model


def batches(count):
    g = torch.Generator().manual_seed(0)
    return [{"tokens": torch.randint(0, 512, (2, 32), generator=g), "labels": torch.randint(0, 512, (2, 32), generator=g),
             "sample_ids": torch.arange(2 * i, 2 * i + 2)} for i in range(count)]


def run_bf16(plan, record: bool = True):
    """DualPipeV PP=1 over 2 micro-batches under BF16 autocast: losses, gradients, and (`record`) the
    GEMMs of each action as (action kind, op, dtypes, shapes)."""
    c = config()
    layout = pipeline_layout("dualpipev", 1, 2)
    model = build_stage_model(c, layout, 0, seed=7, ctx=BuildContext(recompute=plan))
    model.set_aux_loss_grad_scale(0.5)
    actions = build_schedule("dualpipev", 1, 2)[0]
    assert any(a.kind == Kind.FB for a in actions)
    runtime = PipelineRuntime(actions, layout, model.chunks, 0, [0], activation_shape=(32, 2, 64),
                              autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    seen, compute = [], runtime._compute

    def recorded(action):
        with GemmDtypes() as recorder:
            compute(action)
        seen.extend((action.kind, *gemm) for gemm in recorder.seen)

    if record:
        runtime._compute = recorded
    losses = runtime.run(batches(2))
    return losses, {n: p.grad for n, p in model.named_parameters()}, seen, c


def not_bf16(seen, c):
    """The GEMMs that ran in another dtype than BF16, but for the router's gate: FP32 on purpose, its
    forward and both gradients a 2-D mm with a dim of num_experts (6, which no other GEMM of this
    model has but an expert's with exactly 6 tokens, and those are BF16)."""
    return [s for s in seen if s[1] != {torch.bfloat16}
            and not (s[0] == "mm" and s[1] == {torch.float32} and any(c.num_experts in shape for shape in s[2]))]


def test_every_gemm_of_paired_chunks_and_recomputed_regions_runs_in_bf16(monkeypatch):
    """The plain run is the reference (its GEMMs are among those of the recomputing runs)."""
    want_losses, want_grads, _, c = run_bf16(PLANS["no-recompute"], record=False)
    regions = []
    recompute = _Region._recompute
    monkeypatch.setattr(_Region, "_recompute", lambda self: regions.append(self) or recompute(self))
    for plan in ("full", "selective"):
        regions.clear()
        losses, grads, seen, _ = run_bf16(PLANS[plan])
        assert len(seen) > 100 and not_bf16([s[1:] for s in seen], c) == [], plan
        assert sum(s[0] == Kind.FB for s in seen) >= 40, plan  # the paired F&B chunks' GEMMs are among them
        assert len(regions) >= 4, plan  # and so are the recomputed regions'
        assert all(torch.equal(losses[k], want_losses[k]) for k in want_losses), plan
        assert all(torch.equal(grads[k], want_grads[k]) for k in want_grads), plan
