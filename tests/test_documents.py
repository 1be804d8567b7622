"""Document boundaries (--reset-position-ids, --reset-attention-mask, --eod-mask-loss): a packed
micro-batch of several documents per sequence gives the loss and gradients of running each
document alone, and the positions and mask are Megatron's (get_ltor_masks_and_position_ids,
written out as its loops)."""
import dataclasses

import pytest
import torch

from megadual.config import DataConfig, ModelConfig
from megadual.data.documents import documents_of
from megadual.model.gpt import build_chunk, full_model_stage
from megadual.model.mtp import MultiTokenPrediction
from megadual.parallel.recompute import run_steps

VOCAB, EOD, SEQ = 64, 63, 16
ALL = DataConfig(vocab_size=VOCAB, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
MOE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, vocab_size=VOCAB,
           num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=16,
           moe_aux_loss_coeff=0.0, seq_length=SEQ)
CONFIGS = {
    "GQA": ModelConfig(**MOE, num_query_groups=2),
    "MLA": ModelConfig(**MOE, multi_latent_attention=True, q_lora_rank=12, kv_lora_rank=8, qk_head_dim=8,
                       qk_pos_emb_head_dim=4, v_head_dim=8),
}


def packed_samples(batch: int, seed: int) -> torch.Tensor:
    """[batch, SEQ + 1] cut from a stream of documents of 1 to 9 tokens, each ending with EOD."""
    g = torch.Generator().manual_seed(seed)
    stream = []
    while len(stream) < batch * (SEQ + 1):
        length = int(torch.randint(0, 9, (1,), generator=g))
        stream += torch.randint(0, EOD, (length,), generator=g).tolist() + [EOD]
    return torch.tensor(stream[:batch * (SEQ + 1)]).view(batch, SEQ + 1)


def megatron_masks(tokens: torch.Tensor):
    """Megatron's get_ltor_masks_and_position_ids, its loops as written there (True: masked out)."""
    b, s = tokens.shape
    masked = torch.tril(torch.ones(b, s, s)) < 0.5
    loss_mask = torch.ones(b, s)
    loss_mask[tokens == EOD] = 0.0
    positions = torch.arange(s).repeat(b, 1)
    for row in range(b):
        previous = 0
        for i in (tokens[row] == EOD).nonzero().flatten().tolist():
            masked[row, i + 1:, :i + 1] = True
            positions[row, i + 1:] -= i + 1 - previous
            previous = i + 1
    return positions, masked, loss_mask


def test_positions_mask_and_loss_mask_are_megatrons():
    tokens = packed_samples(3, seed=1)[:, :-1]
    positions, masked, loss_mask = megatron_masks(tokens)
    documents = documents_of(tokens, EOD, ALL)
    assert torch.equal(documents.position_ids, positions)
    assert torch.equal(documents.attention_allowed()[:, 0], ~masked)
    assert torch.equal(documents.loss_mask, loss_mask)
    only_positions = documents_of(tokens, EOD, DataConfig(vocab_size=VOCAB, reset_position_ids=True))
    assert only_positions.document_ids is None and only_positions.loss_mask is None
    assert only_positions.attention_allowed() is None


def per_document_reference(chunk, samples: torch.Tensor) -> torch.Tensor:
    """The mean token loss of every document piece run alone, as one sequence from position 0,
    without the position whose input is EOD (it predicts the next document)."""
    total, count = 0.0, 0
    for row in samples:
        inputs, labels = row[:-1], row[1:]
        start = 0
        for end in [*((inputs == EOD).nonzero().flatten() + 1).tolist(), SEQ]:
            keep = end - 1 if end <= SEQ and end > start and inputs[end - 1] == EOD else end
            if keep > start:
                loss = chunk(inputs[None, start:keep], labels[None, start:keep]).loss
                total, count = total + loss * (keep - start), count + keep - start
            start = end
    return total / count


def loss_and_grads(loss: torch.Tensor, chunk) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, list(chunk.parameters()), allow_unused=True)
    return [loss.detach()[None]] + [torch.zeros_like(p) if g is None else g for p, g in zip(chunk.parameters(), grads)]


def close(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want))


@pytest.mark.parametrize("name", CONFIGS)
def test_a_packed_micro_batch_equals_its_documents_run_alone(name):
    """The loss and every gradient; without the mask or the loss mask they differ."""
    chunk = build_chunk(CONFIGS[name], full_model_stage(CONFIGS[name]), seed=3)
    samples = packed_samples(2, seed=7)
    tokens, labels = samples[:, :-1], samples[:, 1:]
    assert ((tokens == EOD).sum(1) >= 2).all()  # several documents in each sequence
    reference = loss_and_grads(per_document_reference(chunk, samples), chunk)

    def packed(flags: DataConfig) -> list[torch.Tensor]:
        return loss_and_grads(chunk(tokens, labels, None, documents_of(tokens, EOD, flags)).loss, chunk)
    assert close(packed(ALL), reference)
    for flag in ("reset_attention_mask", "eod_mask_loss"):
        assert not close(packed(dataclasses.replace(ALL, **{flag: False})), reference), flag
    # RoPE sees only distances, so inside a document the positions' restart changes nothing; where
    # documents see each other (no mask) it does: the positions reach the rotary embedding.
    positions_only = DataConfig(vocab_size=VOCAB, reset_position_ids=True)
    assert not close(packed(positions_only), packed(dataclasses.replace(positions_only, reset_position_ids=False)))


def roll_left(t: torch.Tensor) -> torch.Tensor:
    """Megatron's roll_tensor(t, shifts=-1): one to the left, 0 shifted in at the end."""
    return torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], dim=1)


def test_each_mtp_depth_rolls_the_loss_mask_as_megatron():
    """A stand-in loss that is each position's target id shows which targets each depth counts."""
    config = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=32,
                         vocab_size=VOCAB, mtp_num_layers=2, seq_length=SEQ)
    samples = packed_samples(2, seed=3)
    inputs, labels = samples[:, :-1], samples[:, 1:]
    hidden = torch.zeros(SEQ, 2, 16)
    losses = run_steps(MultiTokenPrediction(config).losses_steps(
        hidden, labels, None, lambda ids: torch.zeros(SEQ, 2, 16), lambda _, targets: targets.t().double(),
        documents_of(inputs, EOD, ALL)))
    targets, mask = labels.double(), (inputs != EOD).double()
    for depth, loss in enumerate(losses, start=1):
        targets, mask = roll_left(targets), roll_left(mask)
        assert loss.item() == pytest.approx(((targets * mask).sum() / mask.sum()).item(), rel=1e-12), depth
