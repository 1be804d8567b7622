"""Dropout masks are a pure function of (seed, site, sample, global position): the expected share is
dropped, and any split of the sequence, heads or batch draws the same mask as the whole."""
from types import SimpleNamespace

import pytest
import torch

from megadual.arguments import parse_args
from megadual.config import ModelConfig
from megadual.model.dropout import ATTENTION_OUTPUT, AttentionDropout, HiddenDropout
from megadual.model.gpt import build_chunk, full_model_stage
from megadual.training.loop import pretrain
from tests.helpers import TINY_MOE, single_process_group

WHOLE = SimpleNamespace(rank=0, sequence_parallel=False)


def sequence_part(rank):
    return SimpleNamespace(rank=rank, sequence_parallel=True)


def test_the_expected_share_is_dropped_and_the_rest_scaled():
    x = torch.ones(64, 4, 128)
    out = HiddenDropout(0.25, 7, ATTENTION_OUTPUT, 3, WHOLE)(x, torch.arange(4))
    assert (out == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert torch.all((out == 0) | (out == 1 / 0.75))
    probs = AttentionDropout(0.1, 7, 0, 3)(torch.ones(2, 4, 64, 64), torch.arange(2), head_offset=0)
    assert (probs == 0).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_sequence_parallel_parts_draw_the_whole_sequence_mask():
    x, samples = torch.ones(16, 2, 8), torch.tensor([40, 41])
    whole = HiddenDropout(0.5, 1, ATTENTION_OUTPUT, 0, WHOLE)(x, samples)
    parts = [HiddenDropout(0.5, 1, ATTENTION_OUTPUT, 0, sequence_part(r))(x[8 * r:8 * r + 8], samples)
             for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_tensor_parallel_heads_draw_the_whole_mask():
    probs, samples = torch.ones(2, 4, 8, 8), torch.tensor([3, 9])
    whole = AttentionDropout(0.5, 1, 0, 2)(probs, samples, head_offset=0)
    halves = [AttentionDropout(0.5, 1, 0, 2)(probs[:, :2], samples, head_offset=2 * r) for r in range(2)]
    assert torch.equal(torch.cat(halves, 1), whole)


def test_mask_follows_the_global_sample_not_its_place_in_the_micro_batch():
    dropout, x = HiddenDropout(0.5, 1, ATTENTION_OUTPUT, 0, WHOLE), torch.ones(4, 2, 8)
    pair = dropout(x, torch.tensor([10, 11]))
    assert torch.equal(dropout(x[:, 1:], torch.tensor([11])), pair[:, 1:])
    assert not torch.equal(pair[:, 0], pair[:, 1])
    other_site = HiddenDropout(0.5, 1, ATTENTION_OUTPUT, 1, WHOLE)(x, torch.tensor([10, 11]))
    assert not torch.equal(other_site, pair)


CFG = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  seq_length=16, vocab_size=128, num_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2)
TOKENS, SAMPLES = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)), torch.tensor([4, 5])


def chunk_loss(hidden: float, attention: float, training: bool = True, samples=SAMPLES) -> torch.Tensor:
    config = ModelConfig(**{**CFG.__dict__, "hidden_dropout": hidden, "attention_dropout": attention})
    chunk = build_chunk(config, full_model_stage(config), seed=3).train(training)
    return chunk(TOKENS, TOKENS, samples).loss.detach()


def test_a_forward_run_twice_draws_the_same_masks():
    assert torch.equal(chunk_loss(0.3, 0.3), chunk_loss(0.3, 0.3))
    assert not torch.equal(chunk_loss(0.3, 0.3), chunk_loss(0.3, 0.3, samples=SAMPLES + 2))


def test_dropout_is_off_in_eval_mode():
    assert torch.equal(chunk_loss(0.3, 0.3, training=False), chunk_loss(0.0, 0.0))


def test_attention_computed_for_dropout_equals_sdpa():
    """With a keep-everything p the hand-written attention (GQA, causal) gives SDPA's result."""
    assert chunk_loss(0.0, 1e-12).item() == pytest.approx(chunk_loss(0.0, 0.0).item(), rel=1e-6)


def test_dropout_needs_the_sample_ids():
    with pytest.raises(ValueError, match="sample_ids"):
        chunk_loss(0.1, 0.0, samples=None)


def test_dropout_changes_the_training_losses():
    args = TINY_MOE + ["--train-iters", "1", "--lr-warmup-iters", "0"]
    with single_process_group() as device:
        plain = pretrain(parse_args(args), device, log=lambda line: None).losses
        dropped = pretrain(parse_args(args + ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]), device,
                           log=lambda line: None).losses
    assert dropped != plain and dropped == pytest.approx(plain, rel=0.05)
