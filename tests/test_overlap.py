"""The paired F&B chunk: a forward interleaved with another micro-batch's backward computes the same."""
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megadual.model.gpt import build_chunk, full_model_stage, loss_names
from megadual.parallel import comm
from megadual.parallel.comm import BackwardOverlap
from megadual.pipeline.overlap import overlapped_forward_backward
from tests.test_model import CFG, batch


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mtp_layers", [0, 2], ids=["no MTP", "MTP D=2"])
def test_overlapped_pair_equals_forward_then_backward(monkeypatch, mtp_layers):
    config = replace(CFG, mtp_num_layers=mtp_layers)
    (tokens_a, labels_a), (tokens_b, labels_b) = batch(1), batch(2)
    plain = build_chunk(config, full_model_stage(config), seed=3)
    plain(tokens_b, labels_b).loss.backward()
    loss_a = plain(tokens_a, labels_a)
    loss_a.loss.backward()

    paired = build_chunk(config, full_model_stage(config), seed=3)
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
    # Each all-to-all the backward launches (B: combine, tokens, gates per MoE layer) is followed by
    # one forward step, which ends by launching its own (F: tokens, expert ids, gates; or combine);
    # the forward (dense layer 0, MoE layers 1 and 2, then the MTP modules' MoE layers) is done
    # before the backward is.
    moe_layers = 2 + mtp_layers
    assert "".join(events[:events.index("|") + 1]) == "BFFFBF" * moe_layers + "B" * moe_layers + "|"
    assert overlapped.reported.keys() == loss_a.reported.keys() == set(loss_names(config))
    assert all(torch.equal(overlapped.reported[name], loss_a.reported[name]) for name in loss_a.reported)
    expected = grads(plain)
    for name, grad in grads(paired).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_overlap_benchmark_runs_and_both_ways_agree():
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_overlap.py"
    out = subprocess.run([sys.executable, str(script), "--hidden", "64", "--seq", "32", "--micro-batch", "2",
                          "--warmup", "0", "--iters", "1"], capture_output=True, text=True, check=True,
                         timeout=120)
    assert "same loss: True" in out.stdout
