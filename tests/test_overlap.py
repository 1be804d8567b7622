"""The paired F&B chunk: a forward interleaved with another micro-batch's backward computes the same."""
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from megadual.model.gpt import build_chunk, full_model_stage
from megadual.parallel import comm
from megadual.parallel.comm import BackwardOverlap
from megadual.pipeline.overlap import overlapped_forward_backward
from tests.test_model import CFG, batch


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_overlapped_pair_equals_forward_then_backward(monkeypatch):
    (tokens_a, labels_a), (tokens_b, labels_b) = batch(1), batch(2)
    plain = build_chunk(CFG, full_model_stage(CFG), seed=3)
    plain(tokens_b, labels_b).backward()
    loss_a = plain(tokens_a, labels_a)
    loss_a.backward()

    paired = build_chunk(CFG, full_model_stage(CFG), seed=3)
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
        loss_b.backward()
        events.append("|")

    overlapped = overlapped_forward_backward(paired.forward_steps(tokens_a, labels_a), backward, nullcontext,
                                             overlap)
    overlapped.backward()
    # Each all-to-all the backward launches (B: combine, tokens, gates per MoE layer) is followed by
    # one forward step, which ends by launching its own (F: tokens, expert ids, gates; or combine);
    # the forward (dense layer 0, MoE layers 1 and 2) is done before the backward is.
    assert "".join(events[:events.index("|") + 1]) == "BFFFBFBFFFBFBB|"
    assert torch.equal(overlapped, loss_a)
    expected = grads(plain)
    for name, grad in grads(paired).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_overlap_benchmark_runs_and_both_ways_agree():
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_overlap.py"
    out = subprocess.run([sys.executable, str(script), "--hidden", "64", "--seq", "32", "--micro-batch", "2",
                          "--warmup", "0", "--iters", "1"], capture_output=True, text=True, check=True,
                         timeout=120)
    assert "same loss: True" in out.stdout
