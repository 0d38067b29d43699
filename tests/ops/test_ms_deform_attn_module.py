"""MSDeformAttn module and the ms_deform_attn dispatch: wiring, init, fallback, autocast."""

import importlib
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from msda_inputs import level_geometry, random_inputs

import hiervl.ops._ext as ext
from hiervl.ops import (
    MSDeformAttn,
    kernel_status,
    ms_deform_attn,
    ms_deform_attn_reference,
    reference_kernel,
)

D_MODEL, HEADS, POINTS = 32, 4, 3
SHAPES = [[6, 5], [3, 3], [2, 1]]


def _module_inputs(batch=2, queries=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, starts, s = level_geometry(SHAPES)
    query = torch.randn(batch, queries, D_MODEL, generator=gen)
    reference_points = torch.rand(batch, queries, len(SHAPES), 2, generator=gen)
    input_flatten = torch.randn(batch, s, D_MODEL, generator=gen)
    return query, reference_points, input_flatten, spatial_shapes, starts


def _module(seed=0):
    torch.manual_seed(seed)
    m = MSDeformAttn(d_model=D_MODEL, n_levels=len(SHAPES), n_heads=HEADS, n_points=POINTS)
    # Non-trivial offsets and attention logits (the init zeroes their weights).
    with torch.no_grad():
        m.sampling_offsets.weight.normal_(0.0, 0.2)
        m.attention_weights.weight.normal_(0.0, 0.5)
    return m


def test_forward_equals_the_formula_written_with_the_reference():
    m = _module()
    query, ref, x, shapes, starts = _module_inputs()
    n, lq, _ = query.shape
    nl = len(SHAPES)
    value = m.value_proj(x).view(n, -1, HEADS, D_MODEL // HEADS)
    offsets = m.sampling_offsets(query).view(n, lq, HEADS, nl, POINTS, 2)
    # Offsets are pixels of each level: x by W, y by H. Softmax runs jointly over nL * nP.
    wh = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32)
    locations = ref[:, :, None, :, None, :] + offsets / wh[:, None, :]
    weights = F.softmax(m.attention_weights(query).view(n, lq, HEADS, -1), -1)
    expected = m.output_proj(
        ms_deform_attn_reference(value, shapes, starts, locations, weights.view(offsets.shape[:-1]))
    )
    torch.testing.assert_close(m(query, ref, x, shapes, starts), expected, rtol=1e-5, atol=1e-6)


def test_init_follows_deformable_detr():
    m = MSDeformAttn(d_model=64, n_levels=2, n_heads=8, n_points=3)
    bias = m.sampling_offsets.bias.view(8, 2, 3, 2)
    # Head h looks along angle 2*pi*h/8 scaled so that max(|dx|, |dy|) = 1; point p at p+1.
    for h in range(8):
        angle = 2 * math.pi * h / 8
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for p in range(3):
            torch.testing.assert_close(bias[h, 1, p], direction * (p + 1))
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0
    assert torch.count_nonzero(m.attention_weights.weight) == 0
    assert torch.count_nonzero(m.attention_weights.bias) == 0


def test_padding_mask_hides_padded_values():
    m = _module()
    query, ref, x, shapes, starts = _module_inputs(batch=1)
    mask = torch.zeros(1, x.shape[1], dtype=torch.bool)
    mask[0, ::3] = True
    out = m(query, ref, x, shapes, starts, mask)
    perturbed = x.clone()
    perturbed[mask] += 100.0
    torch.testing.assert_close(m(query, ref, perturbed, shapes, starts, mask), out)
    assert not torch.allclose(m(query, ref, perturbed, shapes, starts), out)


def test_batched_equals_one_by_one():
    m = _module()
    query, ref, x, shapes, starts = _module_inputs(batch=3)
    out = m(query, ref, x, shapes, starts)
    for b in range(3):
        single = m(query[b : b + 1], ref[b : b + 1], x[b : b + 1], shapes, starts)
        torch.testing.assert_close(single, out[b : b + 1], rtol=1e-5, atol=1e-6)


def test_fallback_without_compiled_op_matches_and_warns_once(monkeypatch, caplog):
    m = _module()
    inputs = _module_inputs()
    out_default = m(*inputs)  # compiled kernel when built, else already the reference
    grads_default = torch.autograd.grad(out_default.sum(), list(m.parameters()))

    # Pretend hiervl._C is missing, with a fresh warn-once memory.
    monkeypatch.setattr(ext, "_C", None)
    monkeypatch.setattr(ext, "_LOAD_ERROR", "ImportError: simulated by the test")
    monkeypatch.setattr(ext, "_warned", set())
    assert not ext.compiled_available("cpu")
    assert "reference" in kernel_status()
    with caplog.at_level(logging.WARNING, logger=ext.__name__):
        out_fallback = m(*inputs)
        m(*inputs)
    warnings = [r for r in caplog.records if "PyTorch reference" in r.getMessage()]
    assert len(warnings) == 1, "the fallback must warn exactly once"

    grads_fallback = torch.autograd.grad(out_fallback.sum(), list(m.parameters()))
    torch.testing.assert_close(out_fallback, out_default, rtol=1e-5, atol=1e-6)
    for g_fallback, g_default in zip(grads_fallback, grads_default):
        torch.testing.assert_close(g_fallback, g_default, rtol=1e-4, atol=1e-5)


def test_autocast_bfloat16_on_cpu_runs_the_op_in_float32():
    m = _module()
    inputs = _module_inputs()
    out32 = m(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = m(*inputs)
    assert out16.dtype == torch.bfloat16
    assert torch.isfinite(out16.float()).all()
    # Only the projections round to bfloat16 (8 mantissa bits).
    assert (out16.float() - out32).abs().max() < 0.05 * out32.abs().max()
    (out16.float().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_dispatch_casts_low_precision_to_float32_and_back():
    value, shapes, starts, locations, weights = random_inputs(
        batch=1, shapes=[[4, 5], [2, 2]], heads=2, channels=4, queries=6, points=2,
        dtype=torch.float32,
    )  # fmt: skip
    expected = ms_deform_attn_reference(value, shapes, starts, locations, weights)
    out = ms_deform_attn(value.bfloat16(), shapes, starts, locations, weights.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_model": 30, "n_heads": 8}, "not divisible"),
        ({"n_points": 0}, "n_points=0"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MSDeformAttn(**kwargs)


def test_mismatched_level_geometry_raises():
    m = _module()
    query, ref, x, shapes, starts = _module_inputs()
    with pytest.raises(ValueError, match="cover"):
        m(query, ref, x[:, 1:], shapes, starts)
    with pytest.raises(ValueError, match="input_spatial_shapes"):
        m(query, ref, x, shapes[:2], starts[:2])


def test_reference_kernel_block_and_tracing_use_the_reference_without_warning(monkeypatch, caplog):
    """Inside ``reference_kernel()`` (ONNX export, benchmarks) and while torch traces, the
    compiled kernel is never called, even where it is built, and nothing warns."""
    m = _module()
    inputs = _module_inputs()
    expected = m(*inputs)

    def compiled_kernel(*args):
        raise AssertionError("the compiled kernel ran")

    monkeypatch.setattr(ext, "compiled_available", lambda device=None: True)
    # The submodule (its name is shadowed by the function in hiervl.ops).
    module = importlib.import_module("hiervl.ops.ms_deform_attn")
    monkeypatch.setattr(module.MSDeformAttnFunction, "apply", compiled_kernel)
    with pytest.raises(AssertionError, match="compiled kernel ran"):
        m(*inputs)  # the patch is live outside the block
    assert not ext.reference_forced()
    with caplog.at_level(logging.WARNING, logger=ext.__name__):
        with reference_kernel():
            with reference_kernel():  # nests
                assert ext.reference_forced()
            assert ext.reference_forced()
            torch.testing.assert_close(m(*inputs), expected, rtol=1e-5, atol=1e-6)
        traced = torch.jit.trace(m, inputs, check_trace=False)
    assert not ext.reference_forced()
    torch.testing.assert_close(traced(*inputs), expected, rtol=1e-5, atol=1e-6)
    assert not [r for r in caplog.records if "reference" in r.getMessage()]
