"""CMSAM: both attention directions against explicit formulas, pruning, key padding."""

import math

import pytest
import torch

from hiervl.modeling.cmsam import CMSAM

B, KQ, P, D = 2, 4, 7, 8


def _cmsam(num_heads=2, seed=0):
    torch.manual_seed(seed)
    module = CMSAM(dim=D, num_heads=num_heads, ffn_dim=16, dropout=0.0).eval()
    # Non-trivial LayerNorm affine parameters so the formula checks see them.
    with torch.no_grad():
        for norm in (module.text_norm1, module.text_norm2, module.pixel_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return module


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(B, KQ, D, generator=g)
    pixels = torch.randn(B, P, D, generator=g)
    pos = torch.randn(B, P, D, generator=g)
    active = torch.tensor([[True, False, True, True], [True, True, False, False]])
    return queries, active, pixels, pos


def _explicit_attention(attn, query, key, value, key_valid):
    """W_O concat_h softmax(q k^T / sqrt(d)) v, with an explicit masked softmax."""
    heads = attn.num_heads
    q, k, v = attn.q_proj(query), attn.k_proj(key), attn.v_proj(value)
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        if key_valid is not None:
            logits = logits.masked_fill(~key_valid[:, None, :], float("-inf"))
        outs.append(logits.softmax(dim=-1) @ v[..., sl])
    return attn.out_proj(torch.cat(outs, dim=-1))


def _explicit_cmsam(m, queries, active, pixels, pos, padding=None):
    keys = pixels + pos
    valid = None if padding is None else ~padding
    q = m.text_norm1(queries + _explicit_attention(m.text_to_pixel, queries, keys, pixels, valid))
    q = m.text_norm2(q + m.ffn(q))
    q = torch.where(active[..., None], q, queries)
    priors = _explicit_attention(m.pixel_to_text, keys, q, q, active)
    return q, m.pixel_norm(pixels + priors)


def test_identity_projections_give_the_paper_formula():
    """One head, W_Q = W_K = W_V = W_O = I: q^ - q~ = sum_p softmax_p(q.x_p / sqrt(D)) x_p."""
    module = _cmsam(num_heads=1)
    attn = module.text_to_pixel
    with torch.no_grad():
        for layer in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            layer.weight.copy_(torch.eye(D))
            layer.bias.zero_()
    queries, _, pixels, _ = _inputs()
    context = attn(queries, pixels, pixels, None)
    for b in range(B):
        for k in range(KQ):
            scores = [float(queries[b, k] @ pixels[b, p]) / math.sqrt(D) for p in range(P)]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            expected = sum((w / total) * pixels[b, p] for p, w in enumerate(weights))
            torch.testing.assert_close(context[b, k], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_matches_explicit_recomputation_from_module_weights(num_heads):
    module = _cmsam(num_heads=num_heads)
    queries, active, pixels, pos = _inputs()
    got_q, got_x = module(queries, active, pixels, pos)
    with torch.no_grad():
        want_q, want_x = _explicit_cmsam(module, queries, active, pixels, pos)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)


def test_both_directions_change_outputs():
    module = _cmsam()
    queries, active, pixels, pos = _inputs()
    new_q, new_x = module(queries, active, pixels, pos)
    assert not torch.allclose(new_q[active], queries[active])
    assert not torch.allclose(new_x, pixels)
    # Pixels depend on (active) queries, queries depend on pixels.
    other_q = queries.clone()
    other_q[0, 0] += 1.0
    assert not torch.allclose(module(other_q, active, pixels, pos)[1][0], new_x[0])
    other_x = pixels.clone()
    other_x[0, 3] += 1.0
    assert not torch.allclose(module(queries, active, other_x, pos)[0][0, 0], new_q[0, 0])


def test_inactive_queries_are_pruned():
    module = _cmsam()
    queries, active, pixels, pos = _inputs()
    new_q, new_x = module(queries, active, pixels, pos)
    torch.testing.assert_close(new_q[~active], queries[~active])
    changed = queries.clone()
    changed[~active] = torch.randn_like(changed[~active]) * 10
    q2, x2 = module(changed, active, pixels, pos)
    torch.testing.assert_close(q2[active], new_q[active])
    torch.testing.assert_close(x2, new_x)


def test_pixel_padding_is_never_attended():
    module = _cmsam()
    queries, active, pixels, pos = _inputs()
    padding = torch.zeros(B, P, dtype=torch.bool)
    padding[:, -2:] = True
    new_q, new_x = module(queries, active, pixels, pos, padding)
    # Same as dropping the padding pixels altogether.
    crop_q, crop_x = module(queries, active, pixels[:, :-2], pos[:, :-2])
    torch.testing.assert_close(new_q, crop_q)
    torch.testing.assert_close(new_x[:, :-2], crop_x)
    changed = pixels.clone()
    changed[:, -2:] = 100.0
    torch.testing.assert_close(module(queries, active, changed, pos, padding)[0], new_q)


def test_image_without_active_query_gets_no_prior():
    module = _cmsam()
    queries, active, pixels, pos = _inputs()
    active[1] = False
    new_q, new_x = module(queries, active, pixels, pos)
    assert torch.isfinite(new_x).all()
    torch.testing.assert_close(new_x[1], module.pixel_norm(pixels[1]))
    torch.testing.assert_close(new_q[1], queries[1])


def test_batched_equals_per_image():
    module = _cmsam()
    queries, active, pixels, pos = _inputs()
    new_q, new_x = module(queries, active, pixels, pos)
    for b in range(B):
        sl = slice(b, b + 1)
        q, x = module(queries[sl], active[sl], pixels[sl], pos[sl])
        torch.testing.assert_close(q[0], new_q[b])
        torch.testing.assert_close(x[0], new_x[b])


def test_gradients_reach_every_parameter_and_input():
    module = _cmsam().train()
    queries, active, pixels, pos = _inputs()
    queries.requires_grad_(True)
    pixels.requires_grad_(True)
    new_q, new_x = module(queries, active, pixels, pos)
    (new_q.square().sum() + new_x.square().sum()).backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert queries.grad[active].abs().sum() > 0 and pixels.grad.abs().sum() > 0


def test_fused_attention_matches_explicit_under_autograd():
    """SDPA's gradient equals the explicit softmax's (the fused path is not a black box)."""
    module = _cmsam()
    queries, active, pixels, pos = _inputs()
    queries = queries.double().requires_grad_(True)
    module = module.double()
    got = module(queries, active, pixels.double(), pos.double())
    (g_fused,) = torch.autograd.grad(sum(t.sum() for t in got), queries)
    want = _explicit_cmsam(module, queries, active, pixels.double(), pos.double())
    (g_explicit,) = torch.autograd.grad(sum(t.sum() for t in want), queries)
    torch.testing.assert_close(g_fused, g_explicit)


@pytest.mark.parametrize("order", ["standard", "fold_queries", "fold_keys"])
def test_every_attention_order_matches_the_explicit_module(order):
    """CMSAM's attentions evaluated in each exact order (``MultiHeadAttention.order``) give
    the explicit formulas' outputs and gradients, pixel padding included (float64)."""
    module = _cmsam(num_heads=2).double()
    with torch.no_grad():
        for attn in (module.text_to_pixel, module.pixel_to_text):
            for layer in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                layer.bias.normal_()
            attn.order = order
    queries, active, pixels, pos = (t.double() if t.is_floating_point() else t for t in _inputs())
    queries.requires_grad_(True)
    pixels.requires_grad_(True)
    padding = torch.zeros(B, P, dtype=torch.bool)
    padding[1, -3:] = True
    got = module(queries, active, pixels, pos, padding)
    want = _explicit_cmsam(module, queries, active, pixels, pos, padding)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    params = [queries, pixels, *module.parameters()]
    grads_got = torch.autograd.grad(sum(t.square().sum() for t in got), params)
    grads_want = torch.autograd.grad(sum(t.square().sum() for t in want), params)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w)


def test_few_active_queries_fold_the_pixel_projections():
    """At the paper's sizes (D = 256, 8 heads) a handful of text queries against a level's
    pixels is evaluated without projecting the pixels, in both directions."""
    from hiervl.modeling.attention import cheapest_order

    assert cheapest_order(4, 64 * 64, 256, 8) == "fold_queries"  # text -> pixel
    assert cheapest_order(64 * 64, 4, 256, 8) == "fold_keys"  # pixel -> text
    # All 150 ADE20K classes active: projecting the pixels is cheaper again.
    assert cheapest_order(150, 64 * 64, 256, 8) == "standard"


def test_bad_inputs_fail_loudly():
    with pytest.raises(ValueError, match="divisible"):
        CMSAM(dim=D, num_heads=3, ffn_dim=16, dropout=0.0)
    module = _cmsam()
    queries, active, pixels, pos = _inputs()
    with pytest.raises(ValueError, match="query_active"):
        module(queries, active[:, :2], pixels, pos)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    module = CMSAM(dim=D, num_heads=2, ffn_dim=16, dropout=0.5)
    queries, active, pixels, pos = _inputs()
    module.eval()
    a = module(queries, active, pixels, pos)
    b = module(queries, active, pixels, pos)
    torch.testing.assert_close(a, b)
    module.train()
    c = module(queries, active, pixels, pos)
    assert not torch.allclose(c[1], a[1])
