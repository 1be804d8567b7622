"""Multi-token prediction (DeepSeek-V3 report, 2.2): D sequential modules beside the output head.

Module k (depth k = 1..D) combines the previous depth's hidden state h^{k-1}_i (h^0: the main
model's, after its final norm) with the embedding of token t_{i+k}:

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])        2h -> h
    h^k  = final_norm(TransformerLayer(h'))

and the output head shared with the main model predicts t_{i+k+1} from h^k_i. The embedding half
comes first, as the released DeepSeek-V3 weights' eh_proj (and Megatron's MTP layer) take it; the
report writes the hidden half first. Depth k's loss is the mean cross entropy over the positions
whose target lies inside the sequence (i < S - k); the others are left out.

The modules sit on the last pipeline stage, which reads only labels (labels[i] = t_{i+1}): depth k
embeds the labels shifted by k-1 and is scored against the labels shifted by k, whole sequences on
every TP rank, which the embedding then splits under sequence parallelism.

Module k is `mtp.<k-1>`; its transformer layer has the global index num_layers + k - 1, DeepSeek's
numbering of MTP layers after the last layer (Hugging Face: model.layers.<index>), and is MoE or
dense as the model's rule for that index says. The index also keys the module's dropout masks
(--hidden-dropout on the embedded tokens, as on the main model's, and inside the layer).
"""
from __future__ import annotations

from collections.abc import Callable, Generator

import torch
import torch.nn.functional as F

from megadual.config import ModelConfig
from megadual.data.documents import Documents
from megadual.model.block import TransformerLayer
from megadual.model.dropout import EMBEDDING, HiddenDropout
from megadual.model.layers import RMSNorm
from megadual.parallel.context import ONE_PROCESS, BuildContext
from megadual.parallel.tensor import ShardedLinear


def mtp_loss_names(num_layers: int) -> list[str]:
    """The log fields of the depths' losses, as Megatron names them."""
    return [f"mtp_{k} loss" for k in range(1, num_layers + 1)]


class MTPModule(torch.nn.Module):
    """One depth: the two norms, the projection of their concatenation, one transformer layer and
    the norm before the shared head."""

    def __init__(self, config: ModelConfig, index: int, ctx: BuildContext = ONE_PROCESS, seed: int = 0):
        super().__init__()
        h, eps, sp = config.hidden_size, config.norm_epsilon, ctx.tp.sequence_parallel
        layer_index = config.num_layers + index
        self.embedding_dropout = HiddenDropout(config.hidden_dropout, seed, EMBEDDING, layer_index, ctx.tp)
        self.enorm = RMSNorm(h, eps, sp)
        self.hnorm = RMSNorm(h, eps, sp)
        # Whole on every TP rank, each projecting the positions it holds (its part of the sequence
        # under sequence parallelism, where the gradient is then a partial sum over TP).
        self.eh_proj = ShardedLinear(2 * h, h, ctx.tp, None, config.init_method_std, ctx.gemm,
                                     grad_partial_over_tp=sp)
        self.layer = TransformerLayer(config, layer_index, ctx, seed)
        self.final_norm = RMSNorm(h, eps, sp)

    def forward_steps(self, hidden: torch.Tensor, embedded: torch.Tensor, samples: torch.Tensor | None,
                      documents: Documents | None = None) -> Generator[None, None, torch.Tensor]:
        """h^k from h^{k-1} and the embedded tokens, pausing at the layer's expert all-to-alls."""
        embedded = self.enorm(self.embedding_dropout(embedded, samples))
        projected = self.eh_proj(torch.cat([embedded, self.hnorm(hidden)], dim=-1))
        return self.final_norm((yield from self.layer.forward_steps(projected, samples, documents)))


class MultiTokenPrediction(torch.nn.ModuleList):
    """The D modules, run one after the other."""

    def __init__(self, config: ModelConfig, ctx: BuildContext = ONE_PROCESS, seed: int = 0):
        super().__init__([MTPModule(config, k, ctx, seed) for k in range(config.mtp_num_layers)])

    def losses_steps(self, hidden: torch.Tensor, labels: torch.Tensor, samples: torch.Tensor | None,
                     embed: Callable[[torch.Tensor], torch.Tensor],
                     token_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     documents: Documents | None = None) -> Generator[None, None, list[torch.Tensor]]:
        """Each depth's loss, unscaled, pausing at the expert all-to-alls.

        `hidden`: the main model's normed output [seq(/TP), batch, hidden]; `labels` [batch, seq];
        `samples`: the micro-batch's global sample indices (dropout); `embed`: token ids
        [batch, seq] -> embeddings laid out as `hidden`; `token_losses`: (normed hidden, target
        ids [batch, seq]) -> the head's per-token cross entropy [seq, batch]; `documents`: the
        attention's document boundaries, and under --eod-mask-loss depth k leaves out the
        positions whose input k ahead is the end of a document (Megatron's rolled loss mask)."""
        seq = labels.shape[1]
        # Position i of `ahead[:, j:j + seq]` holds t_{i+j+1}, and 0 past the end of the sequence.
        ahead = F.pad(labels, (0, len(self)))
        losses = []
        for k, module in enumerate(self, start=1):
            hidden = yield from module.forward_steps(hidden, embed(ahead[:, k - 1:k - 1 + seq]), samples, documents)
            mask = None if documents is None or documents.loss_mask is None else documents.loss_mask[:, k:]
            losses.append(masked_mean(token_losses(hidden, ahead[:, k:k + seq])[:seq - k], mask))
        return losses


def masked_mean(token_losses: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of `token_losses` [seq, batch] over the positions `mask` [batch, seq] keeps (None: all)."""
    if mask is None:
        return token_losses.mean()
    mask = mask.t().to(token_losses.dtype)
    return (token_losses * mask).sum() / mask.sum().clamp(min=1)
