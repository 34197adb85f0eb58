"""Sentences of Brown corpus files, taken from the corpus's own sentence lines (one tagged sentence a line).

The zero-shot task builders need real sentence boundaries; the source files give them exactly, so nothing
here guesses them from punctuation. Headlines (``-hl`` tags), lines of under 3 tokens and lines without
letters are dropped and break the text into *runs*: a passage is only ever taken from consecutive sentences
of one run.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from ..corpus import brown_dir, detokenize, drop_doubled_punctuation, split_files

_TERMINALS = {".", "?", "!"}
_CLOSING_QUOTES = {"''", "'"}
_STARTS_LIKE_A_SENTENCE = re.compile(r'"?[A-Z]')


@dataclass(frozen=True)
class Sentence:
    """One corpus sentence: its file, its line number there, its tokens (tags stripped) and its text."""

    file: str
    line: int
    words: tuple[str, ...]
    text: str

    @property
    def n_words(self) -> int:
        """Whitespace-separated words of the text (how passage lengths are counted)."""
        return len(self.text.split())

    def is_complete(self) -> bool:
        """True for a well-formed sentence: starts with a capital (or a quote and one), ends with . ? or !."""
        words = list(self.words)
        while words and words[-1] in _CLOSING_QUOTES:
            words.pop()
        return bool(words) and words[-1] in _TERMINALS and _STARTS_LIKE_A_SENTENCE.match(self.text) is not None


def _is_text(tokens: list[tuple[str, str]]) -> bool:
    """A line of running text: no headline tag, at least 3 tokens, some letters."""
    return (
        len(tokens) >= 3
        and not any(tag.endswith("-hl") for _, tag in tokens)
        and any(char.isalpha() for word, _ in tokens for char in word)
    )


def read_runs(path: str | Path) -> list[list[Sentence]]:
    """The runs of consecutive running-text sentences of one tagged corpus file (see the module docstring)."""
    path = Path(path)
    runs: list[list[Sentence]] = [[]]
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        tokens = [tuple(token.rsplit("/", 1)) for token in line.split()]
        if not tokens:
            continue  # blank lines separate paragraphs; a run goes on across them
        if not _is_text(tokens):
            runs.append([])
            continue
        words = tuple(drop_doubled_punctuation([word for word, _ in tokens]))
        runs[-1].append(Sentence(file=path.name, line=number, words=words, text=detokenize(list(words))))
    return [run for run in runs if run]


@functools.cache
def split_runs(split: str) -> tuple[tuple[str, tuple[tuple[Sentence, ...], ...]], ...]:
    """``(file, runs)`` for every file of ``split`` (all genres), in file order; cached per process."""
    root = brown_dir()
    return tuple((name, tuple(tuple(run) for run in read_runs(root / name))) for name in split_files(split))


def split_sentence_texts(*splits: str) -> frozenset[str]:
    """The texts of every sentence in the given splits, to drop held-out sentences that also occur there."""
    return frozenset(
        sentence.text for split in splits for _, runs in split_runs(split) for run in runs for sentence in run
    )
