"""Throughput of tools/preprocess_data.py against Megatron-LM's own script, same input/tokenizer/workers.

    python benchmarks/bench_preprocess.py --megatron-lm-dir ~/Megatron-LM --mb 30 --workers 2

Generates a JSONL corpus from the Python standard library's source (deterministic), trains a byte-level
BPE and a SentencePiece model on part of it, then times both scripts end to end (process start to
exit, as a user sees it) and prints tokens/s and the ratio. Megatron-LM's script needs the repository
first on PYTHONPATH plus `six` and `triton` (`--extra-pythonpath` for a `pip install --target` folder);
without a checkout only our figures are printed. The outputs of the two are compared byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """JSONL of documents cut from stdlib sources, `megabytes` of text in all; returns the count."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for p in sorted(stdlib.glob("*.py")):
        try:
            sources.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    text = "\n".join(sources)
    rng = random.Random(seed)
    target, size, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            n = int(rng.lognormvariate(7.5, 1.0))  # median ~1.8k characters
            start = rng.randrange(0, max(1, len(text) - n))
            line = json.dumps({"text": text[start:start + n]}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            docs += 1
    return docs


def train_tokenizers(corpus: Path, out: Path) -> dict:
    from megatron_dataeff.data.tokenizer_training import iter_training_texts, train_byte_level_bpe, train_sentencepiece

    texts = list(iter_training_texts([str(corpus)], max_chars=3_000_000))
    bpe = train_byte_level_bpe(texts, str(out / "bpe"), vocab_size=8192)
    sp = train_sentencepiece(texts, str(out / "sp" / "sp"), vocab_size=8000, model_type="bpe")
    return {
        "hf": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", bpe],
        "sp": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp],
        "gpt2": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", f"{bpe}/vocab.json",
                 "--merge-file", f"{bpe}/merges.txt"],
    }


def run(cmd: list[str], env: dict, cwd: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its workers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron-lm-dir", default=os.environ.get("MEGATRON_LM_DIR"))
    parser.add_argument("--extra-pythonpath", default=os.environ.get("MEGATRON_LM_EXTRA_PYTHONPATH", ""),
                        help="where six and triton are installed for Megatron-LM's script")
    parser.add_argument("--mb", type=float, default=20.0, help="size of the generated JSONL")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizers", nargs="+", default=["hf", "sp"], choices=["hf", "sp", "gpt2"])
    parser.add_argument("--work-dir", help="default: a temporary directory")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_preprocess_"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    docs = make_corpus(corpus, args.mb)
    tok_args = train_tokenizers(corpus, work)
    print(f"input: {corpus} ({docs:,} documents, {corpus.stat().st_size / 1e6:.1f} MB), workers={args.workers}")

    from megatron_dataeff.data.indexed import validate_indexed

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    print("wall = seconds from start to exit; cpu = CPU seconds of the script and its workers (the fairer "
          "figure on a shared machine)")
    print(f"{'tokenizer':>10} {'tokens':>11} {'ours wall':>9} {'ours cpu':>8} {'ours tok/s':>11} {'mlm wall':>8} "
          f"{'mlm cpu':>8} {'mlm tok/s':>10} {'ratio wall':>10} {'ratio cpu':>9}  identical")
    for name in args.tokenizers:
        common = ["--input", str(corpus), "--workers", str(args.workers), "--append-eod", "--log-interval",
                  "100000", *tok_args[name]]
        ours = work / f"ours_{name}"
        t_ours, c_ours = run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--output-prefix", str(ours),
                      *common], env, str(ROOT))
        tokens = validate_indexed(f"{ours}_text_document").num_tokens
        line = f"{name:>10} {tokens:>11,} {t_ours:>9.1f} {c_ours:>8.1f} {tokens / t_ours:>11,.0f}"
        if args.megatron_lm_dir:
            mlm = work / f"megatron_{name}"
            mlm_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (args.megatron_lm_dir, args.extra_pythonpath)
                                                            if p)}
            extra = ["--legacy-tokenizer"] if name == "gpt2" else []  # the new system downloads GPT-2 files
            t_mlm, c_mlm = run([sys.executable, str(Path(args.megatron_lm_dir) / "tools" / "preprocess_data.py"),
                         "--output-prefix", str(mlm), *common, *extra], mlm_env, args.megatron_lm_dir)
            same = all(filecmp.cmp(f"{ours}_text_document.{e}", f"{mlm}_text_document.{e}", shallow=False)
                       for e in ("bin", "idx"))
            line += (f" {t_mlm:>8.1f} {c_mlm:>8.1f} {tokens / t_mlm:>10,.0f} {t_mlm / t_ours:>10.2f} "
                     f"{c_mlm / c_ours:>9.2f}  {same}")
        else:
            line += "  (no Megatron-LM checkout: give --megatron-lm-dir)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
