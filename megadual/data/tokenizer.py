"""Tokenizers behind ``--tokenizer-type``, and byte-level BPE training.

Every tokenizer offers ``vocab_size``, ``eod`` (end-of-document id), ``tokenize(text)``
and ``detokenize(ids)``:

- ``HuggingFaceTokenizer``: a ``tokenizer.json`` (``--tokenizer-model``) loaded with the
  ``tokenizers`` library; eod is its end-of-text special token.
- ``NullTokenizer``: text is whitespace-separated integer ids; ids lie in
  [0, ``--vocab-size``) and eod is ``--vocab-size`` - 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"
# end-of-text tokens of common tokenizer.json files, most common first
_EOD_CANDIDATES = (END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")


class HuggingFaceTokenizer:
    """A Hugging Face ``tokenizer.json``, with its end-of-text token as eod."""

    def __init__(self, tokenizer_file: str) -> None:
        if not tokenizer_file:
            raise ValueError(
                "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH/tokenizer.json"
            )
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"--tokenizer-model {tokenizer_file}: no such file")
        try:
            self._tokenizer = Tokenizer.from_file(tokenizer_file)
        except Exception as error:  # noqa: BLE001 (the library raises a bare Exception on bad JSON)
            raise ValueError(f"--tokenizer-model {tokenizer_file}: not a tokenizer.json ({error})") from None
        eod = next((self._tokenizer.token_to_id(t) for t in _EOD_CANDIDATES
                    if self._tokenizer.token_to_id(t) is not None), None)
        if eod is None:
            raise ValueError(
                f"--tokenizer-model {tokenizer_file}: no end-of-text token "
                f"(looked for {', '.join(_EOD_CANDIDATES)})"
            )
        self.eod = eod
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


class NullTokenizer:
    """Whitespace-separated integer ids; eod is the last id of the vocabulary."""

    def __init__(self, vocab_size: int | None) -> None:
        if vocab_size is None or vocab_size < 2:
            raise ValueError(f"--tokenizer-type NullTokenizer needs --vocab-size >= 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            raise ValueError(f"NullTokenizer input must be integer ids, got {text[:50]!r}") from None
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"NullTokenizer id outside [0, {self.vocab_size}) (--vocab-size)")
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None
) -> HuggingFaceTokenizer | NullTokenizer:
    """The tokenizer named by ``--tokenizer-type``."""
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r}: expected HuggingFaceTokenizer or NullTokenizer")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output_file: str) -> HuggingFaceTokenizer:
    """Train a byte-level BPE with ``<|endoftext|>`` as special token; save as tokenizer.json."""
    if vocab_size < 257:
        raise ValueError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 257 (256 bytes + eod)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(output_file)
    return HuggingFaceTokenizer(output_file)
