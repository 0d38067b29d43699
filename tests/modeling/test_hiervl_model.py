"""The whole network (HierVLModel) at tiny sizes: where gradients go, what inference returns.

Plain torch (no detectron2): the modules are built directly by ``tiny_hiervl``.
"""

import pytest
import torch
import torch.nn.functional as F
from tiny_hiervl import CLASSES, SIZE, build_criterion, build_model, labeled_batch

from hiervl.modeling.criterion import semantic_to_targets
from hiervl.modeling.inference import semantic_inference

# Used only by L_pt (``to_clip_space``), never by the segmentation path.
CLIP_SPACE_ONLY = {
    "backbone.visual.proj",
    "backbone.visual.ln_post.weight",
    "backbone.visual.ln_post.bias",
}


@pytest.fixture(scope="module")
def model():
    return build_model().eval()


def _images(batch, height=SIZE, width=SIZE, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _supervised_loss(model):
    """Criterion total of a labelled batch, computed as the objective does."""
    batch = labeled_batch(2)
    targets = [semantic_to_targets(lab, num_classes=len(CLASSES)) for lab in batch.labels]
    presence = torch.zeros(2, len(CLASSES), dtype=torch.bool)
    for i, target in enumerate(targets):
        presence[i, target["labels"]] = True
    out = model(batch.images, presence=presence, with_frozen=True)
    losses = build_criterion()(out, targets, relevance=out["relevance"], text_clip=out["text"][1])
    return sum(losses.values()), out


def test_supervised_gradients_reach_exactly_the_learnable_parts():
    model = build_model().train()
    loss, out = _supervised_loss(model)
    loss.backward()

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    without_grad = {n for n, p in trainable.items() if p.grad is None}
    assert without_grad == CLIP_SPACE_ONLY
    for name, p in trainable.items():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name

    learners = {
        "prompt": [model.text_encoder.prompt],
        "hsqg mlps": list(model.hsqg.level_mlps.parameters()),
        "hsqg gate w": [model.hsqg.logit_scale],
        "hsqg gate b": [model.hsqg.logit_bias],
        "cmsam": list(model.pixel_decoder.cmsam_layers.parameters()),
        "deformable encoder": list(model.pixel_decoder.encoder_layers.parameters()),
        "decoder cross-attn": list(model.decoder.cross_attn.parameters()),
        "decoder self-attn": list(model.decoder.self_attn.parameters()),
        "visual queries": list(model.decoder.visual_feat.parameters()),
        "text level embedding": list(model.decoder.text_level_embed.parameters()),
        "mask kernels": list(model.decoder.mask_head.kernel_mlp.parameters()),
        "Φ (L_qt)": list(model.decoder.mask_head.proj.parameters()),
        "void embedding": [model.decoder.mask_head.void_embed],
        "classifier scale": [model.decoder.mask_head.logit_scale],
        "ViT patch embedding": [model.backbone.visual.conv1.weight],
        "ViT blocks": list(model.backbone.visual.transformer.parameters()),
        "feature pyramid": list(model.backbone.pyramid.parameters()),
    }
    for part, params in learners.items():
        assert all(p.grad is not None for p in params), part
        assert sum(float(p.grad.norm()) for p in params) > 0, part

    frozen_text = [(n, p) for n, p in model.text_encoder.named_parameters() if n != "prompt"]
    assert frozen_text and all(not p.requires_grad and p.grad is None for _, p in frozen_text)
    frozen_image = list(model.frozen_encoder.parameters())
    assert frozen_image and all(not p.requires_grad and p.grad is None for p in frozen_image)
    # E_I^0's features and t^CLIP carry no graph at all; t does (to the prompt).
    assert not out["frozen"].global_embed.requires_grad
    assert not out["frozen"].dense_tokens.requires_grad
    t, t_clip = out["text"]
    assert t.requires_grad and not t_clip.requires_grad


def test_training_step_moves_the_student_not_the_frozen_copy():
    """E_I^0 is a copy: a step on every trainable weight leaves it (and t^CLIP) unchanged."""
    model = build_model().train()
    assert not model.frozen_encoder.training
    images = _images(1)
    with torch.no_grad():
        frozen_before = model.frozen_encoder(images).global_embed.clone()
        tokens_before = model.backbone.forward_tokens(images).clone()
        t_before, t_clip_before = (x.clone() for x in model.class_embeddings())

    loss, _ = _supervised_loss(model)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad.sign())

    with torch.no_grad():
        assert torch.equal(model.frozen_encoder(images).global_embed, frozen_before)
        assert not torch.allclose(model.backbone.forward_tokens(images), tokens_before)
        t_after, t_clip_after = model.class_embeddings()
    assert torch.equal(t_clip_after, t_clip_before)
    assert not torch.allclose(t_after, t_before)


def test_semantic_probs_are_mask2former_scores_normalised_over_classes(model):
    images = _images(2)
    presence = torch.zeros(2, len(CLASSES), dtype=torch.bool)
    presence[0, [0, 2]] = True
    presence[1, 4] = True
    with torch.no_grad():
        out = model(images, presence=presence)
        mask_size = tuple(out["pred_masks"].shape[-2:])
        small = model.semantic_scores(out, mask_size)
        scores = model.semantic_scores(out, (SIZE, SIZE))
        probs = model.semantic_probs(scores)

    # S by hand, over the valid queries only (inactive text queries drop out).
    valid = out["query_valid"]
    assert not valid.all() and valid.any(dim=1).all()
    expected = torch.zeros(2, len(CLASSES), *mask_size)
    for b in range(2):
        for i in valid[b].nonzero().flatten().tolist():
            cls = out["pred_logits"][b, i].softmax(-1)[:-1]
            expected[b] += cls[:, None, None] * out["pred_masks"][b, i].sigmoid()
    torch.testing.assert_close(small, expected, rtol=1e-4, atol=1e-5)

    assert probs.shape == (2, len(CLASSES), SIZE, SIZE)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, SIZE, SIZE), rtol=0, atol=1e-5)
    torch.testing.assert_close(probs, scores / scores.sum(dim=1, keepdim=True))
    assert torch.equal(probs.argmax(dim=1), scores.argmax(dim=1))


@pytest.mark.parametrize("height,width", [(45, 67), (33, 50), (63, 31)])
def test_predict_scores_crops_the_padding_back_off(model, height, width):
    """An odd-sized window is zero-padded to multiples of 32, the pixel decoder is told
    which pixels are padding, and the padding is cropped away."""
    images = _images(2, height, width)
    padded_h, padded_w = -(-height // 32) * 32, -(-width // 32) * 32
    padded = F.pad(images, (0, padded_w - width, 0, padded_h - height))
    padding = torch.ones(2, padded_h, padded_w, dtype=torch.bool)
    padding[:, :height, :width] = False
    with torch.no_grad():
        scores = model.predict_scores(images)
        out = model(padded, padding=padding)
        masks = F.interpolate(out["pred_masks"], size=(padded_h, padded_w), mode="bilinear")
        reference = semantic_inference(out["pred_logits"], masks, out["query_valid"])
        unmasked = model.predict_scores(padded)
    assert scores.shape == (2, len(CLASSES), height, width)
    torch.testing.assert_close(scores, reference[:, :, :height, :width])
    # Without the padding map the padded cells are attended and the scores differ; a pad
    # thinner than the finest encoder cell (8 px) leaves no cell fully padded.
    thick = max(padded_h - height, padded_w - width) >= 8
    assert torch.allclose(scores, unmasked[:, :, :height, :width], atol=1e-4) != thick


def test_predict_scores_resizes_mask_logits_before_the_sigmoid(model):
    images = _images(1)
    with torch.no_grad():
        out = model(images)
        masks = F.interpolate(
            out["pred_masks"], size=(SIZE, SIZE), mode="bilinear", align_corners=False
        )
        expected = semantic_inference(out["pred_logits"], masks, out["query_valid"])
        torch.testing.assert_close(model.predict_scores(images), expected)


def test_prune_classes_drops_what_hsqg_pruned(model):
    """TEST.PRUNE_CLASSES: S[k] of a class HSQG pruned for the image is 0; the other
    classes keep their scores. Without it the visual queries still give pruned classes
    score mass (random init: the gate keeps MIN_ACTIVE = 1 class of 6)."""
    images = _images(2, seed=9)
    with torch.no_grad():
        text = model.class_embeddings()
        active = model(images, text=text)["active"]
        plain = model.predict_scores(images, text)
        pruned = model.predict_scores(images, text, prune_classes=True)
    assert active.any(dim=1).all() and not active.all(), "the test needs some pruned classes"
    gone = ~active[:, :, None, None].expand_as(plain)
    assert (plain[gone] > 0).all()  # visual queries vote for pruned classes
    assert (pruned[gone] == 0).all()
    torch.testing.assert_close(pruned[~gone], plain[~gone])
    # The label of every pixel is now one of the image's active classes.
    labels = pruned.argmax(dim=1)
    for b in range(2):
        assert active[b][labels[b]].all()


def test_batched_equals_per_image(model):
    images = _images(3, seed=4)
    presence = torch.zeros(3, len(CLASSES), dtype=torch.bool)
    presence[0, [1, 3]] = True
    presence[2, 5] = True
    labeled = torch.tensor([True, False, True])
    with torch.no_grad():
        text = model.class_embeddings()
        scores = model.predict_scores(images, text)
        batched = model(images, presence=presence, labeled=labeled, text=text)
        for b in range(3):
            one = slice(b, b + 1)
            torch.testing.assert_close(
                scores[one], model.predict_scores(images[one], text), rtol=1e-4, atol=1e-5
            )
            single = model(images[one], presence=presence[one], labeled=labeled[one], text=text)
            assert torch.equal(single["active"], batched["active"][one])
            # The batch computes the classes of every image; this image's valid queries
            # are the same queries (same classes, same order) with the same outputs.
            mine = batched["query_valid"][b]
            assert single["query_valid"].all()
            assert torch.equal(single["query_class"], batched["query_class"][mine])
            for key in ("pred_logits", "pred_masks"):
                torch.testing.assert_close(
                    single[key][0], batched[key][b][mine], rtol=1e-4, atol=1e-4
                )
            torch.testing.assert_close(single["relevance"], batched["relevance"][one])
    # The labelled gate really is the ground truth, the unlabelled one the prediction.
    assert torch.equal(batched["gate"][0], presence[0].float())
    assert torch.equal(batched["gate"][1], batched["relevance"][1])


def test_permuting_the_vocabulary_permutes_the_scores():
    """Open vocabulary: nothing depends on a class's index, only on its name."""
    model = build_model().eval()
    images = _images(2, seed=7)
    order = [3, 0, 5, 1, 4, 2]
    with torch.no_grad():
        scores = model.predict_scores(images)
        model.set_vocabulary([CLASSES[i] for i in order])
        permuted = model.predict_scores(images)
    torch.testing.assert_close(permuted, scores[:, order], rtol=1e-4, atol=1e-5)


def test_a_new_vocabulary_changes_k_without_new_weights():
    model = build_model().eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.set_vocabulary(["cat", "dog", "traffic light"])
        scores = model.predict_scores(_images(1, 40, 56))
    assert scores.shape == (1, 3, 40, 56)
    assert model.class_names == ["cat", "dog", "traffic light"]
    probs = model.semantic_probs(scores)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 40, 56), rtol=0, atol=1e-5)
    state = model.state_dict()
    assert set(state) == set(weights), "the vocabulary changed the checkpoint layout"
    for name, value in state.items():
        assert torch.equal(value, weights[name]), name


def _count_frozen_calls(model):
    """Wrap E_I^0's full pass and its native-size global pass with call counters."""
    calls = {"forward": 0, "global": 0}
    encoder = model.frozen_encoder
    encoder.register_forward_hook(lambda *args: calls.update(forward=calls["forward"] + 1))
    inner = encoder.global_embedding

    def counted(x, **kwargs):
        calls["global"] += 1
        return inner(x, **kwargs)

    encoder.global_embedding = counted
    return calls, inner


@pytest.mark.parametrize("hsqg_enabled", [False, True])
def test_frozen_passes_run_only_when_needed(hsqg_enabled):
    """E_I^0 at full resolution runs only when a loss asks for its features; HSQG's v comes
    from E_I^0 at CLIP's native size, and static queries (HSQG off) need no image at all."""
    images = _images(2)
    model = build_model(hsqg_enabled=hsqg_enabled).eval()
    calls, global_embedding = _count_frozen_calls(model)
    with torch.no_grad():
        lean = model(images)
        assert calls == {"forward": 0, "global": int(hsqg_enabled)}
        assert lean["frozen"] is None
        full = model(images, with_frozen=True)
    assert calls == {"forward": 1, "global": 2 * int(hsqg_enabled)}
    assert full["frozen"] is not None
    torch.testing.assert_close(lean["pred_logits"], full["pred_logits"])
    torch.testing.assert_close(lean["pred_masks"], full["pred_masks"])
    if hsqg_enabled:
        with torch.no_grad():
            t = model.class_embeddings()[0]
            want = model.hsqg.relevance(t, global_embedding(images))
        torch.testing.assert_close(lean["relevance"], want)
    else:
        assert lean["relevance"] is None


def test_classes_no_image_keeps_are_not_computed_and_change_nothing(model, monkeypatch):
    """HierVLModel drops the text queries of classes pruned in every image of the batch;
    the valid queries' outputs equal those of the model computing every class (pruned
    ones masked), in inference and for the criterion's losses."""
    from hiervl.modeling import hiervl_model

    batch = labeled_batch(2, seed=3)
    targets = [semantic_to_targets(lab, num_classes=len(CLASSES)) for lab in batch.labels]
    presence = torch.zeros(2, len(CLASSES), dtype=torch.bool)
    for i, target in enumerate(targets):
        presence[i, target["labels"]] = True
    live = presence.any(0).nonzero().squeeze(1)
    assert 0 < len(live) < len(CLASSES), "the case needs a class no image has"
    with torch.no_grad():
        text = model.class_embeddings()
        compact = model(batch.images, presence=presence, text=text)
        monkeypatch.setattr(hiervl_model, "live_text_queries", lambda q, a: (q, a, None))
        full = model(batch.images, presence=presence, text=text)
    levels = model.hsqg.num_levels
    num_visual = model.decoder.num_visual_queries
    assert full["pred_logits"].shape[1] == levels * len(CLASSES) + num_visual
    assert compact["query_class"].tolist() == live.tolist() * levels + [-1] * num_visual
    for b in range(2):
        keep = full["query_valid"][b]
        mine = compact["query_valid"][b]
        assert torch.equal(full["query_class"][keep], compact["query_class"][mine])
        for key in ("pred_logits", "pred_masks", "query_proj"):
            torch.testing.assert_close(compact[key][b][mine], full[key][b][keep])
        for aux_c, aux_f in zip(compact["aux_outputs"], full["aux_outputs"]):
            torch.testing.assert_close(aux_c["pred_masks"][b][mine], aux_f["pred_masks"][b][keep])
    torch.testing.assert_close(
        model.semantic_scores(compact, (SIZE, SIZE)), model.semantic_scores(full, (SIZE, SIZE))
    )
    criterion = build_criterion()
    kwargs = {"relevance": full["relevance"], "text_clip": text[1]}
    loss_full = criterion(full, targets, generator=torch.Generator().manual_seed(0), **kwargs)
    loss_compact = criterion(compact, targets, generator=torch.Generator().manual_seed(0), **kwargs)
    assert loss_full.keys() == loss_compact.keys()
    for name in loss_full:
        torch.testing.assert_close(loss_compact[name], loss_full[name], msg=name)
