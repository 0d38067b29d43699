"""The CUDA kernel of MSDeformAttn against the PyTorch reference (needs a GPU)."""

import pytest
import torch
from msda_inputs import outputs_and_grads, random_inputs, relative_error

from hiervl.ops import (
    MSDeformAttn,
    MSDeformAttnFunction,
    compiled_available,
    ms_deform_attn,
    ms_deform_attn_reference,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not compiled_available("cuda"),
        reason="hiervl._C was built without the CUDA kernel (FORCE_CUDA=1, see INSTALL.md)",
    ),
]

CASES = {
    "odd_sizes_3_levels": (2, [[7, 9], [3, 5], [1, 1]], 3, 5, 11, 4),
    "one_level_batch_1": (1, [[6, 4]], 2, 8, 7, 1),
    "channels_over_a_warp": (1, [[4, 4], [2, 2]], 2, 40, 6, 3),
    "pixel_decoder_like": (2, [[32, 32], [16, 16], [8, 8]], 8, 32, 300, 4),
}


def _apply(value, shapes, starts, locations, weights):
    return MSDeformAttnFunction.apply(value, shapes, starts, locations, weights)


def _cuda_inputs(case, dtype, seed=0, **kwargs):
    batch, shapes, heads, channels, queries, points = CASES[case]
    return random_inputs(
        batch=batch, shapes=shapes, heads=heads, channels=channels, queries=queries,
        points=points, dtype=dtype, seed=seed, device="cuda", **kwargs,
    )  # fmt: skip


def _to(inputs, dtype):
    value, shapes, starts, locations, weights = inputs
    cast = [t.detach().to(dtype).requires_grad_() for t in (value, locations, weights)]
    return cast[0], shapes, starts, cast[1], cast[2]


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_matches_reference(case):
    inputs = _cuda_inputs(case, torch.float32)
    out, grads = outputs_and_grads(_apply, inputs)
    out_ref, grads_ref = outputs_and_grads(ms_deform_attn_reference, _to(inputs, torch.float64))
    assert relative_error(out, out_ref) < 1e-5
    for label, grad, grad_ref in zip(("value", "locations", "weights"), grads, grads_ref):
        assert relative_error(grad, grad_ref) < 1e-5, f"grad of {label}"


def test_gradcheck_float64():
    inputs = random_inputs(
        batch=2, shapes=[[4, 3], [2, 2]], heads=2, channels=3, queries=4, points=2, device="cuda"
    )
    assert torch.autograd.gradcheck(_apply, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float(dtype):
    inputs = _cuda_inputs("pixel_decoder_like", torch.float32, low=0.0, high=1.0)
    low = _to(inputs, dtype)
    out, grads = outputs_and_grads(_apply, low)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    # Reference on the same rounded inputs, in float64: only output rounding and the
    # kernel's float accumulation differ.
    out_ref, grads_ref = outputs_and_grads(ms_deform_attn_reference, _to(low, torch.float64))
    tolerance = 1e-2 if dtype == torch.float16 else 3e-2
    assert relative_error(out, out_ref) < tolerance
    # grad_output differs (drawn in dtype vs float64) only by rounding as well.
    for grad, grad_ref in zip(grads, grads_ref):
        assert relative_error(grad, grad_ref) < 5 * tolerance


def test_cuda_equals_cpu_kernel():
    inputs = _cuda_inputs("odd_sizes_3_levels", torch.float64)
    out, grads = outputs_and_grads(_apply, inputs)
    cpu_inputs = [t.detach().cpu().requires_grad_(t.requires_grad) for t in inputs]
    out_cpu, grads_cpu = outputs_and_grads(ms_deform_attn, cpu_inputs)
    torch.testing.assert_close(out.cpu(), out_cpu)
    for grad, grad_cpu in zip(grads, grads_cpu):
        torch.testing.assert_close(grad.cpu(), grad_cpu)


def test_module_under_autocast_on_cuda():
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2).cuda()
    shapes = torch.tensor([[8, 8], [4, 4]], device="cuda")
    starts = torch.tensor([0, 64], device="cuda")
    query = torch.randn(2, 10, 64, device="cuda")
    ref = torch.rand(2, 10, 2, 2, device="cuda")
    x = torch.randn(2, 80, 64, device="cuda")
    out32 = m(query, ref, x, shapes, starts)
    with torch.autocast("cuda", dtype=torch.float16):
        out16 = m(query, ref, x, shapes, starts)
    assert out16.dtype == torch.float16
    assert (out16.float() - out32).abs().max() < 0.02 * out32.abs().max()
    out16.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("batch, queries", [(2, 0), (0, 5)])
def test_empty_batch_or_queries_give_empty_outputs_and_zero_grads(batch, queries):
    # A zero-block launch is a CUDA error: the kernel must not be launched at all.
    inputs = random_inputs(
        batch=batch, shapes=[[3, 4], [2, 2]], heads=2, channels=3, queries=queries, points=2,
        dtype=torch.float32, device="cuda",
    )  # fmt: skip
    out, grads = outputs_and_grads(_apply, inputs)
    torch.cuda.synchronize()
    assert out.shape == (batch, queries, 6)
    for grad, tensor in zip(grads, (inputs[0], inputs[3], inputs[4])):
        assert grad.shape == tensor.shape and torch.count_nonzero(grad) == 0


def test_empty_level_is_refused_with_its_index():
    inputs = random_inputs(
        batch=1, shapes=[[3, 4], [0, 5]], heads=2, channels=3, queries=4, points=2,
        dtype=torch.float32, device="cuda",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"level 1 has shape \(0, 5\)"):
        _apply(*inputs)


def test_samples_outside_every_level_read_zeros():
    inputs = random_inputs(
        batch=2, shapes=[[5, 4], [2, 3]], heads=2, channels=35, queries=6, points=2,
        dtype=torch.float32, low=1.5, high=3.0, device="cuda",
    )  # fmt: skip
    out, grads = outputs_and_grads(_apply, inputs)
    assert torch.count_nonzero(out) == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads)
