"""Offline downstream-style tasks built from the held-out validation documents of any corpus.

Every run gets downstream-style numbers without downloads; the tasks are deterministic for a seed
and never use training text (the validation documents are held out by document, see
`data/samples.py`).

* cloze (LAMBADA-style): a passage ending just before a word; predict that word.  Targets are
  words of >= 3 letters that already occur earlier in the passage (as LAMBADA's targets mostly do),
  so the broader context makes them predictable.  Metrics: `acc` (greedy decoding reproduces the
  word exactly: argmax at every position for AR; for diffusion one token per step, most confident
  position first or left to right as `greedy_order` says) and `nll` (mean negative log-likelihood /
  ELBO of the word in nats).
* continuation (HellaSwag-style): a passage ending at a sentence boundary; choose its true next
  sentence among `num_choices - 1` distractor sentences taken from other validation documents, of
  similar length.  Metrics: `acc` (highest summed log-likelihood) and `acc_norm` (highest
  log-likelihood per byte of the ending, lm-eval's acc_norm).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron_dataeff.errors import ConfigError

TASKS = ("cloze", "continuation")
_WORD = re.compile(r"[A-Za-z]{3,}")
_SENTENCE_START = re.compile(r"(?<=[.!?])[ \n]+(?=[A-Z])|\n\n+(?=\S)")


@dataclass
class ClozeExample:
    context: str  # the passage, ending just before the target's leading space
    target: str  # " word"


@dataclass
class ChoiceExample:
    context: str
    choices: list[str] = field(default_factory=list)
    label: int = 0


def validation_documents(data, tokenizer) -> list[str]:
    """Texts of the validation documents of a run's data (`build_run_data`: the split training uses, every
    dataset of a blend), end-of-document tokens dropped."""
    eod = getattr(tokenizer, "eod", None)
    return [tokenizer.detokenize([int(i) for i in ids if eod is None or int(i) != eod])
            for ids in data.valid_documents()]


def _trim_left(text: str, max_chars: int) -> str:
    """The last <= max_chars characters of text, starting at a word boundary."""
    if len(text) <= max_chars:
        return text
    cut = text[-max_chars:]
    space = cut.find(" ")
    return cut[space + 1:] if 0 <= space < len(cut) // 2 else cut


def build_cloze(documents: list[str], num_examples: int = 200, seed: int = 1234, context_chars: int = 100,
                min_context_chars: int = 40) -> list[ClozeExample]:
    """LAMBADA-style examples (deterministic for a seed), at most a few per document."""
    rng = random.Random(seed)
    candidates = []
    for d, text in enumerate(documents):
        for m in _WORD.finditer(text):
            start = m.start()
            if start < min_context_chars or text[start - 1] != " ":
                continue
            end = m.end()
            if end < len(text) and text[end].isalnum():
                continue
            context = _trim_left(text[:start - 1], context_chars)
            if len(context) < min_context_chars or re.search(rf"\b{m.group(0)}\b", context) is None:
                continue
            candidates.append((d, context, " " + m.group(0)))
    rng.shuffle(candidates)
    per_doc: dict[int, int] = {}
    out = []
    for d, context, target in candidates:
        if per_doc.get(d, 0) >= 25:
            continue
        per_doc[d] = per_doc.get(d, 0) + 1
        out.append(ClozeExample(context, target))
        if len(out) >= num_examples:
            break
    return out


def _sentences(text: str, min_chars: int, max_chars: int):
    """(boundary offset, separator, sentence) of sentences that start after a boundary."""
    for m in _SENTENCE_START.finditer(text):
        begin = m.end()
        rest = text[begin:begin + max_chars + 1]
        stop = re.search(r"[.!?](?=\s|$)", rest)
        if stop is None or stop.end() < min_chars:
            continue
        sentence = rest[:stop.end()]
        if "\n\n" in sentence:
            continue
        yield m.start(), m.group(0), sentence


def build_continuation(documents: list[str], num_examples: int = 200, seed: int = 1234, num_choices: int = 4,
                       context_chars: int = 80, min_chars: int = 15, max_chars: int = 48,
                       min_context_chars: int = 30) -> list[ChoiceExample]:
    """HellaSwag-style examples (deterministic for a seed): true next sentence vs other documents'."""
    rng = random.Random(seed + 1)
    items = []  # (doc, context, separator, sentence)
    for d, text in enumerate(documents):
        for offset, sep, sentence in _sentences(text, min_chars, max_chars):
            context = _trim_left(text[:offset], context_chars)
            if len(context) >= min_context_chars:
                items.append((d, context, " " if sep.startswith(" ") else sep, sentence))
    if len({d for d, *_ in items}) < num_choices:
        return []
    order = list(range(len(items)))
    rng.shuffle(order)
    by_len = sorted(range(len(items)), key=lambda i: len(items[i][3]))
    out = []
    used = set()
    for i in order:
        d, context, sep, sentence = items[i]
        if (d, sentence) in used:
            continue
        # distractors: sentences of other documents of similar length (the nearest lengths)
        pos = by_len.index(i)
        pool = [j for j in by_len[max(0, pos - 40):pos + 40] if items[j][0] != d and items[j][3] != sentence]
        rng.shuffle(pool)
        picked, texts = [], {sentence}
        for j in pool:
            if items[j][3] not in texts:
                picked.append(items[j][3])
                texts.add(items[j][3])
            if len(picked) == num_choices - 1:
                break
        if len(picked) < num_choices - 1:
            continue
        label = rng.randrange(num_choices)
        endings = picked[:label] + [sentence] + picked[label:]
        used.add((d, sentence))
        out.append(ChoiceExample(context, [sep + e for e in endings], label))
        if len(out) >= num_examples:
            break
    return out


def build_tasks(documents: list[str], names, num_examples: int = 200, seed: int = 1234,
                max_length: Optional[int] = None) -> dict:
    """{name: examples}; `max_length` (model tokens) scales passage lengths for short-window models."""
    scale = 1.0 if max_length is None else min(1.0, max_length / 128)
    out = {}
    for name in names:
        if name == "cloze":
            out[name] = build_cloze(documents, num_examples, seed, context_chars=max(24, int(100 * scale)),
                                    min_context_chars=max(16, int(40 * scale)))
        elif name == "continuation":
            out[name] = build_continuation(documents, num_examples, seed, context_chars=max(24, int(80 * scale)),
                                           max_chars=max(20, int(48 * scale)),
                                           min_context_chars=max(12, int(30 * scale)))
        else:
            raise ConfigError(f"--tasks: unknown task {name!r}; choose from {', '.join(TASKS)}")
    return out


# ----------------------------------------------------------------------------------------------
# Scoring


def score_choices(scorer, examples: list[ChoiceExample], mc_samples: int = 32, method: str = "mc") -> dict:
    """Multiple-choice accuracy: acc (summed log-likelihood) and acc_norm (per byte of the choice)."""
    correct = correct_norm = 0
    for ex in examples:
        ctx = scorer.encode(ex.context)
        scores = scorer.score_many([(ctx, scorer.encode(c)) for c in ex.choices], method=method,
                                   mc_samples=mc_samples, greedy=False)
        lp = np.array([s.logprob for s in scores])
        norm = lp / np.array([max(1, len(c.encode("utf-8"))) for c in ex.choices])
        correct += int(int(lp.argmax()) == ex.label)
        correct_norm += int(int(norm.argmax()) == ex.label)
    n = len(examples)
    return {"acc": correct / n if n else float("nan"), "acc_norm": correct_norm / n if n else float("nan"),
            "n": n, "chance": 1.0 / len(examples[0].choices) if n else float("nan")}


def score_cloze(scorer, examples: list[ClozeExample], mc_samples: int = 32, method: str = "mc",
                greedy_order: str = "confidence") -> dict:
    """Cloze accuracy (greedy exact match of the word, diffusion decoding in `greedy_order`) and mean
    NLL of the word."""
    hits, nll = 0, 0.0
    for ex in examples:
        s = scorer.score(scorer.encode(ex.context), scorer.encode(ex.target), method=method,
                         mc_samples=mc_samples, greedy=True, greedy_order=greedy_order)
        hits += int(s.is_greedy)
        nll -= s.logprob
    n = len(examples)
    return {"acc": hits / n if n else float("nan"), "nll": nll / n if n else float("nan"), "n": n}


def evaluate_tasks(scorer, tasks: dict, mc_samples: int = 32, method: str = "mc",
                   greedy_order: str = "confidence") -> dict:
    """{task: metrics} for the examples of `build_tasks`; `greedy_order` is cloze's diffusion decoding order."""
    out = {}
    for name, examples in tasks.items():
        if name == "cloze":
            out[name] = score_cloze(scorer, examples, mc_samples, method, greedy_order)
        else:
            out[name] = score_choices(scorer, examples, mc_samples, method)
    return out
