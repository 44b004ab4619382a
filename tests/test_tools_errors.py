"""Bad input to the tools is a UserError raised where it is found, naming the flag or file: malformed tokenizer
files, tokenizer training data, HF directories and safetensors files, empty merges."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from megatron_dataeff.data.tokenizers import build_tokenizer
from megatron_dataeff.errors import ConfigError, DataError, PathNotFoundError, UserError

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_malformed_tokenizer_files_name_the_flag_and_file(tmp_path):
    """A tokenizer file its library cannot read is a ConfigError naming the flag and the file."""
    hf = tmp_path / "tokenizer.json"
    hf.write_text('{"not a tokenizer')
    sp = tmp_path / "sp.model"
    sp.write_bytes(b"garbage")
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text("not json")
    merges.write_text("#version: 0.2\n")
    with pytest.raises(ConfigError, match=f"--tokenizer-model {hf}: cannot be read as a Hugging Face tokenizer"):
        build_tokenizer("HuggingFaceTokenizer", str(hf))
    with pytest.raises(ConfigError, match=f"--tokenizer-model {sp}: cannot be read as a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", str(sp))
    with pytest.raises(ConfigError, match=f"--vocab-file {vocab}: cannot be read"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(vocab), merge_file=str(merges))
    with pytest.raises(PathNotFoundError, match="does not exist"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "missing"))


def test_preprocess_reports_a_malformed_tokenizer_in_one_line(tmp_path, capsys):
    """tools/preprocess_data.py's main: a tokenizer file that cannot be read is exit 1 with one error line."""
    from megatron_dataeff.data.preprocess_cli import main

    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "tokenizer.json").write_text("{}")
    rc = main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
               "HuggingFaceTokenizer", "--tokenizer-model", str(tmp_path / "tokenizer.json")])
    assert rc == 1
    assert "--tokenizer-model" in _error_line(capsys)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
@pytest.mark.parametrize("content, message", [
    ('{"text": "a b c"}\nnot json\n', ":2: not valid JSON"),
    ('{"body": "a b c"}\n', ":1: no key 'text'"),
    ('{"text": ["a"]}\n', ":1: 'text' is list, not a string"),
])
def test_train_tokenizer_names_the_bad_record(tmp_path, capsys, kind, content, message):
    """tools/train_tokenizer.py: a record without text is exit 1 naming file:line, with either trainer (even
    through SentencePiece, which wraps what the texts raise in its own error)."""
    src = tmp_path / "data.jsonl"
    src.write_text(content)
    rc = _tool("train_tokenizer").main(["--input", str(src), "--type", kind, "--vocab-size", "300", "--output",
                                        str(tmp_path / "tok")])
    assert rc == 1
    assert _error_line(capsys).startswith(f"error: {src}{message}")


def test_train_tokenizer_refuses_options_sentencepiece_cannot_use(tmp_path, capsys):
    """A vocabulary too small for the characters is exit 1 naming --vocab-size."""
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps({"text": f"line {i} of some text"}) + "\n" for i in range(20)))
    rc = _tool("train_tokenizer").main(["--input", str(src), "--type", "sentencepiece", "--vocab-size", "5",
                                        "--output", str(tmp_path / "sp")])
    assert rc == 1
    assert "--vocab-size 5" in _error_line(capsys)


def test_merge_of_nothing_is_a_user_error(tmp_path, capsys):
    """tools/merge_datasets.py on a folder without datasets: exit 1, one line."""
    (tmp_path / "empty").mkdir()
    rc = _tool("merge_datasets").main(["--input", str(tmp_path / "empty"), "--output-prefix", str(tmp_path / "m")])
    assert rc == 1
    assert _error_line(capsys) == "error: nothing to merge: --input names no dataset"


def test_hf_directories_and_safetensors_that_cannot_be_read(tmp_path, capsys):
    """import_hf: a config.json that is not JSON is exit 2 naming --hf-dir; safetensors files without a valid
    header, or a directory without weights, are UserErrors naming the file."""
    from megatron_dataeff.export.safetensors_io import SafetensorsDirectory

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{")
    assert _tool("import_hf").main(["--hf-dir", str(hf), "--save", str(tmp_path / "ckpt")]) == 2
    assert _error_line(capsys).startswith(f"error: --hf-dir {hf}: config.json is not valid JSON")
    assert not (tmp_path / "ckpt").exists()

    with pytest.raises(PathNotFoundError, match="no model.safetensors"):
        SafetensorsDirectory(str(hf))
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(DataError, match="not a safetensors file"):
        SafetensorsDirectory(str(hf))
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(PathNotFoundError, match="model-1.safetensors: named by"):
        SafetensorsDirectory(str(hf))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (hf / "model-1.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(UserError, match="truncated"):
        SafetensorsDirectory(str(hf)).get("w")
