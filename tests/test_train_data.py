"""The training stream: a seeded order of sequences, a pure function of the step, that a later heal can continue."""

import numpy as np
import pytest
import torch

from bondcut.heal import HealConfig
from bondcut.train_data import SequenceStream

IDS = np.arange(10 * 16, dtype=np.int32)  # 10 sequences of 16 tokens: 5 batches of 2 per pass


def test_a_pass_visits_every_sequence_once_and_the_next_pass_reorders():
    stream = SequenceStream(IDS, 16, 2, seed=3)
    first = torch.cat([stream.rows(s) for s in range(5)])
    second = torch.cat([stream.rows(s) for s in range(5, 10)])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("first_batch", [0, 2, 4, 7])
def test_first_batch_continues_the_same_order(first_batch):
    whole = SequenceStream(IDS, 16, 2, seed=3)
    later = SequenceStream(IDS, 16, 2, seed=3, first_batch=first_batch)
    for step in range(6):  # across the end of a pass as well
        assert torch.equal(later.rows(step), whole.rows(step + first_batch))
        assert torch.equal(later.batch(step, rank=1, world=2), whole.batch(step + first_batch, rank=1, world=2))


def test_negative_first_batch_is_refused():
    with pytest.raises(ValueError, match="first_batch"):
        HealConfig(first_batch=-1)
