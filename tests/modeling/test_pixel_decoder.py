"""CMSAMPixelDecoder: level pairing, ablations, pruning, strides, gradients, batching."""

import math

import pytest
import torch
import torch.nn.functional as F

from hiervl.modeling.deformable_encoder import encoder_reference_points, sine_position_encoding
from hiervl.modeling.pixel_decoder import CMSAMPixelDecoder

D, K = 32, 5
SHAPE = {"res2": (16, 4), "res3": (24, 8), "res4": (20, 16), "res5": (28, 32)}
ENCODER_FEATURES = ["res3", "res4", "res5"]


def _decoder(**overrides):
    kwargs = dict(
        input_shape=SHAPE,
        transformer_in_features=ENCODER_FEATURES,
        conv_dim=D,
        mask_dim=24,
        num_encoder_layers=2,
        num_heads=4,
        num_points=2,
        ffn_dim=48,
        dropout=0.0,
        common_stride=4,
        cmsam_enabled=True,
        cmsam_heads=2,
        cmsam_ffn_dim=48,
        cmsam_dropout=0.0,
        num_text_levels=3,
        mask_padding=True,
        norm_groups=8,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return CMSAMPixelDecoder(**kwargs).eval()


def _features(batch=2, grid=(3, 5), seed=1):
    """A ViT-style pyramid: stride-16 grid h×w, res5 = floor-halved, res3/res2 = ×2/×4."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    sizes = {
        "res2": (4 * h, 4 * w),
        "res3": (2 * h, 2 * w),
        "res4": (h, w),
        "res5": (h // 2, w // 2),
    }
    return {n: torch.randn(batch, SHAPE[n][0], *sizes[n], generator=g) for n in SHAPE}


def _text(batch=2, levels=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, levels, K, D, generator=g)
    active = torch.tensor([[True, False, True, True, False], [False, True, True, False, True]])
    return queries, active[:batch]


def _reference_forward(dec, feats, text, active):
    """The decoder written out step by step: the pairing of text and feature levels."""
    names = ["res5", "res4", "res3"]  # coarse→fine
    srcs, poss, shapes = [], [], []
    for lvl, name in enumerate(names):
        x = dec.input_proj[lvl](feats[name])
        h, w = x.shape[-2:]
        shapes.append((h, w))
        srcs.append(x.flatten(2).transpose(1, 2))
        poss.append(sine_position_encoding(h, w, D) + dec.level_embed[lvl])
    sizes = [h * w for h, w in shapes]
    src = torch.cat(srcs, 1)
    pos = torch.cat(poss, 0)[None].expand_as(src)
    spatial = torch.tensor(shapes)
    starts = torch.tensor([0, sizes[0], sizes[0] + sizes[1]])
    ref = encoder_reference_points(shapes)[None].expand(src.shape[0], -1, -1, -1)
    for layer, cmsam in zip(dec.encoder_layers, dec.cmsam_layers):
        src = layer(src, pos, ref, spatial, starts)
        if text.shape[1] == 1:
            q, src = cmsam(text[:, 0], active, src, pos)
            text = q[:, None]
        else:
            pieces = list(src.split(sizes, 1))
            pos_pieces = pos.split(sizes, 1)
            new_text = []
            for lvl in range(3):
                q, pieces[lvl] = cmsam(text[:, lvl], active, pieces[lvl], pos_pieces[lvl])
                new_text.append(q)
            src, text = torch.cat(pieces, 1), torch.stack(new_text, 1)
    maps = [
        s.transpose(1, 2).reshape(s.shape[0], D, h, w)
        for s, (h, w) in zip(src.split(sizes, 1), shapes)
    ]
    y = maps[-1]
    x = dec.lateral_convs[0](feats["res2"])
    y = dec.output_convs[0](x + F.interpolate(y, size=x.shape[-2:], mode="bilinear"))
    return dec.mask_features(y), maps, text


@pytest.mark.parametrize("levels", [3, 1])
def test_matches_step_by_step_reference(levels):
    dec = _decoder(num_text_levels=levels)
    feats = _features()
    text, active = _text(levels=levels)
    out = dec(feats, text, active)
    with torch.no_grad():
        mask, maps, aligned = _reference_forward(dec, feats, text, active)
    torch.testing.assert_close(out.mask_features, mask)
    for got, want in zip(out.multi_scale_features, maps):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out.text_queries, aligned)


@pytest.mark.parametrize("grid", [(3, 5), (5, 3), (4, 7)])
def test_output_strides_for_non_square_inputs(grid):
    dec = _decoder()
    feats = _features(grid=grid)
    out = dec(feats, *_text())
    assert out.mask_features.shape == (2, 24, *feats["res2"].shape[-2:])
    assert [m.shape[-2:] for m in out.multi_scale_features] == [
        feats[n].shape[-2:] for n in ("res5", "res4", "res3")
    ]
    assert all(m.shape[:2] == (2, D) for m in out.multi_scale_features)
    assert out.text_queries.shape == (2, 3, K, D)


def test_number_of_levels_comes_from_the_features():
    dec = _decoder(transformer_in_features=["res5", "res4"], num_text_levels=2)
    feats = _features()
    out = dec(feats, *_text(levels=2))
    assert len(out.multi_scale_features) == 2  # res5, res4; res3 and res2 go through the FPN
    assert len(dec.fpn_features) == 2
    assert out.mask_features.shape[-2:] == feats["res2"].shape[-2:]


def test_text_queries_change_pixels_only_with_cmsam():
    feats = _features()
    text, active = _text()
    other = text.clone()
    other[:, :, active[0].nonzero()[0, 0]] += 1.0
    on = _decoder()
    assert not torch.allclose(
        on(feats, text, active).mask_features, on(feats, other, active).mask_features
    )
    off = _decoder(cmsam_enabled=False)
    assert len(off.cmsam_layers) == 0
    out = off(feats, text, active)
    assert out.text_queries is text
    torch.testing.assert_close(out.mask_features, off(feats, other, active).mask_features)


@pytest.mark.parametrize("levels", [3, 1])
def test_inactive_queries_are_pruned(levels):
    dec = _decoder(num_text_levels=levels)
    feats = _features()
    text, active = _text(levels=levels)
    out = dec(feats, text, active)
    changed = text.clone()
    changed.permute(0, 2, 1, 3)[~active] = 50.0
    out2 = dec(feats, changed, active)
    torch.testing.assert_close(out2.mask_features, out.mask_features)
    for a, b in zip(out2.multi_scale_features, out.multi_scale_features):
        torch.testing.assert_close(a, b)
    active_q = out.text_queries.permute(0, 2, 1, 3)[active]
    torch.testing.assert_close(out2.text_queries.permute(0, 2, 1, 3)[active], active_q)


def test_batched_equals_per_image():
    dec = _decoder()
    feats = _features(batch=2)
    text, active = _text()
    out = dec(feats, text, active)
    for b in range(2):
        single = dec(
            {n: f[b : b + 1] for n, f in feats.items()}, text[b : b + 1], active[b : b + 1]
        )
        torch.testing.assert_close(
            single.mask_features[0], out.mask_features[b], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            single.text_queries[0], out.text_queries[b], rtol=1e-4, atol=1e-5
        )
        for a, m in zip(single.multi_scale_features, out.multi_scale_features):
            torch.testing.assert_close(a[0], m[b], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, levels",
    [(dict(), 3), (dict(num_text_levels=1), 1), (dict(cmsam_enabled=False), 3)],
)
def test_gradients_reach_every_parameter(overrides, levels):
    dec = _decoder(**overrides).train()
    # MSDeformAttn starts with zero offset/attention weights, so at step 0 the positional
    # embedding reaches the loss only through CMSAM; after one update it also steers the
    # sampling. Emulate that update so every parameter is checked.
    with torch.no_grad():
        for layer in dec.encoder_layers:
            layer.self_attn.sampling_offsets.weight.normal_(std=0.01)
            layer.self_attn.attention_weights.weight.normal_(std=0.01)
    feats = _features()
    for f in feats.values():
        f.requires_grad_(True)
    text, active = _text(levels=levels)
    text.requires_grad_(True)
    out = dec(feats, text, active)
    loss = out.mask_features.square().mean() + sum(
        m.square().mean() for m in out.multi_scale_features
    )
    loss = loss + out.text_queries.square().mean()
    loss.backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(f.grad.abs().sum() > 0 for f in feats.values())
    grad = text.grad.permute(0, 2, 1, 3)
    assert grad[active].abs().sum() > 0
    if dec.cmsam_enabled:
        # Inactive queries pass through untouched: their only gradient is the loss's own
        # d mean(q^2) / dq, nothing from the pixels.
        want = 2 * text.detach() / text.numel()
        torch.testing.assert_close(grad[~active], want.permute(0, 2, 1, 3)[~active])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_text_levels=2), "HSQG.NUM_LEVELS"),
        (dict(common_stride=2), "COMMON_STRIDE"),
        (dict(transformer_in_features=["res3", "res6"]), "IN_FEATURES"),
        (dict(conv_dim=36), "CONV_DIM"),
    ],
)
def test_bad_config_fails_loudly(overrides, match):
    with pytest.raises(ValueError, match=match):
        _decoder(**overrides)


def test_bad_text_queries_fail_loudly():
    dec = _decoder()
    feats = _features()
    text, active = _text(levels=1)
    with pytest.raises(ValueError, match="L=3"):
        dec(feats, text, active)
    with pytest.raises(ValueError, match="CONV_DIM"):
        dec(feats, torch.zeros(2, 3, K, D + 8), active)


def test_sine_position_encoding_formula():
    h, w, dim = 3, 4, 16
    pe = sine_position_encoding(h, w, dim).view(h, w, dim)
    half = dim // 2
    for i, j, c in [(0, 0, 0), (1, 2, 3), (2, 3, 6), (2, 1, 8 + 5), (0, 3, 8 + 6)]:
        coord, ch = ((i + 0.5) / h, c) if c < half else ((j + 0.5) / w, c - half)
        angle = coord * 2 * math.pi / 10000 ** (2 * (ch // 2) / half)
        want = math.sin(angle) if ch % 2 == 0 else math.cos(angle)
        assert pe[i, j, c].item() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_encoding(2, 2, 6)


def test_reference_points_are_pixel_centres_on_every_level():
    ref = encoder_reference_points([(2, 3), (1, 2)])
    assert ref.shape == (8, 2, 2)
    torch.testing.assert_close(ref[:, 0], ref[:, 1])
    torch.testing.assert_close(ref[4, 0], torch.tensor([1.5 / 3, 1.5 / 2]))  # row 1, col 1
    torch.testing.assert_close(ref[5, 0], torch.tensor([2.5 / 3, 1.5 / 2]))  # row 1, col 2
    torch.testing.assert_close(ref[7, 0], torch.tensor([1.5 / 2, 0.5]))  # level 2, col 1


def test_level_padding_by_hand():
    """A cell of a level is padding only when every input pixel under it is."""
    padding = torch.zeros(1, 8, 8, dtype=torch.bool)
    padding[:, :, 5:] = True  # the last 3 columns
    padding[:, 6:, :] = True  # and the last 2 rows
    got = CMSAMPixelDecoder._level_padding(padding, [(1, 1), (2, 2), (4, 4)])
    coarse = [False]
    middle = [False, False, False, False]  # every 4×4 cell has a real pixel
    # 2×2 cells: column 3 covers x 6-7 (padding), row 3 covers y 6-7 (padding).
    fine = [[False, False, False, True]] * 3 + [[True] * 4]
    expected = torch.tensor(coarse + middle + [v for row in fine for v in row])
    assert torch.equal(got[0], expected)


def _without_input_norm(dec):
    # The input projections' GroupNorm pools statistics over every position, padded or
    # not; without it, each position's projection depends on that position alone.
    for proj in dec.input_proj:
        proj[1] = torch.nn.Identity()
    return dec


@pytest.mark.parametrize("levels", [3, 1])
def test_padded_cells_influence_neither_the_text_queries_nor_the_real_cells(levels):
    """Image 48×80 (stride-16 grid 3×5) with its right half (x >= 40) padding: the padded
    cells are res5 column 1, res4 columns 3-4, res3 columns 5-9. Whatever features they
    hold, the text queries and every real cell come out the same; without the mask
    (Mask2Former's behaviour) they change."""
    feats = _features()
    text, active = _text(levels=levels)
    padding = torch.zeros(2, 48, 80, dtype=torch.bool)
    padding[:, :, 40:] = True
    noisy = {k: v.clone() for k, v in feats.items()}
    g = torch.Generator().manual_seed(5)
    for name, first in (("res5", 1), ("res4", 3), ("res3", 5)):
        noisy[name][..., first:] = 10 * torch.randn(noisy[name][..., first:].shape, generator=g)
    real = [(slice(None), slice(0, 1)), (slice(None), slice(0, 3)), (slice(None), slice(0, 5))]
    for mask_padding in (True, False):
        dec = _without_input_norm(_decoder(num_text_levels=levels, mask_padding=mask_padding))
        with torch.no_grad():
            clean, perturbed = (dec(f, text, active, padding) for f in (feats, noisy))
        same_text = torch.allclose(clean.text_queries, perturbed.text_queries, atol=1e-5)
        same_cells = all(
            torch.allclose(a[..., rows, cols], b[..., rows, cols], atol=1e-5)
            for a, b, (rows, cols) in zip(
                clean.multi_scale_features, perturbed.multi_scale_features, real
            )
        )
        assert same_text == same_cells == mask_padding, mask_padding
