"""The fused cross entropy used without TP against the written-out vocabulary-parallel one."""
import pytest
import torch

from megadual.parallel.tensor import NO_TP, sharded_cross_entropy, vocab_parallel_cross_entropy
from tests.helpers import device_under_test

pytestmark = pytest.mark.usefixtures("on_device_under_test")  # made on CUDA under scripts/gpu_check.sh


def test_fused_cross_entropy_equals_the_written_out_one():
    g = torch.Generator(device_under_test()).manual_seed(0)
    logits = (torch.randn(32, 4, 512, generator=g) * 3).requires_grad_()
    target = torch.randint(0, 512, (4, 32), generator=g).t()  # [s, b] as the head sees it: not contiguous
    fused = vocab_parallel_cross_entropy(logits, target, NO_TP)
    written_out = sharded_cross_entropy(logits, target, None)
    grad_fused, = torch.autograd.grad(fused.mean(), logits)
    grad_written_out, = torch.autograd.grad(written_out.mean(), logits)
    # measured over three seeds: losses (about 7) differ by at most 9.5e-7, gradients by 3.3e-9
    torch.testing.assert_close(fused, written_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_fused, grad_written_out, rtol=0, atol=3e-8)


def test_the_vocabulary_padding_takes_no_probability():
    """With 500 real of 512 columns both forms equal float64 cross entropy over the 500 columns,
    and the padded columns get no gradient."""
    g = torch.Generator(device_under_test()).manual_seed(1)
    logits = (torch.randn(32, 4, 512, generator=g) * 3).requires_grad_()
    target = torch.randint(0, 500, (4, 32), generator=g).t()
    reference = torch.nn.functional.cross_entropy(logits.detach().double()[..., :500].flatten(0, 1),
                                                  target.flatten(), reduction="none").view(target.shape)
    for loss in (vocab_parallel_cross_entropy(logits, target, NO_TP, 500), sharded_cross_entropy(logits, target, None, 500)):
        torch.testing.assert_close(loss.double(), reference, rtol=0, atol=1e-5)
        grad, = torch.autograd.grad(loss.mean(), logits)
        assert grad[..., 500:].abs().max() == 0 and grad[..., :500].abs().max() > 0


def test_padding_rows_start_at_zero_and_the_real_rows_do_not_depend_on_them():
    """The embedding's 500 real rows are drawn alike in tables padded to 500, 504 and 512 rows (an
    odd width, where drawing the whole table would move the last real values); the padding is zero."""
    from megadual.parallel.params import ParamRecord
    from megadual.parallel.rng import init_parameter
    from megadual.parallel.tensor import VocabParallelEmbedding
    tables = []
    for rows in (500, 504, 512):
        embedding = VocabParallelEmbedding(rows, 3, NO_TP, 0.02, real_rows=500)
        init_parameter(ParamRecord("embedding.weight", embedding.weight, embedding.param_specs["weight"]), seed=7)
        tables.append(embedding.weight.detach())
    assert all(torch.equal(t[:500], tables[0]) for t in tables) and all(t[500:].eq(0).all() for t in tables)
