"""Data, tensor (plus sequence) and expert parallelism across real processes give the one-process run.

Each layout is compared with one process on the losses of several optimizer steps
and on every parameter's gradient at the first step (gathered by global name).
"""
import re

import pytest
import torch

from tests.helpers import TINY_MOE
from tests.multiproc import spawn_pretrain, spawn_run

ARGS = TINY_MOE + ["--train-iters", "4", "--moe-router-bias-update-rate", "1e-2"]
# Experts on 2 nodes, each token allowed on 1: one process stands the nodes in with virtual nodes.
ONE_NODE_PER_TOKEN = ["--moe-router-max-nodes", "1"]
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5

LAYOUTS = {
    "DP2": (2, []),
    "TP2": (2, ["--tensor-model-parallel-size", "2"]),
    "TP2-SP": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "EP2": (2, ["--expert-model-parallel-size", "2"]),
    "TP2xEP2xDP2": (4, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                        "--sequence-parallel"]),
}


@pytest.fixture(scope="module")
def single():
    return spawn_run(1, ARGS)


def assert_same_run(run, reference):
    """Prints the largest relative errors it saw (`pytest -s` shows them)."""
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(run.losses, reference.losses))
    assert len(run.losses) == len(reference.losses) and loss_error < LOSS_RTOL, (run.losses, reference.losses)
    assert run.grads.keys() == reference.grads.keys()
    grad_errors = {name: float((run.grads[name] - grad).norm() / grad.norm().clamp_min(1e-12))
                   for name, grad in reference.grads.items()}
    name, grad_error = max(grad_errors.items(), key=lambda item: item[1])
    assert grad_error < GRAD_RTOL, f"{name}: relative gradient error {grad_error:.2e}"
    print(f"max relative error: loss {loss_error:.1e}, gradient {grad_error:.1e} ({name})")


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_layout_matches_one_process(single, layout):
    world, extra = LAYOUTS[layout]
    assert_same_run(spawn_run(world, ARGS + extra), single)


def nodes_per_token_max(log: list[str]) -> list[int]:
    return [int(m) for m in re.findall(r"moe nodes per token: mean [\d.]+ max (\d+)", "\n".join(log))]


def test_ep4_on_two_nodes_sends_no_token_to_two_nodes():
    logged = ["--log-interval", "1"]
    reference = spawn_run(1, ARGS + ONE_NODE_PER_TOKEN + logged + ["--moe-router-num-groups", "2"])
    run = spawn_run(4, ARGS + ONE_NODE_PER_TOKEN + logged + ["--expert-model-parallel-size", "4",
                                                               "--moe-ranks-per-node", "2"])
    assert_same_run(run, reference)
    assert nodes_per_token_max(run.log) == [1] * 4


def test_node_limit_is_what_keeps_tokens_on_one_node():
    run = spawn_run(4, ARGS + ["--log-interval", "1", "--expert-model-parallel-size", "4",
                               "--moe-ranks-per-node", "2", "--moe-router-max-nodes", "2"])
    assert max(nodes_per_token_max(run.log)) == 2


def test_fp8_dispatch_sends_quantized_tokens_and_tracks_bf16():
    base = ARGS + ["--expert-model-parallel-size", "2", "--fp8-format", "e4m3"]
    plain = spawn_pretrain(2, base)
    fp8_dispatch = spawn_pretrain(2, base + ["--moe-fp8-dispatch"])
    assert fp8_dispatch != plain  # the dispatched tokens really were quantized
    assert fp8_dispatch == pytest.approx(plain, rel=5e-3)
    assert torch.isfinite(torch.tensor(fp8_dispatch)).all()
