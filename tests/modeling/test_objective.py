"""HierVLObjective at tiny sizes: which terms exist, how they are weighted, and that the
semi-supervised wiring (teacher pass, CutMix of pseudo-labels, MaskCLIP decay, masked
VL losses) does what DESIGN §2-3 says. Plain torch (no detectron2)."""

import pytest
import torch
import torch.nn.functional as F
from tiny_hiervl import (
    CLASSES,
    DECODER_LAYERS,
    SIZE,
    build_model,
    build_objective,
    labeled_batch,
    unlabeled_batch,
)

from hiervl.modeling import objective as objective_module
from hiervl.modeling.ssl_losses import maskclip_loss, maskclip_pseudo_labels
from hiervl.modeling.vl_losses import blank_random_class

SUP = {"loss_sup_ce", "loss_sup_mask", "loss_sup_dice"}
SUP_ALL = (
    SUP | {f"{k}_{i}" for k in SUP for i in range(DECODER_LAYERS)} | {"loss_sup_rel", "loss_sup_qt"}
)
UNSUP = {
    "loss_unsup_s1",
    "loss_unsup_s2",
    "loss_unsup_fp",
    "loss_unsup_entropy",
    "loss_unsup_maskclip_s1",
    "loss_unsup_maskclip_s2",
    "loss_unsup_maskclip_fp",
}
VL = {"loss_vl_prompt", "loss_vl_mask", "loss_vl_pt"}


@pytest.fixture(scope="module")
def model():
    return build_model().train()


def _probs(model, images, padding=None):
    """P of ``images`` from the model in eval mode (the teacher's view), one image at a time;
    ``padding`` (B,H,W) bool tells the pixel decoder which pixels are padding."""
    was_training = model.training
    model.eval()
    pads = [None] * len(images) if padding is None else padding[:, None]
    with torch.no_grad():
        out = [
            model.semantic_probs(model.semantic_scores(model(x[None], padding=p), (SIZE, SIZE)))
            for x, p in zip(images, pads)
        ]
    model.train(was_training)
    return torch.cat(out)


class _Calls:
    """Forward pre-hook recording every call of the network (mode, grad, inputs)."""

    def __init__(self, model, fail_when_eval=False):
        self.calls = []
        self.fail_when_eval = fail_when_eval
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append(
            {
                "training": module.training,
                "grad": torch.is_grad_enabled(),
                "images": args[0].detach().clone(),
                "perturb": kwargs.get("perturb_features", False),
                "presence": kwargs.get("presence"),
            }
        )
        if self.fail_when_eval and not module.training:
            raise RuntimeError("teacher failed")


def test_every_term_is_prefixed_finite_and_trains(model):
    model.zero_grad()
    losses = build_objective()(model, labeled_batch(2), unlabeled_batch(2))
    assert set(losses) == SUP_ALL | UNSUP | VL
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    # Block labels give whole tokens of one class: L_mask / L_pt really see tokens.
    assert losses["loss_vl_mask"] > 0 and losses["loss_vl_pt"] > 0
    sum(losses.values()).backward()
    assert model.text_encoder.prompt.grad.abs().sum() > 0
    # ln_post + proj of the fine-tuned tower learn only through L_pt.
    assert model.backbone.visual.proj.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.frozen_encoder.parameters())


def test_supervised_terms_weigh_the_same_next_to_the_unlabelled_stream(model):
    """L_x + .25 L_s1 + .25 L_s2 + .5 L_fp: UniMatch's ratios without its global / 2, so
    every L_x term (and every VL term) is the same with and without unlabelled images."""
    objective = build_objective()
    labeled = labeled_batch(1)
    with torch.no_grad():
        torch.manual_seed(3)
        alone = objective(model, labeled, None)
        torch.manual_seed(3)
        both = objective(model, labeled, unlabeled_batch(1))
    assert not any(k.startswith("loss_unsup_") for k in alone)
    assert set(alone) == SUP_ALL | VL
    # (L_mask / L_pt blank a random class after the unlabelled passes drew random numbers.)
    for name in SUP_ALL | {"loss_vl_prompt"}:
        torch.testing.assert_close(both[name], alone[name], rtol=1e-5, atol=1e-7)


def test_teacher_pass_is_eval_without_grad_and_restores_train_mode(model):
    unlabeled = unlabeled_batch(1)
    spy = _Calls(model)
    try:
        build_objective()(model, labeled_batch(1), unlabeled)
    finally:
        spy.handle.remove()
    assert model.training
    modes = [(c["training"], c["grad"], c["perturb"]) for c in spy.calls]
    # labelled student, teacher (weak + partner weak), strong views, feature-perturbed view
    assert modes == [(True, True, False), (False, False, False), (True, True, False)] + [
        (True, True, True)
    ]
    teacher, strong, fp = spy.calls[1]["images"], spy.calls[2]["images"], spy.calls[3]["images"]
    assert torch.equal(teacher, torch.cat([unlabeled.weak, unlabeled.mix_weak]))
    # The student sees the CutMixed strong views: the partner's pixels inside each box.
    u = unlabeled
    expected_s1 = torch.where(u.box1[:, None], u.mix_strong1, u.strong1)
    expected_s2 = torch.where(u.box2[:, None], u.mix_strong2, u.strong2)
    assert torch.equal(strong, torch.cat([expected_s1, expected_s2]))
    assert torch.equal(fp, u.weak)
    # The GT gate is used for the labelled images only.
    assert spy.calls[0]["presence"] is not None
    assert all(c["presence"] is None for c in spy.calls[1:])


def test_teacher_pass_restores_train_mode_after_an_error(model):
    spy = _Calls(model, fail_when_eval=True)
    try:
        with pytest.raises(RuntimeError, match="teacher failed"):
            build_objective()(model, labeled_batch(1), unlabeled_batch(1))
    finally:
        spy.handle.remove()
    assert model.training


def test_teacher_targets_are_the_eval_argmax_of_each_weak_view(model):
    unlabeled = unlabeled_batch(2)
    objective = build_objective()
    text = model.class_embeddings()
    own, partner = objective.teacher_targets(model, unlabeled, text)
    assert model.training

    for pseudo, images, ignore in (
        (own, unlabeled.weak, unlabeled.ignore),
        (partner, unlabeled.mix_weak, unlabeled.mix_ignore),
    ):
        probs = _probs(model, images)
        conf, labels = probs.max(dim=1)
        assert not pseudo.labels.requires_grad and not pseudo.conf.requires_grad
        torch.testing.assert_close(pseudo.conf, conf, rtol=1e-4, atol=1e-5)
        # Batched and single-image passes differ by float noise: allow rare argmax ties.
        assert (pseudo.labels == labels).float().mean() > 0.999
        assert torch.equal(pseudo.ignore, ignore)
        with torch.no_grad():
            dense = model.frozen_encoder(images).dense_clip
        expected_clip = maskclip_pseudo_labels(
            dense,
            text[1],
            output_size=(SIZE, SIZE),
            logit_scale=100.0,
            certainty_threshold=0.9,
            ignore=ignore,
        )
        assert torch.equal(pseudo.maskclip, expected_clip)


def test_cutmix_pseudo_labels_take_the_partner_inside_the_box(model, monkeypatch):
    """Teacher labels are replaced by per-image constants (own images 0, 1; partners 2, 3)
    so that "inside the box = partner's, outside = own" is visible at every pixel."""
    b = 2
    unlabeled = unlabeled_batch(b)

    def fake_pseudo_labels(probs):
        index = torch.arange(probs.shape[0])[:, None, None].expand(-1, SIZE, SIZE)
        return index.clone(), 0.5 + 0.1 * index.float()

    def fake_maskclip(dense_clip, text_clip, **kwargs):
        index = torch.arange(dense_clip.shape[0])[:, None, None].expand(-1, SIZE, SIZE)
        return (len(CLASSES) - 1 - index).clone()

    seen = {"consistency": [], "maskclip": []}
    real_consistency, real_maskclip = objective_module.consistency_loss, maskclip_loss

    def spy_consistency(probs, labels, confidence, ignore, **kwargs):
        seen["consistency"].append((labels, confidence, ignore))
        return real_consistency(probs, labels, confidence, ignore, **kwargs)

    def spy_maskclip(probs, labels, **kwargs):
        seen["maskclip"].append(labels)
        return real_maskclip(probs, labels, **kwargs)

    monkeypatch.setattr(objective_module, "pseudo_labels", fake_pseudo_labels)
    monkeypatch.setattr(objective_module, "maskclip_pseudo_labels", fake_maskclip)
    monkeypatch.setattr(objective_module, "consistency_loss", spy_consistency)
    monkeypatch.setattr(objective_module, "maskclip_loss", spy_maskclip)
    with torch.no_grad():
        build_objective()(model, labeled_batch(1), unlabeled)

    own = torch.arange(b)[:, None, None].expand(-1, SIZE, SIZE)
    partner = own + b
    u = unlabeled
    views = {"s1": u.box1, "s2": u.box2, "fp": torch.zeros_like(u.box1)}
    assert len(seen["consistency"]) == len(seen["maskclip"]) == 3
    for (name, cut), (labels, conf, ignore), mclip in zip(
        views.items(), seen["consistency"], seen["maskclip"]
    ):
        assert torch.equal(labels, torch.where(cut, partner, own)), name
        torch.testing.assert_close(conf, 0.5 + 0.1 * torch.where(cut, partner, own).float())
        assert torch.equal(ignore, torch.where(cut, u.mix_ignore, u.ignore)), name
        own_clip, partner_clip = len(CLASSES) - 1 - own, len(CLASSES) - 1 - partner
        assert torch.equal(mclip, torch.where(cut, partner_clip, own_clip)), name


def test_consistency_and_maskclip_terms_by_hand(model):
    """Strong views = weak view, no CutMix, no feature dropout: every student view then
    predicts exactly the teacher's P, so each term is a closed-form function of P."""
    weak = unlabeled_batch(1).weak
    no_box = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    ignore = no_box.clone()
    ignore[:, -8:] = True
    unlabeled = objective_module.UnlabeledBatch(
        weak=weak, strong1=weak, strong2=weak, box1=no_box, box2=no_box, ignore=ignore,
        mix_weak=weak, mix_strong1=weak, mix_strong2=weak, mix_ignore=ignore,
    )  # fmt: skip
    objective = build_objective(
        conf_threshold=0.0, consistency_weight=2.0, maskclip_certainty=0.0, entropy_weight=0.3
    )
    model.feature_dropout = 0.0
    try:
        with torch.no_grad():
            losses = objective(model, labeled_batch(1), unlabeled, iteration=25, max_iter=100)
    finally:
        model.feature_dropout = 0.5

    probs = _probs(model, weak, padding=ignore)
    valid = ~ignore
    nll = -probs.max(dim=1).values.log()
    ce = (nll * valid).sum() / valid.sum()
    entropy = (-(probs * probs.log()).sum(dim=1) * valid).sum() / valid.sum()
    with torch.no_grad():
        dense = model.frozen_encoder(weak).dense_clip
        t_clip = model.class_embeddings()[1]
    mclip = maskclip_pseudo_labels(
        dense,
        t_clip,
        output_size=(SIZE, SIZE),
        logit_scale=100.0,
        certainty_threshold=0.0,
        ignore=ignore,
    )
    mclip_ce = maskclip_loss(probs, mclip)
    weight = 0.1 * (1 - 25 / 100)
    tol = dict(rtol=2e-4, atol=1e-6)
    for name, view_weight in (("s1", 0.25), ("s2", 0.25), ("fp", 0.5)):
        torch.testing.assert_close(losses[f"loss_unsup_{name}"], 2.0 * view_weight * ce, **tol)
        # SemiVL's λ · view weight next to a halved L_x: twice that relative to L_x.
        torch.testing.assert_close(
            losses[f"loss_unsup_maskclip_{name}"], weight * 2 * view_weight * mclip_ce, **tol
        )
    torch.testing.assert_close(losses["loss_unsup_entropy"], 0.3 * entropy, **tol)
    assert ce > 0 and mclip_ce > 0


def test_consistency_terms_vanish_above_a_threshold_of_one(model):
    objectives = {t: build_objective(conf_threshold=t) for t in (1.01, 0.0)}
    with torch.no_grad():
        strict, loose = (
            o(model, labeled_batch(1), unlabeled_batch(1)) for o in objectives.values()
        )
    for name in ("s1", "s2", "fp"):
        assert strict[f"loss_unsup_{name}"] == 0, name
        assert loose[f"loss_unsup_{name}"] > 0, name
    # The share of confident pixels the silent-consistency hook reads.
    assert objectives[1.01].confident_fraction == 0.0
    assert objectives[0.0].confident_fraction == 1.0


def test_confident_fraction_counts_both_weak_views_by_hand(model):
    unlabeled = unlabeled_batch(2)
    text = tuple(t.detach() for t in model.class_embeddings())
    with torch.no_grad():
        own, partner = build_objective().teacher_targets(model, unlabeled, text)
        conf = torch.cat([own.conf, partner.conf])
        valid = ~torch.cat([own.ignore, partner.ignore])
        threshold = float(conf[valid].median())
        objective = build_objective(conf_threshold=threshold)
        objective(model, labeled_batch(1), unlabeled)
        fraction = objective.confident_fraction
        objective(model, labeled_batch(1), None)
    expected = ((conf >= threshold) & valid).sum().item() / valid.sum().item()
    assert 0 < expected < 1
    assert fraction == pytest.approx(expected)
    assert objective.confident_fraction is None  # no unlabelled batch, nothing to measure


@pytest.mark.parametrize(
    "overrides,absent",
    [
        ({"entropy_weight": 0.0}, {"loss_unsup_entropy"}),
        (
            {"maskclip_weight": 0.0},
            {"loss_unsup_maskclip_s1", "loss_unsup_maskclip_s2", "loss_unsup_maskclip_fp"},
        ),
        ({"prompt_weight": 0.0, "prompt_projector": None}, {"loss_vl_prompt"}),
        ({"mask_weight": 0.0}, {"loss_vl_mask"}),
        ({"pt_weight": 0.0}, {"loss_vl_pt"}),
        ({"mask_weight": 0.0, "pt_weight": 0.0}, {"loss_vl_mask", "loss_vl_pt"}),
    ],
)
def test_each_term_can_be_switched_off(model, overrides, absent):
    with torch.no_grad():
        losses = build_objective(**overrides)(model, labeled_batch(1), unlabeled_batch(1))
    assert set(losses) == (SUP_ALL | UNSUP | VL) - absent


def test_prompt_term_needs_its_projector():
    with pytest.raises(ValueError, match="PROMPT_WEIGHT"):
        build_objective(prompt_projector=None)


def test_maskclip_weight_decays_linearly_to_zero(model):
    objective = build_objective(maskclip_certainty=0.0)
    labeled, unlabeled = labeled_batch(1), unlabeled_batch(1)
    values = {}
    with torch.no_grad():
        for iteration in (0, 50, 100, 130):
            torch.manual_seed(0)  # same dropout / point sampling in every call
            losses = objective(model, labeled, unlabeled, iteration=iteration, max_iter=100)
            values[iteration] = {k: losses[f"loss_unsup_maskclip_{k}"] for k in ("s1", "s2", "fp")}
    for view in ("s1", "s2", "fp"):
        assert values[0][view] > 0
        torch.testing.assert_close(values[50][view], 0.5 * values[0][view])
        assert values[100][view] == 0 and values[130][view] == 0


def test_masked_losses_compare_blanked_student_with_frozen_original(model, monkeypatch):
    captured = []

    def spy_blank(images, labels, **kwargs):
        out = blank_random_class(images, labels, **kwargs)
        captured.append((images, labels, out))
        return out

    monkeypatch.setattr(objective_module, "blank_random_class", spy_blank)
    labeled = labeled_batch(2)
    with torch.no_grad():
        losses = build_objective()(model, labeled, None)
    ((images, labels, blanked),) = captured
    assert torch.equal(images, labeled.images) and torch.equal(labels, labeled.labels)
    assert blanked.token_mask.any()

    with torch.no_grad():
        x_mask = model.backbone.forward_tokens(blanked.images)
        x_ref = model.frozen_encoder(labeled.images).dense_tokens
        t_clip = model.class_embeddings()[1]
        proj = F.normalize(model.backbone.to_clip_space(x_mask), dim=-1)
    m = blanked.token_mask
    cos = F.cosine_similarity(x_mask, x_ref, dim=-1)
    torch.testing.assert_close(losses["loss_vl_mask"], 0.5 * (1 - cos[m]).mean())
    logits = proj[m] @ F.normalize(t_clip, dim=-1).t() / 0.07
    ce = F.cross_entropy(logits, blanked.token_labels[m])
    torch.testing.assert_close(losses["loss_vl_pt"], 0.1 * ce, rtol=1e-4, atol=1e-6)


def test_masked_losses_on_unlabelled_images_use_only_confident_pseudo_labels(model, monkeypatch):
    captured = []

    def spy_blank(images, labels, **kwargs):
        captured.append((images, labels))
        return blank_random_class(images, labels, **kwargs)

    monkeypatch.setattr(objective_module, "blank_random_class", spy_blank)
    labeled, unlabeled = labeled_batch(1), unlabeled_batch(1)
    for threshold in (1.01, 0.0):
        captured.clear()
        objective = build_objective(mask_on_unlabeled=True, conf_threshold=threshold)
        with torch.no_grad():
            objective(model, labeled, unlabeled)
        ((images, labels),) = captured
        assert torch.equal(images, torch.cat([labeled.images, unlabeled.weak]))
        assert torch.equal(labels[:1], labeled.labels)
        if threshold > 1:  # nothing is confident: the unlabelled image contributes no class
            assert (labels[1] == 255).all()
        else:  # everything valid is pseudo-labelled with the teacher's argmax
            expected = _probs(model, unlabeled.weak).argmax(dim=1)[0]
            valid = ~unlabeled.ignore[0]
            assert (labels[1][~valid] == 255).all()
            assert (labels[1][valid] == expected[valid]).float().mean() > 0.999
