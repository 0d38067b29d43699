"""HSQG: relevance formula, ground-truth gate, pruning threshold, MIN_ACTIVE, ablation."""

import math

import pytest
import torch

from hiervl.modeling.hsqg import HSQG

C, D, K, L = 12, 16, 5, 3


def _hsqg(**overrides):
    kwargs = dict(
        clip_dim=C,
        hidden_dim=D,
        num_levels=L,
        relevance_threshold=0.5,
        min_active=1,
        init_scale=10.0,
        init_bias=-2.5,
        enabled=True,
        labeled_gate="ground_truth",
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return HSQG(**kwargs)


def _inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, C, generator=g), torch.randn(batch, C, generator=g)


def _hand_relevance(text, image, w, b):
    """s_bk = sigmoid(w * cos(v_b, t_k) + b), one scalar at a time."""
    out = torch.empty(image.shape[0], text.shape[0], dtype=torch.float64)
    for i, v in enumerate(image.double().tolist()):
        for k, t in enumerate(text.double().tolist()):
            dot = sum(a * c for a, c in zip(v, t))
            cos = dot / math.sqrt(sum(a * a for a in v) * sum(c * c for c in t))
            out[i, k] = 1.0 / (1.0 + math.exp(-(w * cos + b)))
    return out


def _hand_queries(module, text):
    """(L, K, D): each level's own 2-layer MLP, written out."""
    levels = []
    for mlp in module.level_mlps:
        hidden = torch.relu(text @ mlp[0].weight.t() + mlp[0].bias)
        levels.append(hidden @ mlp[2].weight.t() + mlp[2].bias)
    return torch.stack(levels)


def test_unlabelled_gate_is_sigmoid_of_scaled_cosine():
    module = _hsqg(init_scale=7.0, init_bias=-1.25)
    text, image = _inputs()
    out = module(text, image)
    expected = _hand_relevance(text, image, 7.0, -1.25).float()
    torch.testing.assert_close(out.relevance, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.gate, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        hand_q = _hand_queries(module, text)
    torch.testing.assert_close(out.queries, expected[:, None, :, None] * hand_q[None])
    assert out.queries.shape == (3, L, K, D)
    # The L MLPs are separate modules with separate weights.
    assert not torch.allclose(hand_q[0], hand_q[1])


def test_labelled_gate_is_ground_truth_indicator():
    module = _hsqg()
    text, image = _inputs(batch=3)
    presence = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    labeled = torch.tensor([True, False, True])
    out = module(text, image, presence=presence, labeled=labeled)
    relevance = _hand_relevance(text, image, 10.0, -2.5).float()
    torch.testing.assert_close(out.relevance, relevance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.gate[0], presence[0].float())
    torch.testing.assert_close(out.gate[2], presence[2].float())
    torch.testing.assert_close(out.gate[1], relevance[1], rtol=1e-5, atol=1e-6)
    # Labelled image: exactly the present classes are active; absent queries are zeroed.
    assert out.active[0].tolist() == presence[0].tolist()
    assert out.active[2].all()
    assert (out.queries[0][:, ~presence[0]] == 0).all()

    # labeled=None with presence = every image labelled.
    all_labelled = module(text, image, presence=presence)
    torch.testing.assert_close(all_labelled.gate, presence.float())


def test_active_is_threshold_on_gate():
    module = _hsqg(relevance_threshold=0.4)
    text, image = _inputs(batch=4, seed=3)
    out = module(text, image)
    above = out.gate >= 0.4
    # Wherever some class clears the threshold, active is exactly the thresholded set.
    rows = above.any(dim=1)
    assert rows.any(), "test data should have images with classes above threshold"
    assert torch.equal(out.active[rows], above[rows])


@pytest.mark.parametrize("min_active", [1, 2, 3])
def test_min_active_keeps_top_scoring(min_active):
    # A very negative bias puts every gate below the threshold.
    module = _hsqg(min_active=min_active, init_bias=-50.0)
    text, image = _inputs(batch=4, seed=5)
    out = module(text, image)
    assert (out.gate < 0.5).all()
    assert (out.active.sum(dim=1) == min_active).all()
    top = out.relevance.topk(min_active, dim=1).indices
    expected = torch.zeros_like(out.active).scatter(1, top, True)
    assert torch.equal(out.active, expected)


def test_min_active_on_labelled_image_without_classes_uses_relevance():
    module = _hsqg(min_active=2)
    text, image = _inputs(batch=2, seed=7)
    presence = torch.zeros(2, K, dtype=torch.bool)
    presence[1, 4] = True
    out = module(text, image, presence=presence)
    # Empty ground truth: the two most relevant classes by prediction.
    top = out.relevance[0].topk(2).indices
    assert out.active[0].nonzero().flatten().sort().values.tolist() == sorted(top.tolist())
    # One present class: it is kept, plus the most relevant absent one.
    rel = out.relevance[1].clone()
    rel[4] = -1.0
    assert out.active[1].nonzero().flatten().tolist() == sorted([4, int(rel.argmax())])


def test_min_active_larger_than_vocabulary_keeps_all():
    module = _hsqg(min_active=K + 3, init_bias=-50.0)
    text, image = _inputs()
    assert module(text, image).active.all()


def test_disabled_gives_static_queries():
    module = _hsqg(enabled=False, init_bias=-50.0)
    text, image = _inputs(batch=2)
    presence = torch.zeros(2, K, dtype=torch.bool)
    out = module(text, image, presence=presence)
    assert (out.gate == 1).all() and out.active.all()
    with torch.no_grad():
        hand_q = _hand_queries(module, text)
    torch.testing.assert_close(out.queries, hand_q[None].expand(2, -1, -1, -1))
    torch.testing.assert_close(
        out.relevance, _hand_relevance(text, image, 10.0, -50.0).float(), rtol=1e-5, atol=1e-6
    )


def test_disabled_needs_no_image_embedding():
    module = _hsqg(enabled=False)
    text, image = _inputs(batch=3)
    with_image = module(text, image)
    without = module(text, None, num_images=3)
    assert without.relevance is None
    torch.testing.assert_close(without.queries, with_image.queries)
    assert torch.equal(without.gate, with_image.gate)
    assert torch.equal(without.active, with_image.active)
    with pytest.raises(ValueError, match="image embedding is needed when HSQG is enabled"):
        _hsqg(enabled=True)(text, None, num_images=3)


def test_batched_equals_per_image():
    module = _hsqg(min_active=2)
    text, image = _inputs(batch=4, seed=11)
    presence = torch.rand(4, K, generator=torch.Generator().manual_seed(0)) > 0.5
    labeled = torch.tensor([True, False, True, False])
    batched = module(text, image, presence=presence, labeled=labeled)
    for i in range(4):
        single = module(
            text, image[i : i + 1], presence=presence[i : i + 1], labeled=labeled[i : i + 1]
        )
        for name in ("queries", "gate", "relevance", "active"):
            torch.testing.assert_close(getattr(single, name)[0], getattr(batched, name)[i])


def test_gradients():
    module = _hsqg()
    text, image = _inputs(batch=2)
    text.requires_grad_(True)
    # Unlabelled: the segmentation loss trains the gate (w, b), the MLPs and the prompt.
    module(text, image).queries.sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert text.grad.abs().sum() > 0

    # Labelled: the gate is ground truth, so w, b learn only from L_rel on `relevance`.
    module.zero_grad(set_to_none=True)
    presence = torch.ones(2, K, dtype=torch.bool)
    out = module(text, image, presence=presence)
    out.queries.sum().backward(retain_graph=True)
    for p in (module.logit_scale, module.logit_bias):
        assert p.grad is None or p.grad == 0
    torch.nn.functional.binary_cross_entropy(out.relevance, presence.float()).backward()
    assert module.logit_scale.grad.abs() > 0 and module.logit_bias.grad.abs() > 0


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(min_active=0), "MIN_ACTIVE"),
        (dict(relevance_threshold=1.5), "RELEVANCE_THRESHOLD"),
        (dict(num_levels=0), "NUM_LEVELS"),
    ],
)
def test_bad_config_fails_loudly(overrides, match):
    with pytest.raises(ValueError, match=match):
        _hsqg(**overrides)


def test_bad_inputs_fail_loudly():
    module = _hsqg()
    text, image = _inputs(batch=2)
    with pytest.raises(ValueError, match="presence"):
        module(text, image, labeled=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="presence has shape"):
        module(text, image, presence=torch.zeros(2, K + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="labeled has shape"):
        module(text, image, presence=torch.zeros(2, K, dtype=torch.bool), labeled=torch.ones(3))
