"""masked_attention and MultiHeadAttention: explicit masked softmax, long masked runs, and
the three exact evaluation orders (values and gradients)."""

import math

import pytest
import torch

from hiervl.modeling.attention import (
    FOLD_KEYS,
    FOLD_QUERIES,
    STANDARD,
    MultiHeadAttention,
    attention_cost,
    cheapest_order,
    masked_attention,
)


def _explicit(q, k, v, allowed):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


def test_matches_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    allowed = torch.rand(2, 1, 5, 7) > 0.5
    allowed[..., 0] = True
    out = masked_attention(q, k, v, allowed)
    torch.testing.assert_close(out, _explicit(q, k, v, allowed.expand(2, 3, 5, 7)))
    torch.testing.assert_close(masked_attention(q, k, v, None), _explicit(q, k, v, allowed | True))


def test_first_thousand_keys_masked_stays_finite():
    """torch 2.3's CPU kernel returns NaN with a boolean mask when the first 512 keys of a
    query are masked; the additive mask must not."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 1030, 16), torch.randn(1, 2, 1030, 16)
    allowed = torch.zeros(1, 1, 4, 1030, dtype=torch.bool)
    allowed[..., 1000:] = True
    out = masked_attention(q, k, v, allowed)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _explicit(q, k, v, allowed.expand(1, 2, 4, 1030)))


# ---------------------------------------------------------------- MultiHeadAttention orders


def _mha(order, heads=4, dim=16, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    module = MultiHeadAttention(dim=dim, num_heads=heads, dropout=dropout, name="width")
    with torch.no_grad():  # non-zero biases: the folded orders must carry every one
        for layer in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            layer.bias.normal_()
    module.order = order
    return module.double()


def _explicit_mha(m, query, key, value, allowed):
    """W_O concat_h softmax_masked((W_Q^h q)·(W_K^h k) / sqrt(d)) (W_V^h v) + b_O."""
    heads, dim = m.num_heads, query.shape[-1]
    d = dim // heads
    q, k, v = m.q_proj(query), m.k_proj(key), m.v_proj(value)
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        mask = allowed.expand(q.shape[0], heads, q.shape[1], k.shape[1])[:, h]
        outs.append(logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v[..., sl])
    return m.out_proj(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("order", [STANDARD, FOLD_QUERIES, FOLD_KEYS])
@pytest.mark.parametrize("mask_kind", ["keys", "per_query"])
def test_every_order_matches_the_formula_with_gradients(order, mask_kind):
    """The three evaluation orders give the formula's output and the same gradients for
    the inputs and every weight and bias (float64, random masks)."""
    g = torch.Generator().manual_seed(3)
    b, nq, nk, dim = 2, 3, 11, 16
    query = torch.randn(b, nq, dim, generator=g, dtype=torch.float64, requires_grad=True)
    key = torch.randn(b, nk, dim, generator=g, dtype=torch.float64, requires_grad=True)
    value = torch.randn(b, nk, dim, generator=g, dtype=torch.float64, requires_grad=True)
    if mask_kind == "keys":
        allowed = torch.rand(b, 1, 1, nk, generator=g) > 0.4
    else:
        allowed = torch.rand(b, 1, nq, nk, generator=g) > 0.4
    allowed[..., 0] = True
    grads = []
    for module, fn in ((_mha(order), None), (_mha(order), _explicit_mha)):
        out = (
            module(query, key, value, allowed)
            if fn is None
            else fn(module, query, key, value, allowed)
        )
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
        params = [query, key, value, *module.parameters()]
        grads.append((out, torch.autograd.grad((out * weight).sum(), params)))
    (out, got), (ref, expected) = grads
    torch.testing.assert_close(out, ref)
    for g_got, g_ref in zip(got, expected):
        torch.testing.assert_close(g_got, g_ref)


def test_orders_agree_without_mask_and_with_shared_keys():
    """No mask, and keys with batch 1 shared by a batch of queries (decoder memory)."""
    torch.manual_seed(4)
    query = torch.randn(3, 2, 16, dtype=torch.float64)
    key, value = (
        torch.randn(1, 9, 16, dtype=torch.float64),
        torch.randn(1, 9, 16, dtype=torch.float64),
    )
    outs = [_mha(order)(query, key, value, None) for order in (STANDARD, FOLD_QUERIES, FOLD_KEYS)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


def test_dropout_keeps_the_folded_value_bias_exact():
    """With dropout the kept weights no longer sum to 1; fold_queries must scale b_V by
    their sum. Same dropout mask (same seed, same weight tensor shape) -> same output."""
    query = torch.randn(2, 3, 16, dtype=torch.float64)
    key, value = (
        torch.randn(2, 20, 16, dtype=torch.float64),
        torch.randn(2, 20, 16, dtype=torch.float64),
    )
    outs = []
    for order in (FOLD_QUERIES, FOLD_KEYS):
        module = _mha(order, dropout=0.5).train()
        torch.manual_seed(5)
        outs.append(module(query, key, value, None))
    # Reference: dropout applied to explicit weights with the same RNG draw.
    module = _mha(STANDARD, dropout=0.5)
    d = 4
    q, k, v = module.q_proj(query), module.k_proj(key), module.v_proj(value)
    logits = torch.stack(
        [
            q[..., h * d : (h + 1) * d] @ k[..., h * d : (h + 1) * d].transpose(1, 2)
            for h in range(4)
        ],
        dim=1,
    ) / math.sqrt(d)
    torch.manual_seed(5)
    weights = torch.nn.functional.dropout(logits.softmax(-1), p=0.5)
    ref = module.out_proj((weights @ module._heads(v)).transpose(1, 2).flatten(2))
    torch.testing.assert_close(outs[0], ref)
    torch.testing.assert_close(outs[1], ref)


@pytest.mark.parametrize(
    "nq, nk, expected",
    [
        (4, 4096, FOLD_QUERIES),
        (4096, 4, FOLD_KEYS),
        (112, 4096, STANDARD),
        (100, 100, STANDARD),
        (20, 4096, STANDARD),  # folding saves 41 %: not enough for an unfused kernel
    ],
)
def test_auto_picks_the_cheapest_order(nq, nk, expected):
    """CMSAM's few text queries against a level's pixels fold; the decoder's ~100 queries
    against its memory do not. The cost formula is checked by hand for one case."""
    assert cheapest_order(nq, nk, 256, 8) == expected
    # 4 queries x 4096 pixels, D = 256, H = 8: 2(4 + 4096)256^2 + 2*4*4096*256 vs
    # 4*4*256^2 + 2*8*4*4096*256
    assert attention_cost(STANDARD, 4, 4096, 256, 8) == 2 * 4100 * 65536 + 2 * 4 * 4096 * 256
    assert attention_cost(FOLD_QUERIES, 4, 4096, 256, 8) == 16 * 65536 + 64 * 4096 * 256
    with pytest.raises(ValueError, match="unknown attention order 'sideways'"):
        attention_cost("sideways", 1, 1, 8, 2)


@pytest.mark.parametrize("order", [STANDARD, FOLD_QUERIES, FOLD_KEYS])
def test_every_order_keeps_the_autocast_dtype(order):
    """Under bf16 autocast every order returns bf16 (a float32 bias must not promote)."""
    module = _mha(order).float()
    query, key = torch.randn(2, 3, 16), torch.randn(2, 40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(query, key, key, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), module(query, key, key, None), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("order", ["auto", STANDARD, FOLD_QUERIES, FOLD_KEYS])
def test_no_queries_gives_an_empty_output(order):
    query = torch.zeros(2, 0, 16, dtype=torch.float64)
    key = torch.randn(2, 5, 16, dtype=torch.float64)
    assert _mha(order)(query, key, key, None).shape == (2, 0, 16)
