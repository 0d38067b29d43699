"""Export mode (``static_shapes``) and the ONNX export of one window, on the tiny model.

Plain torch + onnx + onnxruntime (no detectron2), so both stacks run it: the modern one
checks torch 2.14's TorchScript exporter as well.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from tiny_hiervl import CLASSES, build_model

from hiervl.modeling.backbone.frozen_encoder import antialiased_resize_matrix
from hiervl.modeling.hiervl_model import live_text_queries
from hiervl.modeling.static_window import StaticWindow
from hiervl.tools.onnx_export import export_onnx, score_agreement
from hiervl.tools.onnx_metadata import INPUT_NAME, DeployMetadata

# CLIP's pixel statistics (hiervl/config.py), to normalise the drawn scenes.
MEAN = np.array([122.7709383, 116.7460125, 104.09373615])
STD = np.array([68.5005327, 66.6321579, 70.32316305])
# Export mode vs the eager path: the same math, rounded differently (attention kernels see
# masked instead of removed keys, the resize is a matmul): |Δ| <= STATIC_RTOL * max |S|,
# about 16 float32 epsilons (measured: <= 3e-7 relative, 3.8e-6 on scores up to 13).
STATIC_RTOL = 2e-6


def assert_static_close(static, eager):
    bound = STATIC_RTOL * max(1.0, float(eager.abs().max()))
    assert float((static - eager).abs().max()) <= bound


def scene(height: int, width: int, seed: int) -> torch.Tensor:
    """(1,3,H,W) normalised picture: a smooth colour field, a disc, a box, pixel noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([80 + 90 * ys, 120 + 60 * xs, 100 + 50 * ys * xs], axis=-1)
    cy, cx, r = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width, height / 4
    disc = (np.mgrid[0:height, 0:width][0] - cy) ** 2 + (np.mgrid[0:height, 0:width][1] - cx) ** 2
    image[disc < r * r] = rng.uniform(0, 255, size=3)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top : top + height // 3, left : left + width // 3] = rng.uniform(0, 255, size=3)
    image = np.clip(image + rng.normal(0, 8, size=image.shape), 0, 255)
    normalised = (image - MEAN) / STD
    return torch.from_numpy(normalised.transpose(2, 0, 1)[None].astype(np.float32))


@pytest.fixture(scope="module")
def model():
    return build_model().eval()


@pytest.mark.parametrize("src,dst", [(512, 224), (801, 224), (1203, 336), (96, 64), (64, 224)])
def test_resize_matrix_is_torchs_antialiased_resize(src, dst):
    eye = torch.eye(src).view(1, 1, src, src)
    expected = F.interpolate(
        eye, size=(dst, src), mode="bilinear", align_corners=False, antialias=True
    )[0, 0]
    # torch's own float32 weights, bit for bit (not merely the exact float64 filter).
    torch.testing.assert_close(antialiased_resize_matrix(src, dst), expected, rtol=0, atol=0)
    x = torch.randn(2, 3, src, 40, generator=torch.Generator().manual_seed(0))
    resized = F.interpolate(x, size=(dst, 40), mode="bilinear", antialias=True)
    torch.testing.assert_close(antialiased_resize_matrix(src, dst) @ x, resized)


@pytest.mark.parametrize("prune_classes", [False, True])
@pytest.mark.parametrize("all_active", [False, True])
@pytest.mark.parametrize("size", [(96, 128), (72, 100)])  # resized for HSQG; padded
def test_static_shapes_equal_the_eager_scores(model, size, all_active, prune_classes):
    images = scene(*size, seed=1)
    threshold = model.hsqg.relevance_threshold
    model.hsqg.relevance_threshold = 0.0 if all_active else threshold
    try:
        with torch.no_grad():
            text = model.class_embeddings()
            out = model(F.pad(images, (0, (-size[1]) % 32, 0, (-size[0]) % 32)), text=text)
            eager = model.predict_scores(images, text, prune_classes=prune_classes)
            static = model.predict_scores(
                images, text, static_shapes=True, prune_classes=prune_classes
            )
    finally:
        model.hsqg.relevance_threshold = threshold
    _, _, kept = live_text_queries(torch.zeros(1, 1, len(CLASSES), 1), out["active"])
    # The case is what it claims: classes pruned (and removed by the eager path) or not.
    assert (kept is None) == all_active
    if not all_active:
        assert 1 <= len(kept) < len(CLASSES)
    assert static.shape == eager.shape == (1, len(CLASSES), *size)
    assert_static_close(static, eager)
    if prune_classes and not all_active:
        pruned = ~out["active"][0]
        assert torch.all(static[0, pruned] == 0) and torch.all(eager[0, pruned] == 0)
        assert bool((static[0, ~pruned] > 0).any())


def test_static_window_bakes_the_vocabulary_and_checks_its_input(model):
    window = StaticWindow(model=model, height=64, width=96)
    images = scene(64, 96, seed=2)
    with torch.no_grad():
        expected = model.predict_scores(images, model.class_embeddings())
        assert_static_close(window(images), expected)
    assert window.class_names == list(CLASSES)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 64, 96\)"):
        window(scene(64, 64, seed=2))
    with pytest.raises(ValueError, match="window size must be positive"):
        StaticWindow(model=model, height=0, width=64)


def _metadata(size, names=CLASSES):
    return DeployMetadata(
        class_names=tuple(names),
        input_size=size,
        pixel_mean=tuple(MEAN),
        pixel_std=tuple(STD),
        window_stride=size[0] // 2,
        prune_classes=False,
        commit="0123abc",
        weights="",
    )


def test_onnxruntime_matches_eager_pytorch(model, tmp_path):
    size = (64, 96)
    path = str(tmp_path / "tiny.onnx")
    export_onnx(StaticWindow(model=model, height=size[0], width=size[1]), path, _metadata(size))

    loaded = onnx.load(path)
    props = {p.key: p.value for p in loaded.metadata_props}
    assert DeployMetadata.from_props(props, path) == _metadata(size)
    assert {n.op_type for n in loaded.graph.node} >= {"GridSample", "TopK"}

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for seed in range(3):
        images = scene(*size, seed=10 + seed)
        with torch.no_grad():
            eager = model.predict_scores(images, model.class_embeddings()).numpy()
        (scores,) = session.run(None, {INPUT_NAME: images.numpy()})
        delta, agree = score_agreement(eager, scores)
        assert delta <= 1e-4 and agree >= 0.999, (seed, delta, agree)


def test_metadata_round_trip_and_errors():
    colors = tuple((10 * k, 20, 30) for k in range(len(CLASSES)))
    meta = DeployMetadata(**{**_metadata((64, 96)).__dict__, "class_colors": colors})
    assert DeployMetadata.from_props(meta.to_props(), "f.onnx") == meta
    with pytest.raises(ValueError, match="class_colors must be 6 RGB triples"):
        DeployMetadata(**{**meta.__dict__, "class_colors": colors[:2]})
    props = meta.to_props()
    del props["hiervl.commit"]
    with pytest.raises(ValueError, match=r"f\.onnx: not a HierVL export .*hiervl\.commit"):
        DeployMetadata.from_props(props, "f.onnx")
    props = {**meta.to_props(), "hiervl.input_size": "[64]"}
    with pytest.raises(ValueError, match="f.onnx: malformed HierVL metadata"):
        DeployMetadata.from_props(props, "f.onnx")


def test_export_refuses_mismatched_metadata(model, tmp_path):
    window = StaticWindow(model=model, height=64, width=64)
    path = tmp_path / "x.onnx"
    with pytest.raises(ValueError, match="input_size"):
        export_onnx(window, str(path), _metadata((64, 96)))
    with pytest.raises(ValueError, match="class_names"):
        export_onnx(window, str(path), _metadata((64, 64), names=CLASSES[::-1]))
    assert not path.exists()
