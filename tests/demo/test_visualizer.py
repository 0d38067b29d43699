"""The demo's visualiser: overlay arithmetic, legend rows and the drawn text."""

import numpy as np
import pytest

pytest.importorskip("cv2")

from hiervl.demo.predictor import UNLABELED  # noqa: E402
from hiervl.demo.visualizer import SemanticVisualizer, class_colors, legend_entries  # noqa: E402


def test_overlay_blends_class_colours_exactly():
    image = np.random.default_rng(5).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    labels = np.zeros((30, 40), dtype=np.int64)
    labels[:, 20:] = 1
    labels[:5] = UNLABELED
    colors = class_colors(2)
    plain = SemanticVisualizer(alpha=0.25, draw_names=False, draw_legend=False)
    out = plain.draw(image, labels, ["a", "b"])
    expected = image.astype(float)
    expected[5:, :20] = 0.25 * colors[0] + 0.75 * image[5:, :20]
    expected[5:, 20:] = 0.25 * colors[1] + 0.75 * image[5:, 20:]
    np.testing.assert_allclose(out.astype(float), expected, atol=1)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert len({tuple(c) for c in class_colors(20)}) == 20


def test_legend_entries_and_text_are_drawn():
    labels = np.full((120, 160), 2, dtype=np.int64)
    labels[:, :40] = 0
    labels[:10] = UNLABELED
    entries = legend_entries(labels, ["sky", "road", "tree"])
    assert [(e.name, e.index) for e in entries] == [("tree", 2), ("sky", 0), ("unlabelled", -1)]
    fractions = [110 * 120 / 19200, 110 * 40 / 19200, 10 * 160 / 19200]
    assert [e.fraction for e in entries] == pytest.approx(fractions)
    image = np.full((120, 160, 3), 90, dtype=np.uint8)
    bare = SemanticVisualizer(alpha=0.5, draw_names=False, draw_legend=False)
    named = SemanticVisualizer(alpha=0.5, draw_names=True, draw_legend=False)
    full = SemanticVisualizer(alpha=0.5)
    base = bare.draw(image, labels, ["sky", "road", "tree"])
    with_names = named.draw(image, labels, ["sky", "road", "tree"])
    with_legend = full.draw(image, labels, ["sky", "road", "tree"])
    # Names add light text with a dark outline inside the labelled regions (both are large
    # enough), never on the unlabelled strip. How close anti-aliased strokes get to pure
    # white / black depends on the OpenCV version (255 / 0 with 4.x, 253 / 37 or 225 with
    # 5.0), so the test asks for far lighter and far darker pixels than any overlay colour.
    changed = (with_names != base).any(axis=2)
    rows, cols = np.nonzero(changed)
    assert rows.size and rows.min() >= 10
    assert (cols < 40).any() and (cols >= 40).any()  # "sky" and "tree" are both written
    assert with_names[changed].min(axis=1).max() >= base.max() + 40  # text
    assert with_names[changed].max(axis=1).min() <= base.min() - 20  # outline
    # The legend darkens the top-left corner.
    # The legend box starts with a margin: its top-left pixel is the darkened image.
    assert (with_legend[0, 0] == np.floor(base[0, 0] * (1 - 0.6))).all()
    assert (with_legend[0, 0] == 36).all() and (with_legend[-1, -1] == base[-1, -1]).all()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        legend_entries(np.full((2, 2), 5), ["a"])


def test_legend_stays_in_the_top_half_and_skips_tiny_images():
    names = [f"class{k}" for k in range(12)]
    labels = np.repeat(np.arange(12), 160 // 12 + 1)[:160][None].repeat(120, axis=0)
    image = np.full((120, 160, 3), 90, dtype=np.uint8)
    bare = SemanticVisualizer(alpha=0.5, draw_names=False, draw_legend=False)
    legend_only = SemanticVisualizer(alpha=0.5, draw_names=False, draw_legend=True)
    changed = (legend_only.draw(image, labels, names) != bare.draw(image, labels, names)).any(2)
    rows = np.nonzero(changed.any(1))[0]
    assert rows.size and rows.max() < 60  # 12 rows do not fit: "+n more" inside half the height
    tiny = np.full((20, 20, 3), 90, dtype=np.uint8)
    tiny_labels = np.repeat(np.arange(3), 7)[:20][None].repeat(20, axis=0)
    np.testing.assert_array_equal(
        legend_only.draw(tiny, tiny_labels, names[:3]), bare.draw(tiny, tiny_labels, names[:3])
    )


def test_dataset_palette_is_used_for_its_own_classes_only():
    from types import SimpleNamespace

    from hiervl.demo.visualizer import DatasetPalette

    class Meta(SimpleNamespace):
        def get(self, key, default=None):
            return getattr(self, key, default)

    meta = Meta(stuff_classes=["road", "sky"], stuff_colors=[[128, 64, 128], [70, 130, 180]])
    palette = DatasetPalette.from_metadata(meta)
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    labels = np.zeros((4, 6), dtype=np.int64)
    labels[:, 3:] = 1
    drawer = SemanticVisualizer(alpha=1.0, draw_names=False, draw_legend=False, palette=palette)
    out = drawer.draw(image, labels, ["road", "sky"])
    assert out[0, 0].tolist() == [128, 64, 128][::-1] and out[0, 5].tolist() == [180, 130, 70]
    # Another vocabulary (open vocabulary, --vocabulary): generated colours.
    other = drawer.draw(image, labels, ["cat", "dog"])
    assert other[0, 0].tolist() == class_colors(2)[0].tolist()
    assert DatasetPalette.from_metadata(Meta(stuff_classes=["a"])) is None
    with pytest.raises(ValueError, match="2 stuff_colors for 1 stuff_classes"):
        DatasetPalette.from_metadata(Meta(stuff_classes=["a"], stuff_colors=[[0, 0, 0]] * 2))
