"""Shared fixtures: the shipped trained model (loaded once per session) and a fixed real-text prompt."""

from __future__ import annotations

import copy
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest -n 2's workers: one core each, for its subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)

PROMPT = "The capital of France is Paris. The city is known for its museums, and the river that runs through it is"


@pytest.fixture(scope="session")
def trained_model():
    """(model, tokenizer) of SmolLM2-135M, the shipped trained default model, in fp32 eval mode."""
    from bondcut.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture()
def fresh_trained_model(trained_model):
    """A private deep copy of the trained model that a test may modify in place."""
    model, tokenizer = trained_model
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def prompt_ids(trained_model):
    _, tokenizer = trained_model
    return tokenizer(PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="session")
def heldout_text():
    """Held-out press reportage of the Brown corpus (files ca01, ca11, ca21, ca31, ca41; ~10k words, ~14k tokens)."""
    from bondcut.corpus import split_text

    return split_text("heldout", genres="a")
