"""Multi-token prediction on one process: the math against a reference written apart, and where the
modules sit under each pipeline schedule (multi-process runs: test_parallel_mtp.py)."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megadual.model.gpt import build_chunk, full_model_stage
from megadual.parallel.context import BuildContext
from megadual.parallel.linear import linear
from megadual.parallel.wgrad import stack_row
from megadual.pipeline.schedules import pipeline_layout
from megadual.pipeline.stage_model import build_stage_model, embedding_twin_rank
from tests.test_model import CFG

# Two depths after three layers (1 dense, 2 MoE): the MTP layers (global index 3 and 4) are MoE.
# No balance loss: the reference cuts each depth's sequence short, which changes a sequence's
# routing statistics (not its routed outputs).
MTP = replace(CFG, mtp_num_layers=2, mtp_loss_scaling_factor=0.3, moe_aux_loss_coeff=0.0)


def sample(seed: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and labels as the dataset gives them: labels are the tokens shifted by one."""
    t = torch.randint(0, MTP.vocab_size, (batch, MTP.seq_length + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :-1], t[:, 1:]


def reference_losses(chunk, tokens: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """The lm loss and each depth's, written apart from the model: the token sequence t_0..t_S
    rebuilt from tokens and labels; depth k runs on the S-k positions whose target t_{i+k+1}
    exists (causal attention makes the positions after them irrelevant), with the projection
    and the cross entropy looped over positions."""
    t = torch.cat([tokens, labels[:, -1:]], dim=1)  # [batch, S + 1]
    seq = tokens.shape[1]
    emb, head = chunk.embedding.weight, chunk.output_layer.weight
    hidden = F.embedding(tokens.t(), emb)
    for layer in chunk.layers.values():
        hidden = layer(hidden)
    h = chunk.final_norm(hidden)  # h^0: [S, batch, hidden]
    losses = [F.cross_entropy(F.linear(h, head).flatten(0, 1), labels.t().flatten())]
    for k, module in enumerate(chunk.mtp, start=1):
        positions = seq - k
        projected = torch.stack([
            F.linear(torch.cat([module.enorm(emb[t[:, i + k]]), module.hnorm(h[i])], dim=-1), module.eh_proj.weight)
            for i in range(positions)])
        h = module.final_norm(module.layer(projected))
        losses.append(torch.stack([F.cross_entropy(F.linear(h[i], head), t[:, i + k + 1])
                                   for i in range(positions)]).mean())
    return losses


def test_mtp_losses_and_gradients_equal_the_reference():
    tokens, labels = sample(5)
    model = build_chunk(MTP, full_model_stage(MTP), seed=2)
    out = model(tokens, labels)
    out.loss.backward()
    reference = build_chunk(MTP, full_model_stage(MTP), seed=2)
    lm, *depths = reference_losses(reference, tokens, labels)
    (lm + 0.3 / 2 * sum(depths)).backward()

    assert list(out.reported) == ["lm loss", "mtp_1 loss", "mtp_2 loss"]
    torch.testing.assert_close(torch.stack(list(out.reported.values())), torch.stack([lm, *depths]).detach(),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, lm + 0.15 * sum(depths), rtol=1e-6, atol=0)
    want = dict(reference.named_parameters())
    assert any(name.startswith("mtp.1.layer.mlp.experts") for name in want)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name].grad, rtol=1e-5, atol=1e-8, msg=name)


def test_evaluation_computes_mtp_only_when_asked():
    tokens, labels = sample(6)
    model = build_chunk(MTP, full_model_stage(MTP), seed=2)
    trained = model(tokens, labels)
    model.eval()
    plain = model(tokens, labels)
    model.mtp_in_evaluation = True
    asked = model(tokens, labels)
    assert list(plain.reported) == ["lm loss"] and torch.equal(plain.loss, trained.reported["lm loss"])
    assert all(torch.equal(asked.reported[name], value) for name, value in trained.reported.items())


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe", "dualpipev"])
def test_mtp_sits_with_the_head_and_embeds_with_an_embedding_of_its_rank(schedule):
    """1F1B: the last rank keeps a tied copy of the embedding, summed with rank 0's. DualPipe: a
    copy's last stage embeds with the other copy's first stage, on the same rank. DualPipeV:
    rank 0 holds the first and the last stage, one embedding."""
    pp, config = 2, replace(MTP, num_layers=4)
    layout = pipeline_layout(schedule, pp, 2 * pp)
    full = {r.name: r.param for r in build_chunk(config, full_model_stage(config), seed=2).param_table()}
    for rank in range(pp):
        model = build_stage_model(config, layout, rank, seed=2)
        table = {record.name: record for record in model.param_table}
        assert all(torch.equal(record.param, full[name]) for name, record in table.items())
        heads = [chunk for chunk in model.chunks if chunk.stage.has_head]
        assert ("mtp.1.eh_proj.weight" in table) == bool(heads)
        tied = {name for name, record in table.items() if record.tied}
        twin = embedding_twin_rank(layout, rank)
        if schedule == "1f1b":
            assert tied == ({"embedding.weight"} if rank == pp - 1 else set())
            assert twin == pp - 1 - rank
        else:
            assert not tied and twin is None
            embedders = [chunk for chunk in model.chunks if chunk.stage.has_embedding]
            for head in heads:  # the MTP embeds with the embedding of the rank's first stage
                assert head._mtp_embed.__self__ is embedders[0] and not hasattr(head, "embedding")


def test_every_mtp_linear_runs_through_the_layers_gemm():
    """So FP8 (--fp8-format) covers the MTP modules' projections and experts as the main layers'."""
    seen = set()

    def gemm(x, weight, wgrad_store=None, cache=None):
        seen.add(id(stack_row(weight)[0]))  # an expert's weight: its row of the projection's stack
        return linear(x, weight, wgrad_store, cache)

    model = build_chunk(MTP, full_model_stage(MTP), seed=2, ctx=BuildContext(gemm=gemm))
    model(*sample(7))
    unseen = [name for name, p in model.mtp.named_parameters() if id(p) not in seen]
    assert all("norm" in name or "router" in name for name in unseen), unseen
