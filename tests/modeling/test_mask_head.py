"""DynamicMaskHead: kernel masks, scaled-cosine open-vocabulary classifier, Φ projection."""

import math

import pytest
import torch
import torch.nn.functional as F

from hiervl.modeling.mask_head import LOGIT_SCALE_MAX, DynamicMaskHead

B, Q, D, E, C = 2, 5, 32, 24, 16


def _head(**kw):
    args = dict(hidden_dim=D, mask_dim=E, clip_dim=C, kernel_mlp_layers=3, logit_scale_init=50.0)
    args.update(kw)
    return DynamicMaskHead(**args)


def _inputs(k=4, h=6, w=7):
    torch.manual_seed(0)
    return torch.randn(B, Q, D), torch.randn(B, E, h, w), torch.randn(k, C)


def test_class_logits_are_scaled_cosines_with_void():
    head = _head()
    queries, feats, text = _inputs()
    logits, _, proj = head(queries, feats, text)
    assert logits.shape == (B, Q, text.shape[0] + 1)

    phi = head.proj(queries)
    classifier = torch.cat([text, head.void_embed[None]], dim=0)
    expected = torch.empty_like(logits)
    for b in range(B):
        for q in range(Q):
            for k in range(classifier.shape[0]):
                expected[b, q, k] = 50.0 * F.cosine_similarity(phi[b, q], classifier[k], dim=0)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj, F.normalize(phi, dim=-1))
    torch.testing.assert_close(proj.norm(dim=-1), torch.ones(B, Q))


def test_masks_are_kernel_dot_pixel_features():
    head = _head()
    queries, feats, text = _inputs()
    _, masks, _ = head(queries, feats, text)
    kernels = head.kernel_mlp(queries)
    assert len(head.kernel_mlp.layers) == 3
    assert masks.shape == (B, Q, feats.shape[2], feats.shape[3])
    for b, q, y, x in [(0, 0, 0, 0), (1, 3, 5, 6), (0, 4, 2, 1)]:
        expected = torch.dot(kernels[b, q], feats[b, :, y, x])
        torch.testing.assert_close(masks[b, q, y, x], expected, rtol=1e-5, atol=1e-5)


def test_open_vocabulary_any_number_of_classes():
    head = _head()
    queries, feats, text = _inputs(k=3)
    small, masks_small, _ = head(queries, feats, text)
    bigger_vocab = torch.cat([text, torch.randn(4, C)])
    big, masks_big, _ = head(queries, feats, bigger_vocab)
    assert small.shape[-1] == 4 and big.shape[-1] == 8
    # Shared classes and the void column score the same whatever else is in the list.
    torch.testing.assert_close(small[..., :3], big[..., :3])
    torch.testing.assert_close(small[..., -1], big[..., -1])
    torch.testing.assert_close(masks_small, masks_big)


def test_class_embedding_scale_does_not_matter():
    head = _head()
    queries, feats, text = _inputs()
    a, _, _ = head(queries, feats, text)
    b, _, _ = head(queries, feats, 7.0 * text)
    torch.testing.assert_close(a, b)


def test_logit_scale_init_and_clamp():
    head = _head(logit_scale_init=20.0)
    assert head.scale().item() == pytest.approx(20.0)
    with torch.no_grad():
        head.logit_scale.fill_(math.log(10 * LOGIT_SCALE_MAX))
    assert head.scale().item() == pytest.approx(LOGIT_SCALE_MAX)
    queries, feats, text = _inputs()
    logits, _, _ = head(queries, feats, text)
    assert logits.abs().max() <= LOGIT_SCALE_MAX + 1e-4
    with pytest.raises(ValueError, match="LOGIT_SCALE_INIT"):
        _head(logit_scale_init=0.0)


def test_gradients_reach_every_parameter():
    head = _head()
    queries, feats, text = _inputs()
    logits, masks, proj = head(queries, feats, text)
    (logits.logsumexp(-1).sum() + masks.sigmoid().sum() + proj[..., 0].sum()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_shape_errors():
    head = _head()
    queries, feats, text = _inputs()
    with pytest.raises(ValueError, match="mask_dim"):
        head(queries, feats[:, :-1], text)
    with pytest.raises(ValueError, match="class_embed"):
        head(queries, feats, text[:, :-1])
