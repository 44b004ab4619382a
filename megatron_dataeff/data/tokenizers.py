"""Tokenizers, built from Megatron-LM's `--tokenizer-type/--tokenizer-model` flags.

Every tokenizer exposes the same small interface (`Tokenizer`): `tokenize`, `detokenize`,
`vocab_size` (ids it can emit, special tokens included), `eod`, and `mask_token_id` (None when it
has no mask token: the trainer then appends one id after the vocabulary, see `resolve_mask_token`).
"""

from __future__ import annotations

import abc
from typing import Optional

TOKENIZER_TYPES = ("ByteTokenizer", "HuggingFaceTokenizer", "NullTokenizer")


class Tokenizer(abc.ABC):
    """What the data tools and the trainer need from a tokenizer."""

    tokenizer_type: str = ""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit, special tokens included."""

    @property
    @abc.abstractmethod
    def eod(self) -> int:
        """The end-of-document id appended by `--append-eod`."""

    @property
    def mask_token_id(self) -> Optional[int]:
        """The tokenizer's own mask token, or None."""
        return None

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Text -> ids."""

    @abc.abstractmethod
    def detokenize(self, ids) -> str:
        """Ids -> text."""

    def metadata(self) -> dict:
        """What a run or checkpoint records to rebuild this tokenizer."""
        return {"tokenizer_type": self.tokenizer_type, "vocab_size": self.vocab_size, "eod": self.eod,
                "mask_token_id": self.mask_token_id}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255, then <|endoftext|> = 256 and [MASK] = 257. Lossless, no files."""

    tokenizer_type = "ByteTokenizer"

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def eod(self) -> int:
        return 256

    @property
    def mask_token_id(self) -> Optional[int]:
        return 257

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated integer ids (Megatron-LM's NullTokenizer); eod = vocab_size - 1."""

    tokenizer_type = "NullTokenizer"

    def __init__(self, vocab_size: int):
        if vocab_size is None or vocab_size < 2:
            raise ValueError("NullTokenizer needs --vocab-size >= 2")
        self._vocab_size = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory or tokenizer.json (`--tokenizer-model`)."""

    tokenizer_type = "HuggingFaceTokenizer"

    def __init__(self, tokenizer_model: str):
        if not tokenizer_model:
            raise ValueError("HuggingFaceTokenizer needs --tokenizer-model (a local directory)")
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(tokenizer_model)
        self.tokenizer_model = tokenizer_model

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eod(self) -> int:
        return self._tok.eos_token_id

    @property
    def mask_token_id(self) -> Optional[int]:
        return self._tok.mask_token_id

    def tokenize(self, text: str) -> list[int]:
        return self._tok(text).input_ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def metadata(self) -> dict:
        return {**super().metadata(), "tokenizer_model": self.tokenizer_model}


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_size: Optional[int] = None,
) -> Tokenizer:
    """The tokenizer named by Megatron-LM's flags."""
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(f"--tokenizer-type must be one of {TOKENIZER_TYPES}, got {tokenizer_type!r}")


def resolve_mask_token(tokenizer: Tokenizer) -> tuple[int, int]:
    """(mask_token_id, number of ids the model needs): the tokenizer's mask token, else one appended."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id, tokenizer.vocab_size
    return tokenizer.vocab_size, tokenizer.vocab_size + 1
