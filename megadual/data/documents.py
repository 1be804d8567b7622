"""Document boundaries inside a packed sample: Megatron's --reset-position-ids, --reset-attention-mask
and --eod-mask-loss (its get_ltor_masks_and_position_ids).

A sample runs across documents, each ending with the end-of-document token (eod). With
--reset-position-ids the position after each eod is 0 again (RoPE sees each document from its
start); with --reset-attention-mask a token attends only to the tokens of its own document (the
eod belongs to the document it ends); with --eod-mask-loss the positions whose input is eod, where
the model would predict the next document's first token, do not count in the loss (and each MTP
depth k drops the positions whose input k ahead is eod, Megatron's rolled mask).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from megadual.config import DataConfig
from megadual.data.tokenizer import build_tokenizer


@dataclass(frozen=True)
class Documents:
    """A micro-batch's document structure, each field [micro_batch, seq] or None when its flag is off."""
    position_ids: torch.Tensor | None = None  # each token's position in its document
    document_ids: torch.Tensor | None = None  # which document of its sample a token is in (0, 1, ...)
    loss_mask: torch.Tensor | None = None  # 1.0 where the token's loss counts

    def to(self, device: torch.device) -> Documents:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return Documents(move(self.position_ids), move(self.document_ids), move(self.loss_mask))

    def attention_allowed(self) -> torch.Tensor | None:
        """[micro_batch, 1, seq, seq], True where query i may attend key j: j <= i in i's document;
        None: plain causal attention."""
        if self.document_ids is None:
            return None
        ids = self.document_ids
        seq = ids.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=ids.device).tril()
        return (causal & (ids[:, :, None] == ids[:, None, :]))[:, None]


def boundaries_of(d: DataConfig) -> Callable[[torch.Tensor], Documents] | None:
    """What the loader adds to each micro-batch as "documents" (from its tokens); None with none of
    the three flags."""
    if not (d.reset_position_ids or d.reset_attention_mask or d.eod_mask_loss):
        return None
    return partial(documents_of, eod=eod_token(d), d=d)


def eod_token(d: DataConfig) -> int:
    """The end-of-document id: the tokenizer's; mock data ends its documents with the last id."""
    return d.vocab_size - 1 if d.mock_data else build_tokenizer(d.tokenizer_type, d.tokenizer_model, d.vocab_size).eod


def documents_of(tokens: torch.Tensor, eod: int, d: DataConfig) -> Documents:
    """The structure of `tokens` [micro_batch, seq] that `d`'s flags ask for."""
    is_eod = tokens == eod
    # a document starts after each eod: count the eods strictly before each position
    starts_after = torch.cat([torch.zeros_like(is_eod[:, :1]), is_eod[:, :-1]], dim=1)
    document_ids = starts_after.long().cumsum(1)
    positions = None
    if d.reset_position_ids:
        index = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        first = torch.where(starts_after, index, torch.zeros_like(index)).cummax(1).values
        positions = index - first
    return Documents(positions, document_ids if d.reset_attention_mask else None,
                     (~is_eod).float() if d.eod_mask_loss else None)
