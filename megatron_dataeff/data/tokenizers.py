"""Tokenizers, built from Megatron-LM's `--tokenizer-type/--tokenizer-model` flags.

Every tokenizer exposes the same small interface (`Tokenizer`): `tokenize`, `tokenize_batch`,
`detokenize`, `vocab_size` (ids it can emit, special tokens included), `eod`, and `mask_token_id`
(None when it has no mask token: the trainer then appends one id after the vocabulary, see
`resolve_mask_token`).

Ids and EOD follow what Megatron-LM's `tools/preprocess_data.py` (core_v0.16.1) writes, so a dataset
made here and one made there are interchangeable:

- HuggingFaceTokenizer: `tokenizer.tokenize(text)` then `convert_tokens_to_ids`, i.e. no BOS/EOS or
  other template tokens; special tokens written in the text are recognised. EOD is the EOS token
  (the SEP token when there is no EOS). `vocab_size = len(tokenizer)`.
- SentencePieceTokenizer: `encode_as_ids(text)` (no BOS/EOS); EOD is the model's `eos_id()`;
  `vocab_size = get_piece_size()`.
- GPT2BPETokenizer: OpenAI's GPT-2 byte-level BPE from `vocab.json` + `merges.txt` (Megatron-LM's
  legacy `_GPT2BPETokenizer`): `<|endoftext|>` in the text is not special; EOD is `<|endoftext|>`.
- NullTokenizer: whitespace-separated integer ids; `--vocab-size V` gives EOD = V and V + 1 ids.
- ByteTokenizer (ours): UTF-8 bytes 0-255, EOD 256, [MASK] 257.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
from typing import Optional, Sequence

import numpy as np

from megatron_dataeff.errors import ConfigError, PathNotFoundError, UserError

TOKENIZER_TYPES = ("ByteTokenizer", "HuggingFaceTokenizer", "SentencePieceTokenizer", "GPT2BPETokenizer",
                   "NullTokenizer")
# Names a trained tokenizer may use for its mask token, in the order they are looked up.
MASK_TOKEN_NAMES = ("[MASK]", "<mask>", "<|mask|>", "<MASK>")


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

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> ids of each, through the library's batch path where it has one."""
        return [self.tokenize(t) for t in texts]

    def tokenize_batch_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (all ids concatenated [n_tokens] int64, ids per text [n_texts] int64)."""
        batch = self.tokenize_batch(texts)
        lengths = np.fromiter((len(ids) for ids in batch), dtype=np.int64, count=len(batch))
        flat = np.fromiter((i for ids in batch for i in ids), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths

    @abc.abstractmethod
    def detokenize(self, ids) -> str:
        """Ids -> text."""

    def build_args(self) -> dict:
        """Keyword arguments of `build_tokenizer` that rebuild this tokenizer."""
        return {"tokenizer_type": self.tokenizer_type}

    def set_num_threads(self, num_threads: int) -> None:
        """Threads the library may use inside one batch call (data-tool workers use 1 each)."""

    def metadata(self) -> dict:
        """What a run or checkpoint records to rebuild this tokenizer (`tokenizer_from_metadata`)."""
        return {"tokenizer_type": self.tokenizer_type, "vocab_size": self.vocab_size, "eod": self._eod_or_none(),
                "mask_token_id": self.mask_token_id, "build_args": self.build_args()}

    def _eod_or_none(self) -> Optional[int]:
        try:
            return self.eod
        except ValueError:
            return None


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

    def tokenize_batch_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int64)
        return flat, lengths

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class NullTokenizer(Tokenizer):
    """Text is whitespace-separated integer ids (Megatron-LM's NullTokenizer): `vocab_size` is the
    size without EOD, EOD = `vocab_size`, and the tokenizer emits `vocab_size + 1` ids.

    That is megatron-core 0.16-0.17's convention (and Megatron-LM core_v0.16's preprocess_data.py);
    it is kept on every release so that a dataset means the same thing whatever is installed.
    megatron-core 0.18 changed its own NullTokenizer(V) to V ids with EOD = V - 1: ours with
    --vocab-size V is theirs with --vocab-size V + 1."""

    tokenizer_type = "NullTokenizer"

    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) < 1:
            raise ConfigError("NullTokenizer needs --vocab-size >= 1")
        self._vocab_size_without_eod = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size_without_eod + 1

    @property
    def eod(self) -> int:
        return self._vocab_size_without_eod

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def build_args(self) -> dict:
        return {**super().build_args(), "vocab_size": self._vocab_size_without_eod}


class HuggingFaceTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory, or a tokenizer.json file (`--tokenizer-model`)."""

    tokenizer_type = "HuggingFaceTokenizer"

    def __init__(self, tokenizer_model: str):
        if not tokenizer_model:
            raise ConfigError("HuggingFaceTokenizer needs --tokenizer-model (a local directory or tokenizer.json)")
        if not os.path.exists(tokenizer_model):
            raise PathNotFoundError(f"HuggingFaceTokenizer: {tokenizer_model} does not exist")
        import transformers

        with _reading("--tokenizer-model", tokenizer_model, "a Hugging Face tokenizer"):
            if os.path.isfile(tokenizer_model):
                self._tok = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_model)
            else:
                # use_fast=False is what Megatron-LM asks for; transformers still hands back the
                # tokenizers-backed class when that is all the directory has.
                self._tok = transformers.AutoTokenizer.from_pretrained(tokenizer_model, use_fast=False)
        self.tokenizer_model = tokenizer_model
        self._backend = getattr(self._tok, "backend_tokenizer", None)
        self._vocab_size = len(self._tok)
        eos = self._tok.eos_token if self._tok.eos_token is not None else self._tok.sep_token
        self._eod = None if eos is None else self._tok.convert_tokens_to_ids(eos)
        self._mask = self._tok.mask_token_id
        if self._mask is None:
            vocab = self._tok.get_vocab()
            self._mask = next((vocab[n] for n in MASK_TOKEN_NAMES if n in vocab), None)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        if self._eod is None:
            raise ConfigError(f"tokenizer {self.tokenizer_model} has neither an EOS nor a SEP token to use as EOD")
        return self._eod

    @property
    def mask_token_id(self) -> Optional[int]:
        return self._mask

    def tokenize(self, text: str) -> list[int]:
        return self._tok.convert_tokens_to_ids(self._tok.tokenize(text))

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._backend is None:  # a Python-only tokenizer class
            return [self.tokenize(t) for t in texts]
        return [e.ids for e in _encode_batch(self._backend, texts)]

    def set_num_threads(self, num_threads: int) -> None:
        # tokenizers reads this before its first parallel batch; one thread per worker process.
        if num_threads == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)

    def build_args(self) -> dict:
        return {**super().build_args(), "tokenizer_model": self.tokenizer_model}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file (`--tokenizer-model`)."""

    tokenizer_type = "SentencePieceTokenizer"

    def __init__(self, tokenizer_model: str):
        if not tokenizer_model or not os.path.isfile(tokenizer_model):
            raise PathNotFoundError(f"SentencePieceTokenizer needs --tokenizer-model X.model, got {tokenizer_model!r}")
        import sentencepiece

        with _reading("--tokenizer-model", tokenizer_model, "a SentencePiece model"):
            self._sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
        self.tokenizer_model = tokenizer_model
        self._num_threads = -1
        unk = self._sp.unk_id()
        self._mask = next((self._sp.piece_to_id(n) for n in MASK_TOKEN_NAMES if self._sp.piece_to_id(n) != unk),
                          None)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        eos = self._sp.eos_id()
        if eos < 0:
            raise ConfigError(f"SentencePiece model {self.tokenizer_model} has no EOS piece to use as EOD")
        return eos

    @property
    def mask_token_id(self) -> Optional[int]:
        return self._mask

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self._num_threads)

    def set_num_threads(self, num_threads: int) -> None:
        self._num_threads = num_threads

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def build_args(self) -> dict:
        return {**super().build_args(), "tokenizer_model": self.tokenizer_model}


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE from `--vocab-file vocab.json --merge-file merges.txt` (run by HF tokenizers)."""

    tokenizer_type = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str):
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path or not os.path.isfile(path):
                raise PathNotFoundError(f"GPT2BPETokenizer needs {flag}, got {path!r}")
        from tokenizers import Tokenizer as _HFTokenizer, decoders, models, pre_tokenizers

        with _reading("--vocab-file", vocab_file, "a GPT-2 vocab.json"), open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        if not isinstance(vocab, dict) or "<|endoftext|>" not in vocab:
            raise ConfigError(f"{vocab_file} has no <|endoftext|> token (the GPT-2 EOD)")
        # No added/special tokens: like OpenAI's encoder, "<|endoftext|>" in text is plain text.
        with _reading("--vocab-file/--merge-file", f"{vocab_file} {merge_file}", "GPT-2 BPE files"):
            self._tok = _HFTokenizer(models.BPE.from_file(vocab_file, merge_file))
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self.vocab_file, self.merge_file = vocab_file, merge_file
        self._vocab_size = len(vocab)
        self._eod = vocab["<|endoftext|>"]

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in _encode_batch(self._tok, texts)]

    def set_num_threads(self, num_threads: int) -> None:
        if num_threads == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def build_args(self) -> dict:
        return {**super().build_args(), "vocab_file": self.vocab_file, "merge_file": self.merge_file}


@contextlib.contextmanager
def _reading(flag: str, path: str, what: str):
    """Turn a tokenizer library's refusal of a user's file into a ConfigError naming the flag and file.

    The libraries say "this file is not what I read" with OSError, ValueError (json's included),
    RuntimeError (sentencepiece) or, from the Rust `tokenizers`, a plain `Exception`; any other type is
    not about the file and keeps its traceback."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, UserError) or not (isinstance(exc, (OSError, ValueError, RuntimeError))
                                              or type(exc) is Exception):
            raise
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"{flag} {path}: cannot be read as {what}: {reason}") from exc


def _encode_batch(tok, texts: Sequence[str]):
    """HF tokenizers' batch encode without special tokens; `encode_batch_fast` skips offsets."""
    fast = getattr(tok, "encode_batch_fast", None)
    if fast is not None:
        return fast(list(texts), add_special_tokens=False)
    return tok.encode_batch(list(texts), add_special_tokens=False)


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    vocab_size: Optional[int] = None,
) -> Tokenizer:
    """The tokenizer named by Megatron-LM's flags."""
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    raise ConfigError(f"--tokenizer-type must be one of {TOKENIZER_TYPES}, got {tokenizer_type!r}")


def tokenizer_from_metadata(metadata: dict) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.metadata()` (a checkpoint's `tokenizer` record)."""
    if metadata.get("build_args"):
        return build_tokenizer(**metadata["build_args"])
    # Older records: type, model path and (NullTokenizer) the vocabulary size only.
    return build_tokenizer(metadata["tokenizer_type"], metadata.get("tokenizer_model"),
                           vocab_size=metadata.get("vocab_size"))


def resolve_mask_token(tokenizer: Tokenizer) -> tuple[int, int]:
    """(mask_token_id, number of ids the model needs): the tokenizer's mask token, else one appended."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id, tokenizer.vocab_size
    return tokenizer.vocab_size, tokenizer.vocab_size + 1
