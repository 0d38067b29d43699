"""DualQueryDecoder: query layout, masking of inactive text queries, masked cross-attention,
deep-supervision outputs, Q_vis off, open vocabulary."""

import pytest
import torch
from torch import nn

from hiervl.modeling.dual_query_decoder import DualQueryDecoder
from hiervl.modeling.mask_head import DynamicMaskHead

B, L, K, D, C, M = 2, 2, 3, 32, 16, 4
SIZES = [(4, 4), (8, 8)]  # coarse -> fine
MASK_SIZE = (8, 8)
NUM_LEVELS = len(SIZES)


def _decoder(
    *, num_visual=M, num_layers=3, levels=NUM_LEVELS, pre_norm=False, head=None, text_queries=True
):
    torch.manual_seed(0)
    head = head or DynamicMaskHead(
        hidden_dim=D, mask_dim=D, clip_dim=C, kernel_mlp_layers=3, logit_scale_init=10.0
    )
    return DualQueryDecoder(
        hidden_dim=D,
        num_heads=4,
        ffn_dim=64,
        num_layers=num_layers,
        num_visual_queries=num_visual,
        num_feature_levels=levels,
        num_text_levels=L,
        pre_norm=pre_norm,
        dropout=0.0,
        mask_head=head,
        text_queries_enabled=text_queries,
    ).eval()


def _inputs(k=K, sizes=SIZES, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, L, k, D, generator=g)
    active = torch.ones(B, k, dtype=torch.bool)
    feats = [torch.randn(B, D, h, w, generator=g) for h, w in sizes]
    mask_feats = torch.randn(B, D, *MASK_SIZE, generator=g)
    class_embed = torch.randn(k, C, generator=g)
    return text, active, feats, mask_feats, class_embed


def test_outputs_layout_and_deep_supervision():
    dec = _decoder(num_layers=3)
    text, active, feats, mask_feats, class_embed = _inputs()
    active[1, 2] = False
    out = dec(text, active, feats, mask_feats, class_embed)
    q = L * K + M
    assert out["pred_logits"].shape == (B, q, K + 1)
    assert out["pred_masks"].shape == (B, q, *MASK_SIZE)
    assert out["query_proj"].shape == (B, q, C)
    assert len(out["aux_outputs"]) == 3
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_masks", "query_proj"}
        assert aux["pred_masks"].shape == out["pred_masks"].shape
    # Level-major text queries (index l*K + k), then the visual queries.
    assert out["query_class"].tolist() == [0, 1, 2, 0, 1, 2, -1, -1, -1, -1]
    expected_valid = torch.ones(B, q, dtype=torch.bool)
    expected_valid[1, [2, 2 + K]] = False
    assert torch.equal(out["query_valid"], expected_valid)


def test_inactive_text_queries_do_not_influence_the_others():
    dec = _decoder(num_layers=3)
    text, active, feats, mask_feats, class_embed = _inputs()
    active[0, 1] = False
    active[1, 0] = False
    out = dec(text, active, feats, mask_feats, class_embed)
    valid = out["query_valid"]

    perturbed = text.clone()
    perturbed[0, :, 1] += 5 * torch.randn(L, D)
    perturbed[1, :, 0] += 5 * torch.randn(L, D)
    out2 = dec(perturbed, active, feats, mask_feats, class_embed)
    for a, b in zip([out] + out["aux_outputs"], [out2] + out2["aux_outputs"]):
        for key in ("pred_logits", "pred_masks", "query_proj"):
            torch.testing.assert_close(a[key][valid], b[key][valid], rtol=1e-5, atol=1e-5)

    # Control: perturbing an active query does change the other queries (self-attention).
    perturbed = text.clone()
    perturbed[0, :, 2] += 5 * torch.randn(L, D)
    out3 = dec(perturbed, active, feats, mask_feats, class_embed)
    visual = slice(L * K, None)
    assert not torch.allclose(out["pred_logits"][0, visual], out3["pred_logits"][0, visual])


class _FixedMaskHead(nn.Module):
    """Mask logits fixed to ``pattern``; class logits read straight from the queries."""

    def __init__(self, pattern):
        super().__init__()
        self.pattern = pattern

    def forward(self, queries, mask_features, class_embed):
        b, q, _ = queries.shape
        masks = self.pattern.expand(b, q, *self.pattern.shape)
        return queries[..., : class_embed.shape[0] + 1], masks, queries[..., :C]


def test_masked_cross_attention_respects_the_previous_mask():
    # Mask positive on the left half of the 8x8 mask features -> columns 0-1 of the 4x4
    # level-0 map are visible, columns 2-3 are hidden from every query.
    pattern = torch.full(MASK_SIZE, -5.0)
    pattern[:, :4] = 5.0
    dec = _decoder(num_layers=1, head=_FixedMaskHead(pattern))
    text, active, feats, mask_feats, class_embed = _inputs()
    ref = dec(text, active, feats, mask_feats, class_embed)["pred_logits"]

    hidden = [feats[0].clone(), feats[1]]
    hidden[0][..., 2:] += 10 * torch.randn_like(hidden[0][..., 2:])
    torch.testing.assert_close(
        dec(text, active, hidden, mask_feats, class_embed)["pred_logits"], ref
    )

    visible = [feats[0].clone(), feats[1]]
    visible[0][..., :2] += 10 * torch.randn_like(visible[0][..., :2])
    changed = dec(text, active, visible, mask_feats, class_embed)["pred_logits"]
    assert (changed - ref).abs().max() > 1e-3

    # Layer 0 only reads level 0: the finer level cannot matter.
    other_level = [feats[0], feats[1] + 10]
    torch.testing.assert_close(
        dec(text, active, other_level, mask_feats, class_embed)["pred_logits"], ref
    )


def test_query_with_empty_mask_attends_everywhere():
    dec = _decoder(num_layers=1, head=_FixedMaskHead(torch.full(MASK_SIZE, -5.0)))
    text, active, feats, mask_feats, class_embed = _inputs()
    ref = dec(text, active, feats, mask_feats, class_embed)["pred_logits"]
    assert torch.isfinite(ref).all()
    hidden = [feats[0].clone(), feats[1]]
    hidden[0][..., 3] += 10
    changed = dec(text, active, hidden, mask_feats, class_embed)["pred_logits"]
    assert (changed - ref).abs().max() > 1e-3


def test_visual_queries_off():
    dec = _decoder(num_visual=0)
    assert not any("visual" in name for name, _ in dec.named_parameters())
    text, active, feats, mask_feats, class_embed = _inputs()
    out = dec(text, active, feats, mask_feats, class_embed)
    assert out["pred_logits"].shape == (B, L * K, K + 1)
    assert (out["query_class"] >= 0).all()
    out["pred_masks"].sum().backward()


def test_text_queries_off_equals_the_visual_queries_of_a_decoder_without_active_text():
    """Visual queries only (the Mask2Former query set): the same computation as the full
    decoder's visual queries when every text query is inactive (hidden as keys)."""
    full = _decoder(num_layers=3)
    visual_only = _decoder(num_layers=3, text_queries=False)
    assert visual_only.text_level_embed is None
    missing, unexpected = visual_only.load_state_dict(full.state_dict(), strict=False)
    assert missing == [] and unexpected == ["text_level_embed.weight"]
    text, active, feats, mask_feats, class_embed = _inputs()
    out = visual_only(text, active, feats, mask_feats, class_embed)
    assert out["query_class"].tolist() == [-1] * M and out["query_valid"].all()
    assert out["pred_logits"].shape == (B, M, K + 1)
    ref = full(text, torch.zeros_like(active), feats, mask_feats, class_embed)
    for a, b in zip([out] + out["aux_outputs"], [ref] + ref["aux_outputs"]):
        for key in ("pred_logits", "pred_masks", "query_proj"):
            torch.testing.assert_close(a[key], b[key][:, L * K :], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="DECODER.TEXT_QUERIES False needs visual queries"):
        _decoder(num_visual=0, text_queries=False)


def test_batched_equals_per_image():
    dec = _decoder()
    text, active, feats, mask_feats, class_embed = _inputs()
    active[1, 1] = False
    out = dec(text, active, feats, mask_feats, class_embed)
    for i in range(B):
        single = dec(
            text[i : i + 1],
            active[i : i + 1],
            [f[i : i + 1] for f in feats],
            mask_feats[i : i + 1],
            class_embed,
        )
        for key in ("pred_logits", "pred_masks", "query_proj"):
            torch.testing.assert_close(single[key][0], out[key][i], rtol=1e-4, atol=1e-5)


def test_open_vocabulary_changes_k():
    dec = _decoder()
    for k in (2, 5):
        out = dec(*_inputs(k=k))
        assert out["pred_logits"].shape == (B, L * k + M, k + 1)
        assert out["query_class"].tolist()[: L * k] == list(range(k)) * L


@pytest.mark.parametrize("sizes", [[(4, 4)], [(2, 2), (4, 4), (8, 8), (8, 8)]])
def test_feature_level_count_comes_from_the_inputs(sizes):
    dec = _decoder(levels=len(sizes), num_layers=len(sizes) + 1)
    out = dec(*_inputs(sizes=sizes))
    assert len(out["aux_outputs"]) == len(sizes) + 1
    with pytest.raises(ValueError, match="feature levels"):
        dec(*_inputs(sizes=sizes + [(4, 4)]))


def test_gradients_reach_every_parameter_pre_norm():
    dec = _decoder(pre_norm=True).train()
    out = dec(*_inputs())
    loss = out["pred_logits"].logsumexp(-1).sum() + out["pred_masks"].sigmoid().sum()
    loss = loss + out["query_proj"][..., 0].sum()
    loss.backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_text_level_embedding_separates_levels():
    dec = _decoder()
    text, active, feats, mask_feats, class_embed = _inputs()
    text[:, 1] = text[:, 0]  # same content at both levels
    logits = dec(text, active, feats, mask_feats, class_embed)["pred_logits"]
    assert not torch.allclose(logits[:, :K], logits[:, K : 2 * K])


def test_input_errors():
    dec = _decoder()
    text, active, feats, mask_feats, class_embed = _inputs()
    with pytest.raises(ValueError, match="text_queries"):
        dec(text[:, :1], active, feats, mask_feats, class_embed)
    with pytest.raises(ValueError, match="class_embed"):
        dec(text, active, feats, mask_feats, class_embed[:-1])
    with pytest.raises(ValueError, match="NUM_LAYERS"):
        _decoder(num_layers=0)


def test_text_queries_for_a_subset_of_the_classes():
    """``text_classes`` names each text-query column's class: the queries of that subset
    equal the full decoder's queries of those classes when the others are inactive, and
    the classifier still scores every class."""
    dec = _decoder(num_layers=2)
    text, active, feats, mask_feats, class_embed = _inputs()
    active[:, 1] = False  # class 1 pruned in every image
    full = dec(text, active, feats, mask_feats, class_embed)
    keep = torch.tensor([0, 2])
    sub = dec(text[:, :, keep], active[:, keep], feats, mask_feats, class_embed, text_classes=keep)
    assert sub["query_class"].tolist() == [0, 2, 0, 2, -1, -1, -1, -1]
    assert sub["pred_logits"].shape == (B, L * 2 + M, K + 1)
    rows = full["query_valid"][0]
    for key in ("pred_logits", "pred_masks"):
        torch.testing.assert_close(sub[key], full[key][:, rows])


def test_text_classes_errors():
    dec = _decoder(num_layers=1)
    text, active, feats, mask_feats, class_embed = _inputs()
    with pytest.raises(ValueError, match="text_classes must be"):
        dec(text, active, feats, mask_feats, class_embed, text_classes=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        dec(text, active, feats, mask_feats, class_embed, text_classes=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="pass text_classes"):
        dec(text[:, :, :2], active[:, :2], feats, mask_feats, class_embed)
