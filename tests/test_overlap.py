"""The paired F&B chunk: a forward interleaved with another micro-batch's backward computes the same."""
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megadual.model.gpt import build_chunk, full_model_stage, loss_names
from megadual.moe.dispatcher import TokenDispatcher
from megadual.moe.hierarchical import HierarchicalDispatcher
from megadual.moe.layer import MoELayer
from megadual.parallel import comm
from megadual.parallel.comm import BackwardOverlap
from megadual.pipeline.overlap import overlapped_forward_backward
from tests.test_model import CFG, batch


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# Exchange launches, F in a forward and B in a backward; "|" where the backward ends. The forward
# (dense layer 0, MoE layers 1 and 2) takes one step at each all-to-all the backward launches
# with the overlap set, each step ending where the forward launches its next all-to-all.
INTERLEAVING = {
    # MoE layer: forward dispatch | combine; backward the combine's, then the dispatch's gradients.
    # The forward's last step (the loss) runs after the backward's last launch.
    "alltoall": "BFBFBFBF|",
    # MoE layer: forward hop 1 | hop 2 out, hop 2 back | hop 1 back; backward hop 1 back, hop 2 back,
    # hop 2 out (covered by the shared experts: it resumes no forward step), hop 1 out. The forward
    # takes its first step before the backward starts.
    "hierarchical": "FBFFBFBBFBFFBFBB|",
}


@pytest.mark.parametrize("dispatcher,mtp_layers", [("alltoall", 0), ("hierarchical", 0), ("alltoall", 2)],
                         ids=["alltoall", "hierarchical", "alltoall-MTP-D2"])
def test_overlapped_pair_equals_forward_then_backward(monkeypatch, dispatcher, mtp_layers):
    config = replace(CFG, mtp_num_layers=mtp_layers)
    (tokens_a, labels_a), (tokens_b, labels_b) = batch(1), batch(2)
    plain = build_chunk(config, full_model_stage(config), seed=3)
    plain(tokens_b, labels_b).loss.backward()
    loss_a = plain(tokens_a, labels_a)
    loss_a.loss.backward()

    # One process: the exchanges (both hops of the hierarchical path) are local, but run their
    # steps all the same; without EP a layer would skip the exchange, so it is given one.
    paired = build_chunk(config, full_model_stage(config), seed=3)
    for layer in paired.modules():
        if isinstance(layer, MoELayer):
            layer.dispatcher = (TokenDispatcher(config.num_experts) if dispatcher == "alltoall"
                                else HierarchicalDispatcher(config.num_experts, None, None))
    overlap = BackwardOverlap()
    paired.attach_schedule(None, overlap)
    loss_b = paired(tokens_b, labels_b)
    events = []
    launch_forward, launch_backward = comm.Exchange._launch_forward, comm.Exchange._launch_backward
    monkeypatch.setattr(comm.Exchange, "_launch_forward",
                        lambda self, x: (events.append("F"), launch_forward(self, x)))
    monkeypatch.setattr(comm.Exchange, "_launch_backward",
                        lambda self, g: (events.append("B"), launch_backward(self, g)))

    def backward():
        loss_b.loss.backward()
        events.append("|")

    overlapped = overlapped_forward_backward(paired.forward_steps(tokens_a, labels_a), backward, nullcontext,
                                             overlap)
    overlapped.loss.backward()
    # The MTP modules' MoE layers pair like the main model's: each repeats the MoE layers' pattern.
    moe_layers = 2 + mtp_layers
    assert "".join(events[:events.index("|") + 1]) == INTERLEAVING[dispatcher][:-1] * (moe_layers // 2) + "|"
    assert overlapped.reported.keys() == loss_a.reported.keys() == set(loss_names(config))
    assert all(torch.equal(overlapped.reported[name], loss_a.reported[name]) for name in loss_a.reported)
    expected = grads(plain)
    for name, grad in grads(paired).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-6, atol=1e-7, msg=name)


def run_overlap_benchmark(*args: str) -> str:
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_overlap.py"
    return subprocess.run([sys.executable, str(script), "--hidden", "64", "--seq", "32", "--micro-batch", "2",
                           "--warmup", "0", "--iters", "1", *args], capture_output=True, text=True, check=True,
                          timeout=300).stdout


def test_overlap_benchmark_runs_and_both_ways_agree():
    assert "same loss: True" in run_overlap_benchmark()


def test_overlap_benchmark_runs_hierarchical_dispatch_on_given_links():
    out = run_overlap_benchmark("--ep", "4", "--ranks-per-node", "2", "--dispatcher", "hierarchical",
                                "--emulate-links", "inter=20MB/s,10us;intra=120MB/s,2us", "--breakdown")
    assert "same loss: True" in out and "exposed communication" in out
    assert "F L1 inter out" in out and "F L1 intra out" in out and "B L2 inter back" in out, out
