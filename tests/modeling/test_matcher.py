"""QueryMatcher: fixed text-query assignment, Hungarian matching of visual queries."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from hiervl.modeling.matcher import QueryMatcher, pairwise_dice, pairwise_sigmoid_bce
from hiervl.modeling.point_sampling import point_sample

L, K, M = 2, 4, 3
H = W = 16
P = 64


def _matcher(**kw):
    args = dict(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=P)
    args.update(kw)
    return QueryMatcher(**args)


def _outputs(b, *, num_visual=M, seed=0, valid=None):
    g = torch.Generator().manual_seed(seed)
    q = L * K + num_visual
    query_class = torch.cat([torch.arange(K).repeat(L), torch.full((num_visual,), -1)])
    return {
        "pred_logits": torch.randn(b, q, K + 1, generator=g),
        "pred_masks": torch.randn(b, q, H // 2, W // 2, generator=g),
        "query_valid": torch.ones(b, q, dtype=torch.bool) if valid is None else valid,
        "query_class": query_class,
    }


def _target(labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "labels": torch.tensor(labels, dtype=torch.long),
        "masks": torch.rand(len(labels), H, W, generator=g) > 0.5,
    }


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_pairwise_costs_match_hand_computation():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 10), (torch.rand(2, 10) > 0.5).float()
    bce, dice = pairwise_sigmoid_bce(logits, targets), pairwise_dice(logits, targets)
    for i in range(3):
        for j in range(2):
            ref = F.binary_cross_entropy_with_logits(logits[i], targets[j])
            torch.testing.assert_close(bce[i, j], ref)
            p = logits[i].sigmoid()
            ref_dice = 1 - (2 * (p * targets[j]).sum() + 1) / (p.sum() + targets[j].sum() + 1)
            torch.testing.assert_close(dice[i, j], ref_dice)


def test_text_queries_get_their_fixed_class():
    valid = torch.ones(1, L * K + M, dtype=torch.bool)
    valid[0, [0, 0 + K]] = False  # class 0 inactive at both levels
    valid[0, 3 + K] = False  # class 3 inactive at level 1 only
    outputs = _outputs(1, valid=valid)
    target = _target([3, 0, 1])  # class 0 present but inactive, class 2 absent
    ((query_idx, target_idx),) = _matcher()(outputs, [target], generator=_seeded())

    text = query_idx < L * K
    pairs = dict(zip(query_idx[text].tolist(), target_idx[text].tolist()))
    # query index l*K + k: class 1 (target 2) at both levels, class 3 (target 0) at level 0.
    assert pairs == {1: 2, 1 + K: 2, 3: 0}
    # One visual query per ground-truth mask, each mask exactly once.
    assert sorted(target_idx[~text].tolist()) == [0, 1, 2]
    assert set(query_idx[~text].tolist()) <= set(range(L * K, L * K + M))


def test_hungarian_finds_the_obvious_assignment():
    outputs = _outputs(1)
    target = _target([2, 0])
    # Visual query 0 predicts mask 1, query 2 predicts mask 0 (exactly, strong logits).
    big = 20.0
    masks = torch.full((1, L * K + M, H, W), -big)
    masks[0, L * K + 0] = big * (2 * target["masks"][1].float() - 1)
    masks[0, L * K + 2] = big * (2 * target["masks"][0].float() - 1)
    outputs["pred_masks"] = masks
    logits = torch.zeros(1, L * K + M, K + 1)
    logits[0, L * K + 0, 0] = big
    logits[0, L * K + 2, 2] = big
    outputs["pred_logits"] = logits
    ((query_idx, target_idx),) = _matcher(num_points=256)(outputs, [target], generator=_seeded())
    visual = query_idx >= L * K
    assert dict(zip(query_idx[visual].tolist(), target_idx[visual].tolist())) == {
        L * K + 0: 1,
        L * K + 2: 0,
    }


def test_hungarian_is_optimal_against_brute_force():
    outputs = _outputs(1, seed=3)
    target = _target([1, 2], seed=4)
    matcher = _matcher()
    ((query_idx, target_idx),) = matcher(outputs, [target], generator=_seeded(7))

    # Rebuild the cost with the same random points (drawn first from the generator).
    coords = torch.rand(1, P, 2, generator=_seeded(7))
    vis = slice(L * K, None)
    pred = point_sample(outputs["pred_masks"][0, vis][:, None], coords.expand(M, -1, -1))[:, 0]
    gt = point_sample(target["masks"][:, None].float(), coords.expand(2, -1, -1))[:, 0]
    prob = outputs["pred_logits"][0, vis].softmax(-1)[:, target["labels"]]
    cost = -2 * prob + 5 * pairwise_sigmoid_bce(pred, gt) + 5 * pairwise_dice(pred, gt)

    best = min(
        sum(cost[q, t].item() for t, q in enumerate(perm))
        for perm in itertools.permutations(range(M), 2)
    )
    visual = query_idx >= L * K
    got = sum(cost[q - L * K, t].item() for q, t in zip(query_idx[visual], target_idx[visual]))
    assert got == pytest.approx(best)


def test_hungarian_invariant_to_visual_query_permutation():
    outputs = _outputs(1, seed=5)
    target = _target([0, 1, 3], seed=6)
    ((q1, t1),) = _matcher()(outputs, [target], generator=_seeded(1))
    match1 = {q: t for q, t in zip(q1.tolist(), t1.tolist()) if q >= L * K}

    perm = torch.tensor([2, 0, 1])  # new visual slot j holds old visual query perm[j]
    order = torch.cat([torch.arange(L * K), L * K + perm])
    permuted = dict(outputs)
    for key in ("pred_logits", "pred_masks"):
        permuted[key] = outputs[key][:, order]
    ((q2, t2),) = _matcher()(permuted, [target], generator=_seeded(1))
    match2 = {int(order[q]): t for q, t in zip(q2.tolist(), t2.tolist()) if q >= L * K}
    assert match1 == match2 and len(match1) == 3


def test_batched_equals_per_image():
    outputs = _outputs(3, seed=8)
    outputs["query_valid"][1, 2] = False
    targets = [_target([0, 2], 1), _target([], 2), _target([1, 2, 3], 3)]
    batched = _matcher()(outputs, targets, generator=_seeded(4))
    for i in range(3):
        single_out = {k: v[i : i + 1] if k != "query_class" else v for k, v in outputs.items()}
        ((q, t),) = _matcher()(single_out, [targets[i]], generator=_seeded(4))
        assert torch.equal(q, batched[i][0]) and torch.equal(t, batched[i][1])


def test_empty_targets_and_no_visual_queries():
    outputs = _outputs(2, num_visual=0)
    targets = [_target([]), _target([1])]
    (q0, t0), (q1, t1) = _matcher()(outputs, targets, generator=_seeded())
    assert q0.numel() == t0.numel() == 0
    assert q1.tolist() == [1, 1 + K] and t1.tolist() == [0, 0]
    assert q0.dtype == t0.dtype == torch.long


def test_label_errors():
    outputs = _outputs(1)
    with pytest.raises(ValueError, match="outside"):
        _matcher()(outputs, [_target([K])])
    with pytest.raises(ValueError, match="1 targets for a batch of 2"):
        _matcher()(_outputs(2), [_target([0])])
    with pytest.raises(ValueError, match="costs are all 0"):
        _matcher(cost_class=0, cost_mask=0, cost_dice=0)
