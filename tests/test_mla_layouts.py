"""Multi-head latent attention, with and without query compression, gives the one-process run
under TP2 x EP2 (x DP2) with and without sequence parallelism, PP2 DualPipe x EP2 (x DP2) and
PP4 DualPipeV, the W split on: the losses of several steps, the gradient norm of each, and every
parameter's first-step gradient.
"""
import pytest

from tests.helpers import TINY_MOE
from tests.multiproc import spawn_runs

MLA = ["--multi-latent-attention", "--kv-lora-rank", "16", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
       "--v-head-dim", "12"]
ARGS = TINY_MOE + MLA + ["--num-layers", "8", "--hidden-size", "32", "--seq-length", "16", "--micro-batch-size", "1",
                         "--train-iters", "2", "--moe-router-bias-update-rate", "1e-2"]
VARIANTS = {  # V3's shape (query latent, YaRN with a softmax mscale) and V2-Lite's (queries from h)
    "q-lora": ARGS + ["--q-lora-rank", "24", "--rope-scaling-factor", "4", "--original-max-position-embeddings",
                      "16", "--mscale-all-dim", "1"],
    "no-q-lora": ARGS,
}
TP2_EP2 = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"]
LAYOUTS = {
    "TP2-SPxEP2xDP2": TP2_EP2 + ["--sequence-parallel"],
    "TP2xEP2xDP2": TP2_EP2,  # without sequence parallelism the replicated weights' gradients are whole
    "PP2-dualpipexEP2xDP2": ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipe",
                             "--expert-model-parallel-size", "2"],
    "PP4-dualpipev": ["--pipeline-model-parallel-size", "4", "--pipeline-schedule", "dualpipev"],
}
# Relative errors measured over the 8 cases (CPU, FP32): losses 3.8e-8, grad norms 5.1e-8, first-step
# gradients 5.8e-7 (a TP-replicated norm weight); PP4 DualPipeV is exact. Tolerances about 8-10x that.
LOSS_RTOL, NORM_RTOL, GRAD_RTOL = 3e-7, 5e-7, 5e-6


@pytest.fixture(scope="module")
def reference():
    return dict(zip(VARIANTS, spawn_runs(1, list(VARIANTS.values()))))


@pytest.fixture(scope="module")
def world4():
    cases = [(variant, layout) for variant in VARIANTS for layout in LAYOUTS]
    return dict(zip(cases, spawn_runs(4, [VARIANTS[v] + LAYOUTS[layout] for v, layout in cases])))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_mla_layout_matches_one_process(world4, reference, variant, layout):
    run, ref = world4[variant, layout], reference[variant]
    assert run.losses == pytest.approx(ref.losses, rel=LOSS_RTOL)
    assert run.grad_norms == pytest.approx(ref.grad_norms, rel=NORM_RTOL)
    assert run.grads.keys() == ref.grads.keys()
    errors = {name: float((run.grads[name] - grad).norm() / grad.norm().clamp_min(1e-12))
              for name, grad in ref.grads.items()}
    name, error = max(errors.items(), key=lambda item: item[1])
    assert error < GRAD_RTOL, f"{name}: relative gradient error {error:.2e}"
    print(f"{variant} {layout}: loss error {max(abs(a - b) / b for a, b in zip(run.losses, ref.losses)):.1e}, "
          f"gradient {error:.1e} ({name}), norm {max(abs(a - b) / b for a, b in zip(run.grad_norms, ref.grad_norms)):.1e}")
