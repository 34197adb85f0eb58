"""Build the zero-shot task items from held-out Brown corpus sentences: pure functions, fixed seeds.

Both builders take ``(file, runs)`` pairs (see :func:`bondcut.zeroshot.sentences.split_runs`) and return
JSON-ready dicts in a seeded random order, so any prefix (lm-eval's ``limit``) mixes all genres.

* :func:`build_cloze` — ``brown_cloze``: the true next sentence of a passage among four options.
* :func:`build_lastword` — ``brown_lastword``: the last word of a passage, LAMBADA-style
  (Paperno et al., 2016, "The LAMBADA dataset: word prediction requiring a broad discourse context").
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Sequence

from ..corpus import detokenize
from .sentences import Sentence

Runs = Sequence[Sequence[Sentence]]
Files = Sequence[tuple[str, Runs]]

N_ITEMS = 500
SEED = 1234
CLOZE_CONTEXT_WORDS = (40, 120)
CLOZE_OPTION_WORDS = (6, 40)
CLOZE_OPTION_CHARS = (30, 250)
CLOZE_LENGTH_TOLERANCE = 0.25  # distractors are within ±25 % of the true sentence's characters
N_CHOICES = 4
LASTWORD_PASSAGE_WORDS = (50, 150)
LASTWORD_MIN_LETTERS = 3


def _is_option(sentence: Sentence, exclude: frozenset[str]) -> bool:
    """A sentence fit to be a cloze option: complete, 6-40 words, 30-250 characters, not in ``exclude``."""
    lo_words, hi_words = CLOZE_OPTION_WORDS
    lo_chars, hi_chars = CLOZE_OPTION_CHARS
    return (
        sentence.is_complete()
        and lo_words <= sentence.n_words <= hi_words
        and lo_chars <= len(sentence.text) <= hi_chars
        and sentence.text not in exclude
    )


def _check_n_items(n_items: int) -> None:
    if not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"n_items must be a positive int, got {n_items!r}; e.g. build_cloze(files, n_items=500)")


# ------------------------------------------------------------------------------------------------- cloze


def _cloze_passages(files: Files, exclude: frozenset[str]) -> list[tuple[str, list[Sentence], Sentence]]:
    """Non-overlapping (file, context sentences, next sentence) triples, contexts of 40-120 words."""
    lo, hi = CLOZE_CONTEXT_WORDS
    found = []
    for name, runs in files:
        for run in runs:
            start = 0
            while start < len(run):
                end, words = start, 0
                while end < len(run) and words < lo:
                    words, end = words + run[end].n_words, end + 1
                if words < lo or end >= len(run):
                    break
                if words > hi or not _is_option(run[end], exclude):
                    start += 1
                    continue
                found.append((name, list(run[start:end]), run[end]))
                start = end + 1
    return found


def _distractors(pool: list[tuple[int, str, str]], gold: Sentence, rng: random.Random) -> list[tuple[str, str]] | None:
    """Three (text, file) options from other files within ±25 % of ``gold``'s length; None if too few.

    ``pool`` is every option sentence as ``(characters, text, file)``, sorted. The gold sentence's length
    rank among the 4 options is drawn uniformly (that many distractors are shorter, the rest longer), so
    neither "pick the shortest" nor "pick the longest" beats chance.
    """
    size = len(gold.text)
    lengths = [length for length, _, _ in pool]
    lo = bisect.bisect_left(lengths, size * (1 - CLOZE_LENGTH_TOLERANCE))
    mid_lo, mid_hi = bisect.bisect_left(lengths, size), bisect.bisect_right(lengths, size)
    hi = bisect.bisect_right(lengths, size * (1 + CLOZE_LENGTH_TOLERANCE))

    def others(entries: list[tuple[int, str, str]]) -> list[tuple[str, str]]:
        return sorted({(text, file) for _, text, file in entries if file != gold.file and text != gold.text})

    n_shorter = rng.randrange(N_CHOICES)
    shorter, longer = others(pool[lo:mid_lo]), others(pool[mid_hi:hi])
    if len(shorter) < n_shorter or len(longer) < N_CHOICES - 1 - n_shorter:
        return None
    return rng.sample(shorter, n_shorter) + rng.sample(longer, N_CHOICES - 1 - n_shorter)


def build_cloze(
    files: Files, n_items: int = N_ITEMS, seed: int = SEED, exclude: frozenset[str] = frozenset()
) -> list[dict]:
    """``brown_cloze`` items: which of 4 sentences truly follows a 40-120-word passage?

    The context is consecutive sentences of one file; the gold option is the sentence that follows it; the
    3 distractors are sentences of *other* files within ±25 % of the gold one's characters, and the gold's
    length rank among the options is uniform, so length gives nothing away. Options are complete sentences
    of 6-40 words with a leading space; sentences in ``exclude`` (e.g. those also found in training text)
    never become options. Passages do not overlap; ``n_items`` of them are drawn with ``seed``, which also
    draws the gold index.

    Each item: ``{"id", "file", "context", "choices", "label", "choice_files"}``.
    """
    _check_n_items(n_items)
    rng = random.Random(seed)
    pool = sorted(
        (len(sentence.text), sentence.text, name)
        for name, runs in files
        for run in runs
        for sentence in run
        if _is_option(sentence, exclude)
    )
    passages = _cloze_passages(files, exclude)
    items = []
    for name, context, gold in rng.sample(passages, len(passages)):
        distractors = _distractors(pool, gold, rng)
        if distractors is None:
            continue
        label = rng.randrange(N_CHOICES)
        distractors = rng.sample(distractors, len(distractors))  # their order must not tell which are shorter
        options = [*distractors[:label], (gold.text, name), *distractors[label:]]
        items.append({
            "id": f"{name}:{gold.line}",
            "file": name,
            "context": " ".join(sentence.text for sentence in context),
            "choices": [f" {text}" for text, _ in options],
            "label": label,
            "choice_files": [file for _, file in options],
        })  # fmt: skip
        if len(items) == n_items:
            break
    return items


# ---------------------------------------------------------------------------------------------- last word


def final_word_split(sentence: Sentence) -> tuple[str, str] | None:
    """``(text before the final word, final word)`` if the sentence ends "... word." (or ? ! and quotes).

    The word must be alphabetic with at least 3 letters and follow a space in the text; otherwise None.
    """
    words = list(sentence.words)
    while words and words[-1] in ("''", "'"):
        words.pop()
    if len(words) < 3 or words[-1] not in (".", "?", "!"):
        return None
    word = words[-2]
    if not (word.isalpha() and len(word) >= LASTWORD_MIN_LETTERS):
        return None
    before = detokenize(words[:-2])
    if not sentence.text.startswith(f"{before} {word}"):
        return None  # e.g. the word opens a quotation: no clean space to split at
    return before, word


def _join(sentences: Sequence[Sentence], tail: str) -> str:
    return " ".join([sentence.text for sentence in sentences] + [tail])


def _appears_in(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


def build_lastword(
    files: Files, n_items: int = N_ITEMS, seed: int = SEED, exclude: frozenset[str] = frozenset()
) -> list[dict]:
    """``brown_lastword`` items (LAMBADA-style): predict the final word of a 50-150-word passage.

    A passage is consecutive sentences of one file ending with a sentence whose final word is alphabetic,
    has at least 3 letters and also appears earlier in the passage (case-insensitive, whole word): LAMBADA's
    "guessable from the wider context" property, approximated without human filtering. The context ends
    just before that word (and drops the punctuation after it); the target is the word with a leading
    space, scored as in lm-eval's ``lambada_openai`` (acc = the greedy continuation is exactly the target).
    Passages do not overlap; final sentences in ``exclude`` are skipped; ``n_items`` are drawn with ``seed``.

    Each item: ``{"id", "file", "context", "target"}``.
    """
    _check_n_items(n_items)
    lo, hi = LASTWORD_PASSAGE_WORDS
    passages = []
    for name, runs in files:
        for run in runs:
            free = 0  # first sentence not yet used by a passage of this run
            for end, last in enumerate(run):
                split = final_word_split(last)
                if split is None or last.text in exclude:
                    continue
                before, word = split
                start, words = end, last.n_words
                # grow the passage backwards to 50 words, then on (up to 150) until the word has appeared
                while start > free and (words < lo or not _appears_in(word, _join(run[start:end], before))):
                    if words + run[start - 1].n_words > hi:
                        break
                    start, words = start - 1, words + run[start - 1].n_words
                context = _join(run[start:end], before)
                if words < lo or not _appears_in(word, context):
                    continue
                passages.append({"id": f"{name}:{last.line}", "file": name, "context": context, "target": f" {word}"})
                free = end + 1
    rng = random.Random(seed)
    return rng.sample(passages, min(n_items, len(passages)))
