"""masked_attention: same result as an explicit masked softmax, also for long masked runs."""

import math

import torch

from hiervl.modeling.attention import masked_attention


def _explicit(q, k, v, allowed):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


def test_matches_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    allowed = torch.rand(2, 1, 5, 7) > 0.5
    allowed[..., 0] = True
    out = masked_attention(q, k, v, allowed)
    torch.testing.assert_close(out, _explicit(q, k, v, allowed.expand(2, 3, 5, 7)))
    torch.testing.assert_close(masked_attention(q, k, v, None), _explicit(q, k, v, allowed | True))


def test_first_thousand_keys_masked_stays_finite():
    """torch 2.3's CPU kernel returns NaN with a boolean mask when the first 512 keys of a
    query are masked; the additive mask must not."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 1030, 16), torch.randn(1, 2, 1030, 16)
    allowed = torch.zeros(1, 1, 4, 1030, dtype=torch.bool)
    allowed[..., 1000:] = True
    out = masked_attention(q, k, v, allowed)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _explicit(q, k, v, allowed.expand(1, 2, 4, 1030)))
