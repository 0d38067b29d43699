"""semantic_inference: Mask2Former's rule over valid queries, checked against a loop."""

import pytest
import torch

from hiervl.modeling.inference import semantic_inference

B, Q, K, H, W = 2, 5, 3, 4, 6


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Q, K + 1, generator=g)
    masks = torch.randn(B, Q, H, W, generator=g)
    valid = torch.tensor([[True, False, True, True, False], [True, True, True, True, True]])
    return logits, masks, valid


def test_matches_explicit_loop():
    logits, masks, valid = _inputs()
    scores = semantic_inference(logits, masks, valid)
    assert scores.shape == (B, K, H, W)
    expected = torch.zeros(B, K, H, W)
    for b in range(B):
        for q in range(Q):
            if not valid[b, q]:
                continue
            probs = logits[b, q].softmax(-1)
            for k in range(K):  # the no-object column (index K) is dropped
                expected[b, k] += probs[k] * masks[b, q].sigmoid()
    torch.testing.assert_close(scores, expected)


def test_invalid_queries_contribute_nothing():
    logits, masks, valid = _inputs()
    ref = semantic_inference(logits, masks, valid)
    logits2, masks2 = logits.clone(), masks.clone()
    logits2[~valid] = 50 * torch.randn_like(logits2[~valid])
    masks2[~valid] = 50 * torch.randn_like(masks2[~valid])
    torch.testing.assert_close(semantic_inference(logits2, masks2, valid), ref)


def test_single_confident_query_reproduces_its_mask():
    logits = torch.full((1, 1, K + 1), -30.0)
    logits[0, 0, 1] = 30.0
    masks = torch.randn(1, 1, H, W)
    scores = semantic_inference(logits, masks, torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(scores[0, 1], masks[0, 0].sigmoid())
    assert scores[0, [0, 2]].abs().max() < 1e-6


def test_no_object_queries_score_low_and_output_is_float32():
    logits, masks, valid = _inputs()
    logits[..., K] = 40.0  # every query is confident "no object"
    scores = semantic_inference(logits.half(), masks.half(), valid)
    assert scores.dtype == torch.float32
    assert scores.max() < 1e-6


def test_shape_errors():
    logits, masks, valid = _inputs()
    with pytest.raises(ValueError, match="inconsistent shapes"):
        semantic_inference(logits, masks[:, :-1], valid)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        semantic_inference(logits, masks, valid[:, :-1])
