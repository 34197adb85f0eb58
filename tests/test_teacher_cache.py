"""Cached top-k teacher logits: the sparse distillation term against the dense one, and healing that fills the
cache once and then never runs the teacher, with the same curve."""

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import bondcut
from bondcut import CompressConfig
from bondcut.heal import HealConfig, distillation_loss, heal
from bondcut.teacher_cache import TeacherCache, sparse_distillation_loss

SMALL = dict(tokens=64 * 4 * 3, seq_len=64, batch_size=4, micro_batch=2, lr=3e-4, eval_tokens=256, distill=0.5)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 40), temperature=st.floats(0.5, 4.0))
def test_sparse_term_with_every_token_is_the_dense_term(seed, vocab, temperature):
    gen = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(2, 3, vocab, generator=gen) * 3, torch.randn(2, 3, vocab, generator=gen) * 3
    top = teacher.topk(vocab, dim=-1)
    sparse = sparse_distillation_loss(student, top.values, top.indices, temperature)
    assert float(sparse) == pytest.approx(float(distillation_loss(student, teacher, temperature)), rel=1e-4, abs=1e-6)


def test_sparse_term_is_zero_when_the_student_is_the_teacher_on_its_top_tokens():
    logits = torch.randn(2, 5, 50)
    top = logits.topk(8, dim=-1)
    masked = torch.full_like(logits, -1e4).scatter(-1, top.indices, top.values)  # the student puts no mass elsewhere
    assert float(sparse_distillation_loss(masked, top.values, top.indices, 1.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(sparse_distillation_loss(logits, top.values, top.indices, 1.0)) > 0  # the tail costs the student


@pytest.fixture()
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr("bondcut.teacher_cache.cache_dir", lambda: tmp_path)
    return tmp_path / "teacher"


def test_second_run_reads_the_cache_and_never_runs_the_teacher(trained_model, private_cache):
    teacher, tokenizer = trained_model
    student = copy.deepcopy(teacher)
    bondcut.compress(student, CompressConfig(chi=16, sites="lowrank", include=["re:layers\\.1\\.mlp\\."]))
    calls = []
    hook = teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        curves = []
        for _ in range(2):
            calls.clear()
            healed = copy.deepcopy(student)
            result = heal(healed, tokenizer, HealConfig(**SMALL, teacher_top_k=16), teacher=teacher)
            curves.append(([p["loss"] for p in result.curve], len(calls)))
    finally:
        hook.remove()
    (first, first_calls), (second, second_calls) = curves
    assert first_calls == 3 * 2  # one teacher forward per micro-batch of the first run
    assert second_calls == 0
    assert second == first  # both runs distil from the same stored fp16 values
    assert len(list(private_cache.iterdir())) == 1


def test_top_k_beyond_the_vocabulary_is_a_clear_error(trained_model, private_cache):
    teacher, _ = trained_model
    with pytest.raises(ValueError, match="vocabulary size"):
        TeacherCache(teacher, torch.zeros(4, 8, dtype=torch.long), k=10**7)
