"""Vision–language regularisers against hand computations (no detectron2)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hiervl.modeling.vl_losses import (
    PromptProjector,
    anchor_loss,
    blank_random_class,
    masked_consistency_loss,
    pixel_text_alignment_loss,
    prompt_regularity_loss,
    topology_loss,
)


class _Scale(nn.Module):
    """Φ(x) = s·x, to compute L_anchor by hand."""

    def __init__(self, scale):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x):
        return self.scale * x


def test_topology_zero_when_prompts_equal_template():
    g = torch.Generator().manual_seed(0)
    t_clip = torch.randn(5, 16, generator=g)
    assert topology_loss(t_clip.clone(), t_clip).item() == pytest.approx(0.0, abs=1e-6)
    # Only directions matter: a rescaled copy is the same prompt set.
    assert topology_loss(3.0 * t_clip, t_clip).item() == pytest.approx(0.0, abs=1e-5)


def test_topology_by_hand_and_gradient_only_into_prompts():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    t_clip = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = topology_loss(t, t_clip)
    # Gram(t) = I, Gram(t_clip) = [[1, 1/√2], [1/√2, 1]]: two off-diagonal terms of 1/2.
    assert loss.item() == pytest.approx(1.0, rel=1e-6)
    loss.backward()
    assert t.grad is not None and t_clip.grad is None


def test_anchor_by_hand_three_classes():
    eye = torch.eye(3)
    t = eye.clone()
    t_clip = torch.stack([eye[0], eye[0], eye[2]])
    lam = 0.1
    # Identity Φ: anchors 0, √2, 0; all 6 ordered pairs at distance √2, 2 per class.
    for reduction, pairs in (("sum", 6), ("mean", 6 / 2)):
        expected = math.sqrt(2) - lam * pairs * math.log(1 + math.sqrt(2))
        got = anchor_loss(t, t_clip, nn.Identity(), repulsion=lam, reduction=reduction)
        assert got.item() == pytest.approx(expected), reduction
    # Φ(x) = 2x: anchors |2e1-e1| = 1, |2e2-e1| = √5, |2e3-e3| = 1; pairs at 2√2.
    expected = 2 + math.sqrt(5) - lam * 3 * math.log(1 + 2 * math.sqrt(2))
    got = anchor_loss(t, t_clip, _Scale(2.0), repulsion=lam).item()
    assert got == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="ANCHOR_REPULSION must be one of"):
        anchor_loss(t, t_clip, nn.Identity(), repulsion=lam, reduction="max")


@pytest.mark.parametrize("num_classes", [3, 21, 81, 150])
def test_anchor_mean_repulsion_does_not_grow_with_k(num_classes):
    """Orthonormal class embeddings, Φ(x) = c·x: every anchor is |c − 1|, every pair at
    c·√2, so per class L = |c − 1| − λ R with R = log(1 + c√2) (mean) or
    (K − 1) log(1 + c√2) (sum). The mean form is the same per class at every K and is
    lowest at c = 1 (the anchor binds); the paper's sum keeps falling as Φ_p's outputs
    grow when λ(K − 1) is large (the anchor stops binding at K = 81 and 150)."""
    lam = 0.1
    t = torch.eye(num_classes)
    scales = [0.5, 1.0, 1.5, 2.0, 4.0]
    per_class = {}
    for reduction in ("mean", "sum"):
        values = []
        for c in scales:
            got = anchor_loss(t, t, _Scale(c), repulsion=lam, reduction=reduction).item()
            pairs = 1 if reduction == "mean" else num_classes - 1
            expected = abs(c - 1) - lam * pairs * math.log(1 + c * math.sqrt(2))
            assert got / num_classes == pytest.approx(expected, rel=1e-5, abs=1e-6)
            values.append(got / num_classes)
        per_class[reduction] = values
    mean_form = per_class["mean"]
    assert min(range(len(scales)), key=mean_form.__getitem__) == scales.index(1.0)
    # Identical per-class values at every K (this parametrisation checks 3 ... 150).
    assert mean_form[scales.index(1.0)] == pytest.approx(-lam * math.log(1 + math.sqrt(2)))
    if num_classes >= 81:
        assert per_class["sum"] == sorted(per_class["sum"], reverse=True)  # c = 4 is lowest


def test_anchor_single_class_has_no_repulsion():
    t = torch.tensor([[3.0, 4.0]])
    t_clip = torch.tensor([[1.0, 0.0]])
    # t̂ = (0.6, 0.8): distance to (1, 0) is √(0.16 + 0.64).
    got = anchor_loss(t, t_clip, nn.Identity(), repulsion=0.5).item()
    assert got == pytest.approx(math.sqrt(0.8), rel=1e-6)


def test_anchor_gradients_finite_at_zero_distance_and_reach_projector():
    t = torch.eye(3, requires_grad=True)
    projector = _Scale(1.0)  # Φ(t̂_k) == t̂_k^CLIP exactly: the anchor norms are 0
    loss = anchor_loss(t, torch.eye(3), projector, repulsion=0.1)
    loss.backward()
    assert torch.all(torch.isfinite(t.grad)) and torch.isfinite(projector.scale.grad)
    assert projector.scale.grad.abs() > 0


def test_prompt_projector_and_regularity_sum():
    torch.manual_seed(0)
    projector = PromptProjector(dim=8)
    assert projector(torch.randn(4, 8)).shape == (4, 8)
    assert PromptProjector(dim=8, hidden_dim=3).layers[0].out_features == 3
    t = torch.randn(4, 8, requires_grad=True)
    t_clip = torch.randn(4, 8)
    total = prompt_regularity_loss(t, t_clip, projector, repulsion=0.1)
    parts = topology_loss(t, t_clip) + anchor_loss(t, t_clip, projector, repulsion=0.1)
    assert torch.allclose(total, parts)
    total.backward()
    assert t.grad.abs().sum() > 0
    assert all(p.grad is not None for p in projector.parameters())
    with pytest.raises(ValueError, match="prompt embeddings"):
        topology_loss(t, t_clip[:3])


def test_masked_consistency_zero_when_equal_and_by_hand():
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert masked_consistency_loss(x.clone(), x, mask).item() == pytest.approx(0.0, abs=1e-6)

    x_mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], requires_grad=True)
    x_ref = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]], requires_grad=True)
    token_mask = torch.tensor([[True, True, False]])
    loss = masked_consistency_loss(x_mask, x_ref, token_mask)
    # Tokens 0 (cos 1) and 1 (cos 0) are in M; token 2 (cos -1/√2) is not.
    assert loss.item() == pytest.approx(0.5, rel=1e-6)
    loss.backward()
    assert x_ref.grad is None
    assert torch.all(x_mask.grad[0, 2] == 0) and x_mask.grad[0, 1].abs().sum() > 0


def test_losses_with_empty_token_mask_are_attached_zeros():
    x = torch.randn(2, 4, 8, requires_grad=True)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    l_mask = masked_consistency_loss(x, torch.randn(2, 4, 8), empty)
    l_pt = pixel_text_alignment_loss(
        x, torch.randn(3, 8), empty, torch.full((2, 4), 255), temperature=0.07
    )
    for loss in (l_mask, l_pt):
        assert loss.item() == 0.0 and loss.requires_grad
    (l_mask + l_pt).backward()
    assert torch.all(x.grad == 0)


def test_pixel_text_alignment_equals_cross_entropy_on_explicit_logits():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 8, generator=g).requires_grad_()
    text = torch.randn(4, 8, generator=g)
    token_mask = torch.rand(2, 6, generator=g) < 0.5
    token_mask[0, 0] = True
    token_labels = torch.where(token_mask, torch.randint(0, 4, (2, 6), generator=g), 255)
    tau = 0.07
    ours = pixel_text_alignment_loss(x, text, token_mask, token_labels, temperature=tau)
    cos = F.cosine_similarity(x[:, :, None, :], text[None, None], dim=-1)
    ref = F.cross_entropy(cos[token_mask] / tau, token_labels[token_mask])
    assert torch.allclose(ours, ref, atol=1e-5)
    ours.backward()
    assert torch.all(x.grad[~token_mask] == 0)


def _scene():
    """(1,3,4,4) image, labels: class 2 fills the top-left 2x2 patch and half of the
    top-right one; class 5 the rest except a bottom-right ignored patch."""
    labels = torch.full((1, 4, 4), 5, dtype=torch.long)
    labels[0, :2, :2] = 2
    labels[0, :2, 2] = 2
    labels[0, 2:, 2:] = 255
    images = torch.arange(48, dtype=torch.float32).reshape(1, 3, 4, 4) + 1.0
    return images, labels


def test_blanking_touches_only_the_chosen_class_and_builds_token_mask():
    images, labels = _scene()
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        out = blank_random_class(images, labels, patch_size=2, generator=g)
        c = out.chosen.item()
        assert c in (2, 5)
        assert torch.equal(out.pixel_mask, labels == c)
        assert torch.all(out.images[:, :, out.pixel_mask[0]] == 0.0)
        assert torch.equal(out.images[:, :, ~out.pixel_mask[0]], images[:, :, ~out.pixel_mask[0]])
        # Patches (row-major): TL all class 2, TR half 2 / half 5, BL all 5, BR ignored.
        expected = {2: [True, True, False, False], 5: [False, True, True, False]}[c]
        assert out.token_mask[0].tolist() == expected
        assert out.token_labels[0].tolist() == [c if m else 255 for m in expected]
    assert images[0, 0, 0, 0].item() == 1.0  # input untouched


def test_blanking_is_deterministic_and_draws_every_present_class():
    images, labels = _scene()
    images, labels = images.repeat(4, 1, 1, 1), labels.repeat(4, 1, 1)
    first = blank_random_class(
        images, labels, patch_size=2, generator=torch.Generator().manual_seed(7)
    )
    again = blank_random_class(
        images, labels, patch_size=2, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(first.chosen, again.chosen) and torch.equal(first.images, again.images)
    drawn = set()
    for seed in range(20):
        out = blank_random_class(
            images, labels, patch_size=2, generator=torch.Generator().manual_seed(seed)
        )
        drawn.update(out.chosen.tolist())
    assert drawn == {2, 5}


def test_blanking_skips_images_without_a_valid_class():
    images, labels = _scene()
    images = torch.cat([images, images])
    labels = torch.cat([labels, torch.full_like(labels, 255)])
    out = blank_random_class(images, labels, patch_size=2, generator=torch.Generator())
    assert out.chosen[1].item() == -1
    assert torch.equal(out.images[1], images[1]) and not out.token_mask[1].any()
    assert torch.all(out.token_labels[1] == 255)


def test_blanking_fill_value_and_size_check():
    images, labels = _scene()
    labels = torch.where(labels == 5, 255, labels)  # only class 2 left
    out = blank_random_class(images, labels, patch_size=2, fill_value=-1.5)
    assert out.chosen.item() == 2 and torch.all(out.images[:, :, labels[0] == 2] == -1.5)
    with pytest.raises(ValueError, match="patch size"):
        blank_random_class(images, labels, patch_size=3)
