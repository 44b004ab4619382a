"""Sentence splitting for `preprocess --split-sentences`, as Megatron-LM's `tools/preprocess_data.py` does it.

NLTK's trained punkt model for a language (or, opt-in, punkt with no model); `keep_newlines` keeps the
whitespace after each sentence, newlines included, with Megatron-LM's `CustomLanguageVars`.
"""

from __future__ import annotations

import functools
import os

from megatron_dataeff.data.inputs import PreprocessError

SENTENCE_SPLITTERS = ("punkt", "punkt-untrained")
_SPLIT_CHARS = 1_000_000  # Megatron-LM hands a text to the splitter in pieces of this many characters

# Megatron-LM's CustomLanguageVars (tools/preprocess_data.py, from
# https://stackoverflow.com/questions/33139531): `\s*` instead of `\s+` keeps the whitespace after a
# sentence end, newlines included, at the end of that sentence instead of dropping it.
_KEEP_NEWLINES_PERIOD_CONTEXT = r"""
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                       #  <-- THIS is what I changed
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)     #  <-- Normally you would have \s+ here
        ))"""


@functools.lru_cache(maxsize=1)
def _keep_newlines_vars_class():
    from nltk.tokenize.punkt import PunktLanguageVars

    return type("CustomLanguageVars", (PunktLanguageVars,), {"_period_context_fmt": _KEEP_NEWLINES_PERIOD_CONTEXT})


def _punkt_model(lang: str):
    """NLTK's trained punkt tokenizer for `lang`: the `punkt_tab` data (NLTK >= 3.8.2, which also
    serves Megatron-LM's `nltk.load("tokenizers/punkt/{lang}.pickle")`), else the old pickle."""
    import nltk

    try:
        from nltk.tokenize.punkt import PunktTokenizer
    except ImportError:  # NLTK < 3.8.2 has only the pickled models
        return nltk.data.load(f"tokenizers/punkt/{lang}.pickle")
    try:
        return PunktTokenizer(lang)
    except LookupError:
        return nltk.data.load(f"tokenizers/punkt/{lang}.pickle")  # NLTK 3.8.2-3.8.x still reads the pickle


def make_sentence_splitter(kind: str = "punkt", lang: str = "english", keep_newlines: bool = False):
    """An object whose `tokenize(text)` gives the sentences of `text`, as Megatron-LM builds it.

    kind "punkt": NLTK's trained punkt model for `lang` (what Megatron-LM uses; needs `pip install nltk`
    and its data, `python -m nltk.downloader punkt_tab`). kind "punkt-untrained": punkt with no model
    (no abbreviations or collocations known, so e.g. "Dr. Smith" is split after "Dr."): needs only the
    nltk package, and its output is NOT the same as Megatron-LM's."""
    if kind not in SENTENCE_SPLITTERS:
        raise PreprocessError(f"sentence splitter must be one of {SENTENCE_SPLITTERS}, got {kind!r}")
    try:
        from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    except ImportError as exc:
        raise PreprocessError("--split-sentences needs NLTK: pip install nltk"
                              + (" (and its punkt data: python -m nltk.downloader punkt_tab)"
                                 if kind == "punkt" else "")) from exc
    if kind == "punkt":
        try:
            model = _punkt_model(lang)
        except (LookupError, OSError, ValueError) as exc:
            import nltk

            raise PreprocessError(
                f"--split-sentences: NLTK's punkt model for {lang!r} is not installed (searched "
                f"{os.pathsep.join(map(str, nltk.data.path))}). Install it with: python -m nltk.downloader "
                f"punkt_tab (or put tokenizers/punkt_tab/{lang}/ under a folder named by NLTK_DATA); or pass "
                f"--sentence-splitter punkt-untrained to split with no model (output not identical to "
                f"Megatron-LM's)") from exc
        params = model._params
    else:
        model, params = PunktSentenceTokenizer(), PunktParameters()
    if not keep_newlines:
        return model
    return PunktSentenceTokenizer(train_text=params, lang_vars=_keep_newlines_vars_class()())


def split_sentences(splitter, text) -> list[str]:
    """The sentences of `text` (a string, or a list of strings split one by one), in Megatron-LM's way:
    the text goes to the splitter in pieces of 1,000,000 characters."""
    texts = [text] if isinstance(text, str) else text
    return [sent for t in texts for i in range(0, len(t), _SPLIT_CHARS)
            for sent in splitter.tokenize(t[i:i + _SPLIT_CHARS])]
