"""Semi-supervised losses against hand computations on tiny maps (no detectron2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from hiervl.modeling.ssl_losses import (
    UNIMATCH_WEIGHTS,
    confident_fraction,
    consistency_loss,
    entropy_loss,
    maskclip_loss,
    maskclip_pseudo_labels,
    maskclip_weight,
    pseudo_labels,
    valid_pixels,
)


def _probs_1x4():
    # (B=1, K=2, H=1, W=4): class-0 probabilities 0.9, 0.6, 0.2, 0.7.
    p0 = torch.tensor([0.9, 0.6, 0.2, 0.7])
    return torch.stack([p0, 1 - p0]).reshape(1, 2, 1, 4)


def test_pseudo_labels_argmax_and_confidence():
    probs = _probs_1x4().requires_grad_()
    labels, conf = pseudo_labels(probs)
    assert labels.tolist() == [[[0, 0, 1, 0]]]
    assert torch.allclose(conf, torch.tensor([[[0.9, 0.6, 0.8, 0.7]]]))
    assert not conf.requires_grad and labels.dtype == torch.long


def test_valid_pixels_integer_and_bool_maps():
    ignore = torch.tensor([[[0, 255, 3]]])
    assert valid_pixels(ignore).tolist() == [[[True, False, True]]]
    assert valid_pixels(ignore == 255).tolist() == [[[True, False, True]]]


def test_pixel_mode_ignores_unconfident_and_divides_by_all_valid():
    probs = _probs_1x4().requires_grad_()
    labels = torch.tensor([[[0, 1, 1, 0]]])
    conf = torch.tensor([[[0.99, 0.50, 0.97, 0.99]]])
    ignore = torch.tensor([[[0, 0, 0, 255]]])
    loss = consistency_loss(probs, labels, conf, ignore, conf_threshold=0.95)
    # Confident valid pixels: 0 (p=0.9) and 2 (p=0.8); valid pixels: 3 (pixel 3 is padding).
    expected = (-math.log(0.9) - math.log(0.8)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # The mappers' bool ignore_mask (True = padding) means the same.
    as_bool = consistency_loss(probs, labels, conf, ignore == 255, conf_threshold=0.95)
    assert torch.equal(as_bool, loss)

    loss.backward()
    grad = probs.grad[0, :, 0]
    assert torch.all(grad[:, 1] == 0) and torch.all(grad[:, 3] == 0)
    assert grad[0, 0].item() == pytest.approx(-1 / (3 * 0.9), rel=1e-5)


def test_pixel_mode_matches_unimatch_reference_on_random_maps():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=g)
    probs = logits.softmax(dim=1)
    labels = torch.randint(0, 5, (2, 6, 7), generator=g)
    conf = torch.rand(2, 6, 7, generator=g)
    ignore = torch.where(torch.rand(2, 6, 7, generator=g) < 0.2, 255, 0)
    ours = consistency_loss(probs, labels, conf, ignore, conf_threshold=0.5)
    # UniMatch: CE(reduction="none") * (conf >= thr & valid), summed, / #valid.
    ce = F.cross_entropy(logits, labels, reduction="none")
    ref = (ce * ((conf >= 0.5) & (ignore != 255))).sum() / (ignore != 255).sum()
    assert torch.allclose(ours, ref, atol=1e-5)


def test_pixelavg_by_hand():
    # Image 0: pixels (p_label, conf) = (0.5, 0.8), (0.25, 0.6); image 1: (0.5, 1.0), (0.1, 0.4),
    # and an ignored pixel whose values must not matter.
    p_label = torch.tensor([[0.5, 0.25, 0.3], [0.5, 0.1, 0.01]])
    probs = torch.stack([p_label, 1 - p_label], dim=1).reshape(2, 2, 1, 3)
    labels = torch.zeros(2, 1, 3, dtype=torch.long)
    conf = torch.tensor([[0.8, 0.6, 0.99], [1.0, 0.4, 0.01]]).reshape(2, 1, 3)
    ignore = torch.tensor([[0, 0, 255], [0, 0, 255]]).reshape(2, 1, 3)
    loss = consistency_loss(probs, labels, conf, ignore, conf_threshold=0.95, mode="pixelavg")
    ce0 = -math.log(0.5) - math.log(0.25)
    ce1 = -math.log(0.5) - math.log(0.1)
    expected = (0.7 * ce0 + 0.7 * ce1) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pixelavg_single_image_equals_semivl_formula():
    # SemiVL (batch 1, no padding): CE.sum() * mean(conf) / #valid.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 5, 5, generator=g)
    labels = torch.randint(0, 4, (1, 5, 5), generator=g)
    conf = torch.rand(1, 5, 5, generator=g)
    ignore = torch.zeros(1, 5, 5, dtype=torch.long)
    ours = consistency_loss(
        logits.softmax(1), labels, conf, ignore, conf_threshold=0.95, mode="pixelavg"
    )
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(ours, ce.sum() * conf.mean() / 25, atol=1e-5)


def test_pixelavg_takes_no_gradient_through_confidence():
    probs = _probs_1x4().requires_grad_()
    conf = torch.full((1, 1, 4), 0.5, requires_grad=True)
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    ignore = torch.zeros(1, 1, 4, dtype=torch.long)
    consistency_loss(probs, labels, conf, ignore, conf_threshold=0.9, mode="pixelavg").backward()
    assert conf.grad is None and probs.grad is not None


@pytest.mark.parametrize("mode", ["pixel", "pixelavg"])
def test_no_valid_pixel_gives_attached_zero(mode):
    probs = _probs_1x4().requires_grad_()
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    conf = torch.ones(1, 1, 4)
    ignore = torch.full((1, 1, 4), 255)
    loss = consistency_loss(probs, labels, conf, ignore, conf_threshold=0.5, mode=mode)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(probs.grad == 0)


def test_zero_probability_is_clamped_not_infinite():
    probs = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1).requires_grad_()
    labels = torch.ones(1, 1, 1, dtype=torch.long)
    loss = consistency_loss(
        probs, labels, torch.ones(1, 1, 1), torch.zeros(1, 1, 1), conf_threshold=0.5
    )
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-math.log(1e-6), rel=1e-5)
    loss.backward()
    assert torch.all(torch.isfinite(probs.grad))


def test_consistency_rejects_bad_mode_and_shapes():
    probs = _probs_1x4()
    maps = torch.zeros(1, 1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="CONSISTENCY_MODE"):
        consistency_loss(probs, maps, maps.float(), maps, conf_threshold=0.9, mode="pixelwise")
    with pytest.raises(ValueError, match="labels"):
        consistency_loss(probs, maps[..., :3], maps.float(), maps, conf_threshold=0.9)


def test_unimatch_weights_are_its_relative_weights_per_term():
    """L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp: UniMatch's ratios, without its global / 2."""
    assert UNIMATCH_WEIGHTS == {"x": 1.0, "s1": 0.25, "s2": 0.25, "fp": 0.5}


def test_confident_fraction_by_hand():
    conf = torch.tensor([[[0.9, 0.5], [0.95, 0.2]], [[0.81, 0.79], [1.0, 0.8]]])
    ignore = torch.tensor([[[False, False], [True, False]], [[False, False], [False, True]]])
    # Valid: 0.9 0.5 0.2 | 0.81 0.79 1.0 -> at 0.8: 0.9, 0.81, 1.0 pass.
    assert confident_fraction(conf, ignore, conf_threshold=0.8) == pytest.approx(3 / 6)
    assert confident_fraction(conf, ignore, conf_threshold=1.01) == 0.0
    assert confident_fraction(conf, torch.ones_like(ignore), conf_threshold=0.0) == 0.0


def test_entropy_uniform_is_log_k_and_one_hot_is_zero():
    uniform = torch.full((2, 7, 3, 3), 1 / 7)
    assert entropy_loss(uniform).item() == pytest.approx(math.log(7), rel=1e-6)
    one_hot = F.one_hot(torch.zeros(1, 2, 2, dtype=torch.long), 3).permute(0, 3, 1, 2).float()
    one_hot.requires_grad_()
    loss = entropy_loss(one_hot)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert torch.all(torch.isfinite(one_hot.grad))


def test_entropy_averages_over_valid_pixels_only():
    # Pixel 0 uniform over 2 classes (log 2), pixel 1 one-hot (0), pixel 2 ignored.
    probs = torch.tensor([[0.5, 1.0, 0.5], [0.5, 0.0, 0.5]]).reshape(1, 2, 1, 3)
    ignore = torch.tensor([[[0, 0, 255]]])
    assert entropy_loss(probs, ignore).item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    assert entropy_loss(probs, torch.full((1, 1, 3), 255)).item() == 0.0


def _two_class_text():
    return torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_maskclip_pseudo_labels_certainty_filter():
    # Token 0 along class 0; token 1 halfway between the classes (certainty 0.5).
    dense = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    labels = maskclip_pseudo_labels(
        dense, _two_class_text(), output_size=(1, 2), logit_scale=100.0, certainty_threshold=0.9
    )
    assert labels.tolist() == [[[0, 255]]]
    # Scale 1: certainty of token 0 is e / (e + 1) = 0.731.
    for threshold, expected in ((0.9, 255), (0.7, 0)):
        out = maskclip_pseudo_labels(
            dense,
            _two_class_text(),
            output_size=(1, 2),
            logit_scale=1.0,
            certainty_threshold=threshold,
        )
        assert out[0, 0, 0].item() == expected


def test_maskclip_pseudo_labels_upsample_cosines_bilinearly():
    # Tokens (1,0) and (0,1) upsampled 1x2 -> 1x4 (align_corners=False): class-0 cosines
    # 1, .75, .25, 0. At scale 4 the margins are 4, 2, 2, 4 -> certainties sigmoid(4)=.982,
    # sigmoid(2)=.881, so the two middle pixels fall under 0.9.
    dense = torch.tensor([[3.0, 0.0], [0.0, 5.0]]).reshape(1, 2, 1, 2)  # norms do not matter
    labels = maskclip_pseudo_labels(
        dense, _two_class_text(), output_size=(1, 4), logit_scale=4.0, certainty_threshold=0.9
    )
    assert labels.tolist() == [[[0, 255, 255, 1]]]
    ignore = torch.tensor([[[255, 0, 0, 0]]])
    labels = maskclip_pseudo_labels(
        dense,
        _two_class_text(),
        output_size=(1, 4),
        logit_scale=4.0,
        certainty_threshold=0.9,
        ignore=ignore,
    )
    assert labels.tolist() == [[[255, 255, 255, 1]]]


def test_maskclip_loss_reductions_by_hand():
    probs = _probs_1x4().requires_grad_()
    labels = torch.tensor([[[0, 255, 1, 255]]])
    total = -math.log(0.9) - math.log(0.8)
    assert maskclip_loss(probs, labels).item() == pytest.approx(total / 4, rel=1e-6)
    assert maskclip_loss(probs, labels, reduction="mean").item() == pytest.approx(total / 2)
    empty = maskclip_loss(probs, torch.full((1, 1, 4), 255))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.all(probs.grad == 0)
    with pytest.raises(ValueError, match="reduction"):
        maskclip_loss(probs, labels, reduction="sum")


def test_maskclip_weight_decays_linearly_to_zero():
    assert maskclip_weight(0, 100, start=0.1) == pytest.approx(0.1)
    assert maskclip_weight(50, 100, start=0.1) == pytest.approx(0.05)
    assert maskclip_weight(100, 100, start=0.1) == 0.0
    assert maskclip_weight(250, 100, start=0.1) == 0.0
    with pytest.raises(ValueError, match="MAX_ITER"):
        maskclip_weight(0, 0, start=0.1)
