"""SetCriterion: hand-computed CE / BCE / dice / L_rel / L_qt, validity masking, empty ground
truth, deep supervision, and the label-map → targets helper."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hiervl.modeling.criterion import SetCriterion, dice_loss, semantic_to_targets
from hiervl.modeling.dual_query_decoder import DualQueryDecoder
from hiervl.modeling.mask_head import DynamicMaskHead
from hiervl.modeling.matcher import QueryMatcher

K, C, S = 3, 8, 32  # classes, CLIP width, image side
NUM_POINTS = 128
BIG = 20.0


def _criterion(**kw):
    args = dict(
        class_weight=1.0,
        mask_weight=1.0,
        dice_weight=1.0,
        no_object_weight=0.1,
        deep_supervision=True,
        num_points=NUM_POINTS,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        rel_weight=1.0,
        qt_weight=1.0,
    )
    args.update(kw)
    matcher = QueryMatcher(
        cost_class=args["class_weight"],
        cost_mask=args["mask_weight"],
        cost_dice=args["dice_weight"],
        num_points=NUM_POINTS,
    )
    return SetCriterion(matcher=matcher, **args)


def _outputs(b, *, levels=1, num_visual=0, seed=0, size=S):
    g = torch.Generator().manual_seed(seed)
    q = levels * K + num_visual
    return {
        "pred_logits": torch.randn(b, q, K + 1, generator=g),
        "pred_masks": torch.randn(b, q, size, size, generator=g),
        "query_proj": F.normalize(torch.randn(b, q, C, generator=g), dim=-1),
        "query_valid": torch.ones(b, q, dtype=torch.bool),
        "query_class": torch.cat([torch.arange(K).repeat(levels), torch.full((num_visual,), -1)]),
        "aux_outputs": [],
    }


def _full_image_targets(classes):
    """One image per entry: the whole image is that class (None = all ignore)."""
    maps = [torch.full((S, S), 255 if c is None else c) for c in classes]
    return [semantic_to_targets(m, num_classes=K) for m in maps]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- targets helper --------------------------------------------------------------------


def test_semantic_to_targets():
    sem = torch.tensor([[0, 0, 2], [255, 2, 2]])
    t = semantic_to_targets(sem, num_classes=K)
    assert t["labels"].tolist() == [0, 2]
    assert t["masks"].dtype == torch.bool
    assert t["masks"][0].tolist() == [[True, True, False], [False, False, False]]
    assert t["masks"][1].tolist() == [[False, False, True], [False, True, True]]

    empty = semantic_to_targets(torch.full((4, 5), 255))
    assert empty["labels"].numel() == 0 and empty["masks"].shape == (0, 4, 5)
    with pytest.raises(ValueError, match="outside"):
        semantic_to_targets(torch.tensor([[0, 3]]), num_classes=K)


# --- losses against hand computations ---------------------------------------------------


def test_dice_loss_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), -math.log(3.0)]])  # probs .5 .5 / .75 .25
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    first = 1 - (2 * 0.5 + 1) / (1.0 + 1.0 + 1)
    second = 1 - (2 * 1.0 + 1) / (1.0 + 2.0 + 1)
    assert dice_loss(logits, targets, 2.0).item() == pytest.approx((first + second) / 2)


def test_constant_masks_give_hand_computed_losses():
    # Two text levels, no visual queries: the matching is fixed (2 pairs per image), and
    # constant mask logits against full-image targets make every sampled point identical.
    out = _outputs(2, levels=2)
    a = torch.tensor([[0.3, 1.2], [-0.7, 2.0]])  # (image, level) mask logit of the GT class
    present = [1, 2]
    for i, k in enumerate(present):
        for lvl in range(2):
            out["pred_masks"][i, lvl * K + k] = a[i, lvl]
    targets = _full_image_targets(present)
    t_clip = torch.randn(K, C)
    relevance = torch.tensor([[0.2, 0.9, 0.4], [0.6, 0.3, 0.7]])
    losses = _criterion()(out, targets, relevance=relevance, text_clip=t_clip, generator=_gen())

    n = 4  # matched pairs
    bce = sum(F.softplus(-x) for x in a.flatten()) / n
    p = a.flatten().sigmoid()
    dice = sum(1 - (2 * NUM_POINTS * pi + 1) / (NUM_POINTS * pi + NUM_POINTS + 1) for pi in p) / n
    assert losses["loss_sup_mask"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert losses["loss_sup_dice"].item() == pytest.approx(dice.item(), rel=1e-5)

    # CE: weighted mean over all (valid) queries, no-object weight 0.1.
    logp = out["pred_logits"].log_softmax(-1)
    num, den = 0.0, 0.0
    for i, k in enumerate(present):
        for q in range(2 * K):
            target = k if q % K == k else K
            w = 1.0 if target < K else 0.1
            num += -w * logp[i, q, target].item()
            den += w
    assert losses["loss_sup_ce"].item() == pytest.approx(num / den, rel=1e-5)

    # L_qt: squared distance to the normalised text embedding, mean over matched pairs.
    t_hat = F.normalize(t_clip, dim=-1)
    qt = sum(
        (out["query_proj"][i, lvl * K + k] - t_hat[k]).pow(2).sum()
        for i, k in enumerate(present)
        for lvl in range(2)
    )
    assert losses["loss_sup_qt"].item() == pytest.approx(qt.item() / n, rel=1e-5)

    # L_rel: BCE against presence, mean over (image, class).
    presence = torch.tensor([[0.0, 1, 0], [0, 0, 1]])
    assert losses["loss_sup_rel"].item() == pytest.approx(
        F.binary_cross_entropy(relevance, presence).item(), rel=1e-5
    )


def test_weights_scale_the_losses():
    out = _outputs(2, levels=2)
    targets = _full_image_targets([1, 2])
    rel, t = torch.rand(2, K), torch.randn(K, C)
    base = _criterion()(out, targets, relevance=rel, text_clip=t, generator=_gen())
    weighted = _criterion(
        class_weight=2.0, mask_weight=5.0, dice_weight=3.0, rel_weight=0.5, qt_weight=0.05
    )(out, targets, relevance=rel, text_clip=t, generator=_gen())
    factors = {"ce": 2.0, "mask": 5.0, "dice": 3.0, "rel": 0.5, "qt": 0.05}
    for name, f in factors.items():
        key = f"loss_sup_{name}"
        assert weighted[key].item() == pytest.approx(f * base[key].item(), rel=1e-5)


# --- behaviour -------------------------------------------------------------------------


def _perfect_outputs(classes_per_image, num_visual=2):
    """Predictions that match full-image targets exactly (text + one visual query each)."""
    b = len(classes_per_image)
    out = _outputs(b, num_visual=num_visual)
    logits = torch.zeros_like(out["pred_logits"])
    logits[..., K] = BIG  # everything says "no object" ...
    masks = torch.full_like(out["pred_masks"], -BIG)
    for i, k in enumerate(classes_per_image):
        for q in (k, K):  # ... except the text query of k and the first visual query
            logits[i, q] = 0.0
            logits[i, q, k] = BIG
            masks[i, q] = BIG
    out["pred_logits"], out["pred_masks"] = logits, masks
    return out


def test_perfect_prediction_gives_near_zero_losses():
    classes = [0, 2, 1]
    out = _perfect_outputs(classes)
    losses = _criterion()(out, _full_image_targets(classes), generator=_gen())
    for key in ("loss_sup_ce", "loss_sup_mask", "loss_sup_dice"):
        assert losses[key].item() < 1e-6, key


def test_wrong_class_and_wrong_mask_cost_more():
    classes = [0, 2]
    targets = _full_image_targets(classes)
    perfect = _criterion()(_perfect_outputs(classes), targets, generator=_gen())

    wrong_class = _perfect_outputs(classes)
    wrong_class["pred_logits"][0, 0, 0] = 0.0
    wrong_class["pred_logits"][0, 0, 1] = BIG  # text query of class 0 says class 1
    worse = _criterion()(wrong_class, targets, generator=_gen())
    assert worse["loss_sup_ce"] > perfect["loss_sup_ce"] + 1.0
    assert worse["loss_sup_mask"].item() == pytest.approx(perfect["loss_sup_mask"].item())

    wrong_mask = _perfect_outputs(classes)
    wrong_mask["pred_masks"][1, 2] = -BIG  # text query of class 2 predicts an empty mask
    worse = _criterion()(wrong_mask, targets, generator=_gen())
    assert worse["loss_sup_mask"] > perfect["loss_sup_mask"] + 1.0
    assert worse["loss_sup_dice"] > perfect["loss_sup_dice"] + 0.2


def test_two_class_image_perfect_is_far_below_swapped():
    sem = torch.zeros(S, S, dtype=torch.long)
    sem[:, S // 2 :] = 2
    targets = [semantic_to_targets(sem)]
    out = _outputs(1, num_visual=2)
    for q, k in [(0, 0), (3, 0), (2, 2), (4, 2)]:  # text and visual queries of classes 0, 2
        out["pred_masks"][0, q] = BIG * (2 * (sem == k).float() - 1)
    good = _criterion()(out, targets, generator=_gen())
    swapped = dict(out, pred_masks=out["pred_masks"][:, [2, 1, 0, 4, 3]])
    bad = _criterion()(swapped, targets, generator=_gen())
    # Swapping only hurts the 2 text pairs (the visual queries are re-matched); the perfect
    # prediction pays only at points within half a pixel of the class boundary, where
    # importance sampling concentrates ~10% of the points.
    assert good["loss_sup_mask"] < 0.05 * bad["loss_sup_mask"]
    assert good["loss_sup_dice"] < 0.1 * bad["loss_sup_dice"]


def test_invalid_queries_never_produce_losses():
    out = _outputs(2, levels=2, num_visual=2, seed=1)
    out["query_valid"][0, [1, 1 + K]] = False  # class 1 inactive in image 0
    out["query_valid"][1, [0, 2 + K]] = False
    targets = _full_image_targets([2, 0])
    kw = dict(relevance=torch.rand(2, K), text_clip=torch.randn(K, C))
    ref = _criterion()(out, targets, generator=_gen(), **kw)

    changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}
    invalid = ~out["query_valid"]
    for key in ("pred_logits", "pred_masks", "query_proj"):
        changed[key][invalid] = 100 * torch.randn_like(changed[key][invalid])
    changed["pred_logits"].requires_grad_(True)
    losses = _criterion()(changed, targets, generator=_gen(), **kw)
    for key in ref:
        assert losses[key].item() == pytest.approx(ref[key].item(), rel=1e-6, abs=1e-7), key
    sum(losses.values()).backward()
    grad = changed["pred_logits"].grad
    assert grad[invalid].abs().max() == 0 and grad[~invalid].abs().max() > 0


def test_empty_ground_truth():
    out = _outputs(2, levels=2, num_visual=2)
    for key in ("pred_logits", "pred_masks", "query_proj"):
        out[key].requires_grad_(True)
    out["query_valid"][1, 0] = False
    targets = _full_image_targets([None, None])
    losses = _criterion()(
        out, targets, relevance=torch.rand(2, K), text_clip=torch.randn(K, C), generator=_gen()
    )
    valid = out["query_valid"]
    expected_ce = F.cross_entropy(out["pred_logits"][valid], torch.full((int(valid.sum()),), K))
    assert losses["loss_sup_ce"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    for key in ("loss_sup_mask", "loss_sup_dice", "loss_sup_rel", "loss_sup_qt"):
        assert losses[key].item() == 0.0, key
    sum(losses.values()).backward()
    assert torch.isfinite(out["pred_logits"].grad).all()


def test_relevance_ignores_all_ignore_images():
    rel = torch.tensor([[0.2, 0.9, 0.4], [0.6, 0.3, 0.7]])
    targets = _full_image_targets([1, None])
    losses = _criterion()(_outputs(2), targets, relevance=rel, generator=_gen())
    expected = F.binary_cross_entropy(rel[0], torch.tensor([0.0, 1.0, 0.0]))
    assert losses["loss_sup_rel"].item() == pytest.approx(expected.item(), rel=1e-5)
    extreme = torch.tensor([[0.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    assert torch.isfinite(_criterion()(_outputs(2), targets, relevance=extreme)["loss_sup_rel"])


def test_deep_supervision_keys_and_values():
    out = _outputs(2, levels=2)
    targets = _full_image_targets([1, 0])
    out["aux_outputs"] = [
        {k: out[k] for k in ("pred_logits", "pred_masks", "query_proj")},
        {k: 2 * out[k] for k in ("pred_logits", "pred_masks", "query_proj")},
    ]
    losses = _criterion()(out, targets, generator=_gen())
    for i in range(2):
        assert {f"loss_sup_{n}_{i}" for n in ("ce", "mask", "dice")} <= set(losses)
    # Aux set 0 equals the final prediction: CE identical (mask terms use other points).
    assert losses["loss_sup_ce_0"].item() == pytest.approx(losses["loss_sup_ce"].item())
    assert losses["loss_sup_ce_1"].item() != pytest.approx(losses["loss_sup_ce"].item())
    off = _criterion(deep_supervision=False)(out, targets, generator=_gen())
    assert set(off) == {f"loss_sup_{n}" for n in ("ce", "mask", "dice", "rel", "qt")}


def test_normalizer_is_all_reduced(tmp_path):
    out = _outputs(2, levels=2)
    targets = _full_image_targets([1, 2])
    local = _criterion()(out, targets, generator=_gen())
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        reduced = _criterion()(out, targets, generator=_gen())
    finally:
        dist.destroy_process_group()
    for key in local:
        assert reduced[key].item() == pytest.approx(local[key].item()), key


def test_end_to_end_with_the_decoder_reaches_decoder_parameters():
    torch.manual_seed(0)
    d = 32
    head = DynamicMaskHead(
        hidden_dim=d, mask_dim=d, clip_dim=C, kernel_mlp_layers=3, logit_scale_init=10.0
    )
    dec = DualQueryDecoder(
        hidden_dim=d,
        num_heads=4,
        ffn_dim=64,
        num_layers=2,
        num_visual_queries=3,
        num_feature_levels=2,
        num_text_levels=2,
        pre_norm=False,
        dropout=0.0,
        mask_head=head,
    )
    active = torch.tensor([[True, True, False], [True, False, True]])
    out = dec(
        torch.randn(2, 2, K, d),
        active,
        [torch.randn(2, d, 4, 4), torch.randn(2, d, 8, 8)],
        torch.randn(2, d, 8, 8),
        torch.randn(K, C),
    )
    sem = torch.zeros(2, S, S, dtype=torch.long)
    sem[0, :, S // 2 :] = 1
    sem[1, : S // 2] = 2
    targets = [semantic_to_targets(s, num_classes=K) for s in sem]
    losses = _criterion()(
        out, targets, relevance=torch.rand(2, K), text_clip=torch.randn(K, C), generator=_gen()
    )
    assert len([k for k in losses if k.startswith("loss_sup_ce_")]) == 2
    sum(losses.values()).backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.void_embed.grad.abs().sum() > 0 and dec.visual_feat.weight.grad.abs().sum() > 0


def test_bfloat16_outputs_under_autocast_match_float32():
    out = _outputs(2, levels=2, num_visual=2, seed=2)
    targets = _full_image_targets([1, 2])
    kw = dict(relevance=torch.rand(2, K), text_clip=torch.randn(K, C))
    ref = _criterion()(out, targets, generator=_gen(), **kw)
    half = {
        k: v.bfloat16() if v.is_floating_point() else v
        for k, v in out.items()
        if k != "aux_outputs"
    }
    half["aux_outputs"] = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _criterion()(half, targets, generator=_gen(), **kw)
    for key in ref:
        assert losses[key].dtype == torch.float32, key
        assert losses[key].item() == pytest.approx(ref[key].item(), rel=0.05, abs=1e-3), key


def test_target_points_of_pairs_sharing_a_mask():
    """_sample_targets reads every pair's own mask at its own points, also when several
    pairs (text queries of the L levels) share one mask: same as sampling per pair."""
    from hiervl.modeling.criterion import _sample_targets
    from hiervl.modeling.point_sampling import point_sample

    g = torch.Generator().manual_seed(0)
    maps = [(torch.rand(3, 9, 11, generator=g) > 0.5).float(), torch.rand(2, 9, 11, generator=g)]
    batch_idx = torch.tensor([0, 0, 0, 1, 0, 1])
    target_idx = torch.tensor([2, 0, 2, 1, 2, 1])
    coords = torch.rand(6, 5, 2, generator=g)
    got = _sample_targets(maps, target_idx, batch_idx, coords)
    for n in range(6):
        mask = maps[int(batch_idx[n])][int(target_idx[n])]
        expected = point_sample(mask[None, None], coords[n : n + 1])[0, 0]
        torch.testing.assert_close(got[n], expected)
    # By hand: a point at a pixel centre reads that pixel.
    centre = torch.tensor([[[(4 + 0.5) / 11, (7 + 0.5) / 9]]])  # x = column 4, y = row 7
    one = _sample_targets([maps[1]], torch.tensor([0]), torch.tensor([0]), centre)
    torch.testing.assert_close(one[0, 0], maps[1][0, 7, 4])


# --- labelled images with the predicted ∪ ground-truth gate (HSQG.LABELED_GATE) ----------


def test_union_gate_supervises_false_positive_text_queries_as_no_object():
    """A labelled image whose ground truth is class 0 only, and whose predicted relevance is
    high for class 1 (a false positive) and low for class 2. The paper's gate keeps class 0
    alone; "union" also keeps class 1, whose text query is then valid, matched to nothing
    and supervised as "no object". Checked through HSQG → matcher → CE, by hand."""
    from hiervl.modeling.hsqg import HSQG

    text = torch.eye(K, C)  # t_k = e_k
    image = torch.eye(K, C)[1:2]  # v = e_1: cos = (0, 1, 0)
    presence = torch.tensor([[True, False, False]])
    w, b = 10.0, -2.5
    relevance = torch.sigmoid(torch.tensor([b, w + b, b]))  # (0.076, 0.9994, 0.076)
    valid_of = {}
    for gate_rule in ("ground_truth", "union"):
        hsqg = HSQG(
            clip_dim=C, hidden_dim=4, num_levels=1, relevance_threshold=0.5, min_active=1,
            init_scale=w, init_bias=b, enabled=True, labeled_gate=gate_rule,
        )  # fmt: skip
        gen = hsqg(text, image, presence)
        torch.testing.assert_close(gen.relevance[0], relevance)
        # Union: 1 on the ground truth, the predicted relevance on the other classes.
        expected_gate = torch.tensor([1.0, 0.0, 0.0])
        if gate_rule == "union":
            expected_gate = torch.tensor([1.0, relevance[1], relevance[2]])
        torch.testing.assert_close(gen.gate[0], expected_gate)
        valid_of[gate_rule] = gen.active[0].tolist()
    assert valid_of == {"ground_truth": [True, False, False], "union": [True, True, False]}

    # One text query per class (L = 1) then one visual query; the image is all class 0.
    targets = _full_image_targets([0])
    for gate_rule, valid_text in valid_of.items():
        out = _outputs(1, levels=1, num_visual=1, seed=3)
        out["query_valid"] = torch.tensor([valid_text + [True]])
        indices = _criterion().matcher(out, targets, generator=_gen())
        query_idx, target_idx = indices[0]
        # Text query 0 is fixed to the class-0 mask, the visual query is Hungarian-matched
        # to it too (one target); the false-positive text query 1 is matched to nothing.
        assert query_idx.tolist() == [0, K] and target_idx.tolist() == [0, 0]
        losses = _criterion(deep_supervision=False)(out, targets, generator=_gen())
        logp = out["pred_logits"][0].log_softmax(-1)
        # (query, target class, CE weight): no-object (index K) is weighted 0.1.
        terms = [(0, 0, 1.0), (K, 0, 1.0)]
        if gate_rule == "union":
            terms.append((1, K, 0.1))
        expected = -sum(wt * logp[q, c] for q, c, wt in terms) / sum(wt for *_, wt in terms)
        assert losses["loss_sup_ce"].item() == pytest.approx(expected.item(), rel=1e-6), gate_rule
