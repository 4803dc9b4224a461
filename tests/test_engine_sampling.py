"""The built-in engine's draw: the temperature-scaled distribution, truncated or not."""

from __future__ import annotations

import torch

from opd_core.engine.sampling import RowSampling, sample_tokens

DRAWS = 20_000


def _frequencies(logits: torch.Tensor, row: RowSampling) -> torch.Tensor:
    """How often each token is drawn over DRAWS seeded rows of the same logits."""
    batch = logits.expand(DRAWS, -1)
    generators = [torch.Generator().manual_seed(seed) for seed in range(DRAWS)]
    tokens = sample_tokens(batch, [row] * DRAWS, generators)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / DRAWS


def test_an_untruncated_draw_follows_the_softmax():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0, -3.0]])
    for temperature in (1.0, 0.7):
        row = RowSampling(temperature=temperature)
        expected = torch.softmax(logits[0] / temperature, -1)
        # 3.5 standard errors of a DRAWS-sample frequency.
        tolerance = 3.5 * (expected * (1 - expected) / DRAWS).sqrt() + 1e-3
        assert ((_frequencies(logits, row) - expected).abs() <= tolerance).all()


def test_a_truncated_draw_keeps_only_what_top_k_and_top_p_keep():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0, -3.0]])
    probs = torch.softmax(logits[0], -1)
    top2 = _frequencies(logits, RowSampling(top_k=2))  # tokens 0 and 3
    expected = torch.zeros_like(probs)
    expected[[0, 3]] = probs[[0, 3]] / probs[[0, 3]].sum()
    assert ((top2 - expected).abs() <= 0.02).all()
    # A token is kept while the mass before it is at most top_p (SGLang's rule): a top_p
    # just below 1 - p_min drops only the least likely token.
    nucleus = _frequencies(logits, RowSampling(top_p=1 - 1.5 * probs.min().item()))
    assert nucleus[5] == 0 and (nucleus[:5] > 0).all()


def test_the_same_seed_draws_the_same_token_in_any_batch():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    alone = sample_tokens(logits, [RowSampling()], [torch.Generator().manual_seed(7)])
    others = torch.randn(3, 50)
    batch = torch.cat([others[:2], logits, others[2:]])
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 7, 3)]
    assert sample_tokens(batch, [RowSampling()] * 4, generators)[2] == alone[0]
