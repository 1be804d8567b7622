"""The paired F&B chunk: a forward interleaved with another micro-batch's backward computes the same."""
from contextlib import nullcontext

import torch

from megadual.model.gpt import build_chunk, full_model_stage
from megadual.pipeline.overlap import overlapped_forward_backward
from tests.test_model import CFG, batch


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_overlapped_pair_equals_forward_then_backward():
    (tokens_a, labels_a), (tokens_b, labels_b) = batch(1), batch(2)
    plain = build_chunk(CFG, full_model_stage(CFG), seed=3)
    plain(tokens_b, labels_b).backward()
    loss_a = plain(tokens_a, labels_a)
    loss_a.backward()

    paired = build_chunk(CFG, full_model_stage(CFG), seed=3)
    loss_b = paired(tokens_b, labels_b)
    events = []

    def logged_steps():
        steps = paired.forward_steps(tokens_a, labels_a)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value
            events.append("forward step")
            yield

    def backward():
        loss_b.backward()
        events.append("backward done")

    overlapped = overlapped_forward_backward(logged_steps(), backward, nullcontext)
    overlapped.backward()
    # The forward pauses at its 2 all-to-alls per MoE layer; every step ran inside the backward,
    # each started right after the backward launched one of its all-to-alls.
    moe_layers = sum(layer.is_moe for layer in paired.layers.values())
    assert moe_layers == 2 and events == ["forward step"] * (2 * moe_layers) + ["backward done"]
    assert torch.equal(overlapped, loss_a)
    expected = grads(plain)
    for name, grad in grads(paired).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-6, atol=1e-7, msg=name)
