"""Megatron-LM's own GPT and Llama example command lines (shrunk) train here with the script name changed;
what they ask for that is not built here is refused by name; sample-based schedules follow Megatron-LM's
arithmetic; a dataset with an id outside the vocabulary is refused with the file and the id; every flag of
Megatron-LM's dense-model example scripts (core_v0.16.0..core_v0.19.x) is parsed or refused by name."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_dataeff.arguments import build_parser, parse_config
from megatron_dataeff.data.indexed import IndexedDatasetWriter
from megatron_dataeff.data.tokenizers import build_tokenizer
from tests.conftest import ROOT, child_env, run_pretrain
from tests.megatron_lm_examples import DENSE_EXAMPLES, read_list, script_argv, verdicts

BPE = ROOT / "tests" / "assets" / "tokenizers" / "bpe"


@pytest.fixture(scope="module")
def bpe_dataset(tmp_path_factory):
    """The test corpus as a GPT-2 BPE Megatron dataset."""
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(BPE / "vocab.json"), merge_file=str(BPE / "merges.txt"))
    prefix = tmp_path_factory.mktemp("bpe") / "corpus_text_document"
    texts = [json.loads(line)["text"] for line in (ROOT / "tests" / "assets" / "corpus.jsonl").read_text().splitlines()]
    with IndexedDatasetWriter(str(prefix), vocab_size=tok.vocab_size) as w:
        for text in texts:
            w.add_document(tok.tokenize(text) + [tok.eod])
    return str(prefix)


def test_megatron_gpt_example_runs_unchanged(bpe_dataset, tmp_path):
    """examples/gpt3/train_gpt3_175b_distributed.sh's flags, shrunk; --vocab-file/--merge-file without
    --tokenizer-type means GPT-2 BPE, as in Megatron-LM."""
    args = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
            "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--attention-backend", "auto",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--weight-decay", "0.1",
            "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--init-method-std", "0.006", "--clip-grad", "1.0",
            "--lr", "6.0e-5", "--lr-decay-style", "cosine", "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001",
            "--lr-decay-iters", "3",
            "--data-path", bpe_dataset, "--vocab-file", str(BPE / "vocab.json"), "--merge-file",
            str(BPE / "merges.txt"), "--split", "949,50,1",
            "--log-interval", "1", "--save-interval", "100", "--eval-interval", "100", "--eval-iters", "1",
            "--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"), "--tensorboard-dir",
            str(tmp_path / "tb"), "--distributed-timeout-minutes", "5", "--ckpt-format", "torch_dist",
            "--log-throughput", "--use-mcore-models", "--transformer-impl", "transformer_engine"]
    recs = run_pretrain(args, tmp_path / "run")
    assert [r["iteration"] for r in recs if r["split"] == "train"] == [1, 2, 3]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["tokenizer"]["tokenizer_type"] == "GPT2BPETokenizer"


def test_megatron_llama_example_runs_unchanged(bpe_dataset, tmp_path):
    """examples/llama's flags, shrunk: SwiGLU, RMSNorm, no biases, RoPE, GQA, sample-based schedule."""
    args = ["--use-mcore-models", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "192",
            "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "16",
            "--seq-length", "32", "--max-position-embeddings", "32", "--position-embedding-type", "rope",
            "--rotary-base", "500000", "--rotary-percent", "1.0", "--attention-dropout", "0.0", "--hidden-dropout",
            "0.0", "--swiglu", "--init-method-std", "0.0134", "--attention-backend", "auto", "--normalization",
            "RMSNorm", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--norm-epsilon", "1e-5",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-samples", "12",
            "--lr-decay-samples", "10", "--lr-warmup-samples", "2", "--lr", "2.5e-4", "--min-lr", "2.5e-5",
            "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--weight-decay", "0.1", "--adam-beta1", "0.9",
            "--adam-beta2", "0.95", "--calculate-per-token-loss", "--context-parallel-size", "1",
            "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
            "--data-path", bpe_dataset, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
            str(BPE / "vocab.json"), "--merge-file", str(BPE / "merges.txt"), "--split", "99,1,0",
            "--log-interval", "1", "--eval-iters", "0", "--log-throughput", "--ckpt-format", "torch_dist",
            "--distributed-timeout-minutes", "60", "--distributed-backend", "nccl"]
    recs = [r for r in run_pretrain(args, tmp_path / "run") if r["split"] == "train"]
    assert [r["iteration"] for r in recs] == [1, 2, 3]  # 12 samples // 4
    # Megatron-LM's scheduler counts samples: warmup 2, decay 10, steps of the global batch (4).
    lr, min_lr = 2.5e-4, 2.5e-5

    def expected(samples):
        if samples <= 2:
            return lr * samples / 2
        ratio = (samples - 2) / (10 - 2)
        return min_lr + (lr - min_lr) * 0.5 * (math.cos(math.pi * min(ratio, 1.0)) + 1.0) if ratio <= 1 else min_lr

    assert [r["lr"] for r in recs] == pytest.approx([expected(4 * i) for i in (1, 2, 3)], rel=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["--fp16"], "--fp16: fp16 with loss scaling is not supported: use --bf16"),
    (["--normalization", "LayerNorm"], "--normalization LayerNorm: norms are RMSNorm"),
    (["--position-embedding-type", "learned_absolute"], "--position-embedding-type learned_absolute: positions are RoPE"),
    (["--context-parallel-size", "2"], "--context-parallel-size 2: context parallelism is not supported"),
    (["--rotary-percent", "0.5"], "--rotary-percent 0.5: RoPE covers the whole head dimension"),
    (["--rampup-batch-size", "16", "16", "1000"], "--rampup-batch-size 16 16 1000: batch-size ramp-up"),
    (["--apply-layernorm-1p"], "--apply-layernorm-1p: norms are plain RMSNorm: drop the flag"),
    (["--ckpt-format", "torch"], "--ckpt-format torch: checkpoints are megatron-core torch_dist"),
    (["--train-iters", "5", "--train-samples", "20"], "give --train-iters or --train-samples, not both"),
    (["--train-samples", "20", "--lr-decay-iters", "3"], "--lr-decay-iters and --lr-wsd-decay-iters need --train-iters"),
    (["--train-iters", "5", "--lr-warmup-samples", "3"], "need --train-samples"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], "--lr-warmup-fraction excludes --lr-warmup-iters"),
    (["--use-flash-attn", "--attention-backend", "local"], "--use-flash-attn asks for --attention-backend flash"),
])
def test_what_is_not_built_is_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_vocab_and_merge_files_mean_gpt2_bpe_and_flash_attn_maps():
    cfg = parse_config(["--vocab-file", str(BPE / "vocab.json"), "--merge-file", str(BPE / "merges.txt"),
                        "--use-flash-attn", "--transformer-impl", "local"])
    assert cfg.data.tokenizer_type == "GPT2BPETokenizer"
    assert cfg.compute.attention_backend == "flash" and cfg.compute.transformer_impl == "local"
    assert parse_config([]).data.tokenizer_type == "ByteTokenizer"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--tokenizer-type", "GPT3Tokenizer"])


def test_dataset_with_an_id_outside_the_vocabulary_is_refused(tmp_path):
    """Byte tokenizer (258 ids: 256 bytes, EOD, mask) over a dataset holding id 300: refused at start, naming the
    .bin and the id, before any model is built."""
    prefix = tmp_path / "bad_text_document"
    with IndexedDatasetWriter(str(prefix), vocab_size=65535) as w:
        for k in range(40):
            w.add_document(list(np.arange(64) % 200) + ([300] if k == 33 else []) + [256])
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_diffusion.py"), "--data-path", str(prefix),
                           "--train-iters", "2", "--seq-length", "32", "--run-dir", str(tmp_path / "r"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env=child_env())
    assert proc.returncode == 2
    assert f"{prefix}.bin: token id 300 at token" in proc.stderr
    assert "outside the vocabulary of 258 ids" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Every flag of Megatron-LM's own dense-model example scripts: parsed, or refused by name

EXAMPLE_FLAGS = ROOT / "tests" / "assets" / "megatron_lm_example_flags.txt"
# What those scripts ask for that is honoured here (Megatron-LM's meaning), beside the shape/schedule flags.
HONOURED = {"--manual-gc", "--empty-unused-memory-level", "--calculate-per-token-loss", "--decoupled-lr",
            "--decoupled-min-lr", "--logging-level", "--exit-duration-in-mins", "--grad-reduce-in-bf16",
            "--cross-entropy-loss-fusion", "--use-distributed-optimizer", "--overlap-grad-reduce",
            "--overlap-param-gather", "--sequence-parallel", "--train-samples", "--lr-decay-samples",
            "--lr-warmup-samples"}
LIST = read_list(EXAMPLE_FLAGS)


@pytest.mark.parametrize("version", sorted(LIST))
def test_megatron_lm_example_flags_are_parsed_or_refused_by_name(version):
    """The checked-in list (tests/assets/megatron_lm_example_flags.txt, Megatron-LM core_v0.16.0..core_v0.19.x):
    each script version's command line parses once the flags refused by name are dropped; none is unrecognized."""
    result = verdicts(LIST[version])
    for flag in HONOURED & set(result):
        assert result[flag] == "parsed", (flag, result[flag])


def test_the_list_covers_the_supported_releases():
    versions = " ".join(LIST)
    for script in ("gpt3/train_gpt3_175b_distributed.sh", "llama/train_llama3_8b_h100_fp8.sh",
                   "megatron_fsdp/train_llama3_8b_fsdp_h100_fp8.sh"):
        assert script in versions
    assert "core_v0.16.0" in versions and "core_v0.19." in versions


MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")


@pytest.mark.skipif(not MEGATRON_LM_DIR, reason="set MEGATRON_LM_DIR to a Megatron-LM checkout")
def test_megatron_lm_checkout_example_flags_are_parsed_or_refused_by_name():
    """The dense-model example scripts of the checkout at MEGATRON_LM_DIR, read as bash runs them."""
    root = Path(MEGATRON_LM_DIR)
    scripts = sorted({p for pattern in DENSE_EXAMPLES for p in root.glob(pattern)})
    assert scripts, f"no {', '.join(DENSE_EXAMPLES)} under {root}"
    for script in scripts:
        argv = script_argv(script.read_text())
        assert len(argv) > 10, f"{script}: no pretrain_gpt.py command line found"
        try:
            verdicts(argv)
        except AssertionError as exc:
            raise AssertionError(f"{script}: {exc}") from None
