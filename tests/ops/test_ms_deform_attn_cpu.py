"""The compiled CPU kernel of MSDeformAttn against the PyTorch reference (skipped if not built)."""

import pytest
import torch
from msda_inputs import outputs_and_grads, random_inputs, relative_error

from hiervl.ops import MSDeformAttnFunction, compiled_available, ms_deform_attn_reference

pytestmark = pytest.mark.skipif(
    not compiled_available("cpu"),
    reason="hiervl._C is not built (run `make setup`); the reference is tested elsewhere",
)

# (batch, level shapes, heads, channels per head, queries, points)
CASES = {
    "odd_sizes_3_levels": (2, [[7, 9], [3, 5], [1, 1]], 3, 5, 11, 4),
    "one_level": (2, [[6, 4]], 2, 8, 7, 1),
    "batch_1": (1, [[5, 3], [2, 7]], 4, 3, 9, 2),
    "wide_heads": (1, [[4, 4], [2, 2], [1, 1]], 2, 33, 6, 3),
}


def _apply(value, shapes, starts, locations, weights):
    return MSDeformAttnFunction.apply(value, shapes, starts, locations, weights)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_matches_reference_forward_and_grads(name):
    batch, shapes, heads, channels, queries, points = CASES[name]
    inputs = random_inputs(
        batch=batch, shapes=shapes, heads=heads, channels=channels, queries=queries,
        points=points, dtype=torch.float32, seed=len(name),
    )  # fmt: skip
    out, grads = outputs_and_grads(_apply, inputs)
    out_ref, grads_ref = outputs_and_grads(ms_deform_attn_reference, inputs)
    assert relative_error(out, out_ref) < 1e-5
    for label, grad, grad_ref in zip(("value", "locations", "weights"), grads, grads_ref):
        assert relative_error(grad, grad_ref) < 1e-5, f"grad of {label}"


def test_float64_matches_reference_to_rounding():
    inputs = random_inputs(
        batch=2, shapes=[[5, 6], [3, 2]], heads=2, channels=4, queries=5, points=3
    )
    out, grads = outputs_and_grads(_apply, inputs)
    out_ref, grads_ref = outputs_and_grads(ms_deform_attn_reference, inputs)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    # Locations span the border so that partially and wholly outside samples are covered.
    inputs = random_inputs(
        batch=2, shapes=[[4, 3], [2, 2]], heads=2, channels=3, queries=4, points=2
    )
    assert torch.autograd.gradcheck(_apply, inputs, eps=1e-6, atol=1e-7)


def test_samples_outside_the_map_give_zero_output_and_grads():
    inputs = random_inputs(
        batch=1, shapes=[[3, 4]], heads=2, channels=3, queries=5, points=2, low=-3.0, high=-0.5
    )
    out, (grad_value, grad_locations, grad_weights) = outputs_and_grads(_apply, inputs)
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(grad_value) == 0
    assert torch.count_nonzero(grad_locations) == 0
    assert torch.count_nonzero(grad_weights) == 0


def test_backward_is_identical_for_any_thread_count():
    # Each (batch, head) task owns its slice of grad_value: no race, so the result must be
    # bitwise the same with 1 and 2 threads.
    inputs = random_inputs(
        batch=2, shapes=[[16, 16], [8, 8]], heads=4, channels=8, queries=64, points=4,
        dtype=torch.float32, low=0.3, high=0.7,
    )  # fmt: skip
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(outputs_and_grads(_apply, inputs))
    finally:
        torch.set_num_threads(threads)
    (out1, grads1), (out2, grads2) = results
    assert torch.equal(out1, out2)
    for g1, g2 in zip(grads1, grads2):
        assert torch.equal(g1, g2)


def test_inconsistent_geometry_is_rejected():
    value, shapes, starts, locations, weights = random_inputs(
        batch=1, shapes=[[3, 3]], heads=1, channels=2, queries=2, points=1
    )
    with pytest.raises(RuntimeError, match="cover 16 positions"):
        _apply(value, torch.tensor([[4, 4]]), starts, locations, weights)
    with pytest.raises(RuntimeError, match="share one dtype"):
        _apply(value, shapes, starts, locations.float(), weights)


@pytest.mark.parametrize("batch, queries", [(2, 0), (0, 5)])
def test_empty_batch_or_queries_give_empty_outputs_and_zero_grads(batch, queries):
    inputs = random_inputs(
        batch=batch, shapes=[[3, 4], [2, 2]], heads=2, channels=3, queries=queries, points=2
    )
    out, grads = outputs_and_grads(_apply, inputs)
    assert out.shape == (batch, queries, 6)
    for grad, tensor in zip(grads, (inputs[0], inputs[3], inputs[4])):
        assert grad.shape == tensor.shape and torch.count_nonzero(grad) == 0


def test_empty_level_is_refused_with_its_index():
    inputs = random_inputs(
        batch=1, shapes=[[3, 4], [0, 5]], heads=2, channels=3, queries=4, points=2
    )
    with pytest.raises(RuntimeError, match=r"level 1 has shape \(0, 5\)"):
        _apply(*inputs)
