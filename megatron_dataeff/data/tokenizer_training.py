"""Train a tokenizer with a [MASK] token: SentencePiece (`.model`) or byte-level BPE (HF `tokenizers`).

The files written load with `build_tokenizer`:
- SentencePiece: `--tokenizer-type SentencePieceTokenizer --tokenizer-model {prefix}.model`; ids
  unk 0, bos 1, eos 2 (the EOD), pad 3, then [MASK] as a control symbol (never produced from text).
- Byte-level BPE: a directory with tokenizer.json, tokenizer_config.json and special_tokens_map.json
  (`--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`), plus vocab.json and merges.txt
  (`--tokenizer-type GPT2BPETokenizer --vocab-file DIR/vocab.json --merge-file DIR/merges.txt`).
  Special tokens come first: <|endoftext|> 0 (EOS/EOD), [MASK] 1, <|pad|> 2. Lossless on any text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from megatron_dataeff.data.inputs import PreprocessError, open_text, resolve_inputs
from megatron_dataeff.errors import ConfigError

EOD_TOKEN = "<|endoftext|>"
MASK_TOKEN = "[MASK]"
PAD_TOKEN = "<|pad|>"


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int, model_type: str = "unigram",
                        character_coverage: float = 1.0, byte_fallback: bool = True,
                        input_sentence_size: int = 0, num_threads: int = 2,
                        normalization_rule_name: str = "identity") -> str:
    """Train on `texts` (one sentence each); returns the path of `{model_prefix}.model`.

    The default `identity` normalization keeps runs of spaces, so with byte fallback the model is
    lossless apart from SentencePiece's leading-space convention; "nmt_nfkc" is SentencePiece's default."""
    import sentencepiece as spm

    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    source = _Texts(texts)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=source, model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
            character_coverage=character_coverage, byte_fallback=byte_fallback,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, control_symbols=[MASK_TOKEN],
            input_sentence_size=input_sentence_size, shuffle_input_sentence=input_sentence_size > 0,
            hard_vocab_limit=False, num_threads=num_threads, minloglevel=2,
            normalization_rule_name=normalization_rule_name,
            remove_extra_whitespaces=normalization_rule_name != "identity",
        )
    except (RuntimeError, ValueError) as exc:
        if source.error is not None:  # sentencepiece wraps what the texts raised in its own RuntimeError
            raise source.error from None
        raise ConfigError(f"SentencePiece cannot train with these options (--vocab-size {vocab_size}, --model-type "
                          f"{model_type}, --character-coverage {character_coverage}, --normalization "
                          f"{normalization_rule_name}): {exc}") from exc
    return model_prefix + ".model"


class _Texts:
    """An iterator over texts that keeps the exception it raised, for the caller of a library that hides it."""

    def __init__(self, texts: Iterable[str]):
        self._it = iter(texts)
        self.error: BaseException | None = None

    def __iter__(self) -> "_Texts":
        return self

    def __next__(self) -> str:
        try:
            return next(self._it)
        except StopIteration:
            raise
        except BaseException as exc:
            self.error = exc
            raise


def train_byte_level_bpe(texts: Iterable[str], out_dir: str, vocab_size: int, min_frequency: int = 2) -> str:
    """Train a GPT-2 style byte-level BPE on `texts`; returns `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOD_TOKEN, MASK_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt for GPT2BPETokenizer
    specials = {"eos_token": EOD_TOKEN, "mask_token": MASK_TOKEN, "pad_token": PAD_TOKEN}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return str(out)


def iter_training_texts(paths: list[str], json_key: str = "text", max_chars: int | None = None) -> Iterator[str]:
    """Texts of JSONL (`.jsonl`, `.json`, `.gz`) or plain-text files, stopping after `max_chars` characters."""
    seen = 0
    for path, fmt in resolve_inputs(paths):
        if fmt not in ("text", "jsonl"):
            raise PreprocessError(f"{path}: train tokenizers on JSONL or text files, not {fmt}")
        for text in _file_texts(path, fmt, json_key):
            if not text:
                continue
            yield text
            seen += len(text)
            if max_chars is not None and seen >= max_chars:
                return


def _file_texts(path: str, fmt: str, json_key: str) -> Iterator[str]:
    """The texts of one JSONL or text file; a record that has none is a PreprocessError naming file:line."""
    try:
        with open_text(path) as f:
            if fmt == "text":
                yield f.read()
                return
            for line, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError as exc:
                    raise PreprocessError(f"{path}:{line}: not valid JSON ({exc})") from exc
                if not isinstance(record, dict) or json_key not in record:
                    raise PreprocessError(f"{path}:{line}: no key {json_key!r}")
                text = record[json_key]
                if text is None:  # a null text is an empty document
                    continue
                if not isinstance(text, str):
                    raise PreprocessError(f"{path}:{line}: {json_key!r} is {type(text).__name__}, not a string")
                yield text
    except (UnicodeDecodeError, EOFError, OSError) as exc:  # not UTF-8, a corrupt gzip stream, unreadable
        raise PreprocessError(f"{path}: cannot read: {exc}") from exc


def default_num_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
