"""The one KL definition the search, replay, distillation and benches share, against torch's own."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bondcut.divergence import kl_per_position, next_token_logprobs, paired_difference


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(2, 40), st.integers(0, 10_000))
def test_kl_per_position_matches_torch_kl_div_and_is_zero_only_at_equality(positions, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    reference = torch.log_softmax(torch.randn(positions, vocab, generator=g) * 3, -1)
    other = torch.log_softmax(torch.randn(positions, vocab, generator=g) * 3, -1)
    kl = kl_per_position(reference, other)
    expected = F.kl_div(other, reference, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl, expected)
    assert (kl >= -1e-6).all()
    torch.testing.assert_close(kl_per_position(reference, reference), torch.zeros(positions))


class Bigram(torch.nn.Module):
    """A tiny causal LM with an HF-style output (``.logits``): the next token depends on this token only."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, ids, use_cache=False):
        return type("Out", (), {"logits": self.table(ids)})()


def test_next_token_logprobs_drops_the_last_position_and_batches_alike():
    torch.manual_seed(0)
    model, windows = Bigram(), torch.randint(0, 11, (5, 7))
    whole = next_token_logprobs(model, windows)
    assert whole.shape == (5, 6, 11)
    torch.testing.assert_close(whole.exp().sum(-1), torch.ones(5, 6))
    torch.testing.assert_close(next_token_logprobs(model, windows, batch=2), whole)
    torch.testing.assert_close(whole[2, 3], torch.log_softmax(model.table.weight[windows[2, 3]], -1))


def test_paired_difference_is_the_mean_and_standard_error_of_the_differences():
    a = torch.tensor([0.10, 0.20, 0.30, 0.40])
    b = a + torch.tensor([0.01, 0.03, 0.01, 0.03])
    mean, se = paired_difference(a, b)
    assert abs(mean - 0.02) < 1e-7
    assert abs(se - 0.011547005 / 2) < 1e-7  # sample std of (.01,.03,.01,.03) is 0.011547, over sqrt(4)
    assert paired_difference(a, a + 0.05)[1] < 1e-7  # a constant shift is certain however noisy a is
