"""The hard synthetic variant: scenes that match their label maps, colours that carry no
class cue, captions that name exactly the visible classes, and its registered splits."""

import re

import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from hiervl.data.datasets import synthetic
from hiervl.data.datasets.synthetic import (
    CLASSES,
    HARD_LABELED_COUNTS,
    register_synthetic,
    render_sample,
    render_scene,
)
from hiervl.data.datasets.synthetic_hard import CUE_COLORS, CUE_PROB, PALETTE, Scene, caption

SIZE = 64
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star"}


def _named_classes(text):
    words = re.findall(r"[a-z]+", text)
    return {PLURALS.get(w, w) for w in words} & set(CLASSES[1:])


def test_scene_matches_label_and_render_sample():
    for index in range(40):
        image, label, scene = render_scene(0, "train", index, SIZE)
        same_image, same_label = render_sample(0, "train", index, SIZE, "hard")
        assert np.array_equal(image, same_image) and np.array_equal(label, same_label)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        share = np.bincount(label.ravel(), minlength=len(CLASSES)) / label.size
        visible = {k for k in range(1, len(CLASSES)) if share[k] >= 0.01}
        assert set(scene.classes) == visible
        assert len(scene.colors) == len(scene.classes) == len(scene.counts)
        assert set(scene.colors) <= set(PALETTE) and min(scene.counts, default=1) >= 1
    # Different seed words (splits, including the pretraining ones) give other images.
    a = render_sample(0, "train", 3, SIZE, "hard")[0]
    for split in ("val", "pretrain", "pretrain_heldout"):
        assert not np.array_equal(a, render_sample(0, split, 3, SIZE, "hard")[0])
    with pytest.raises(ValueError, match="unknown synthetic split"):
        render_sample(0, "test", 0, SIZE, "hard")
    with pytest.raises(ValueError, match="unknown synthetic variant"):
        render_sample(0, "train", 0, SIZE, "harder")


def test_colour_is_a_cue_not_a_rule():
    """Each shape class wears its cue colour CUE_PROB (0.8) of the time, plus the cue's
    share of the uniform draws, and most palette colours otherwise."""
    worn = {k: [] for k in range(1, len(CLASSES))}
    for index in range(300):
        scene = render_scene(0, "train", index, SIZE)[2]
        for k, color in zip(scene.classes, scene.colors):
            worn[k].append(color)
    expected = CUE_PROB + (1 - CUE_PROB) / len(PALETTE)
    for k, colors in worn.items():
        share = np.mean([c == CUE_COLORS[k] for c in colors])
        assert abs(share - expected) < 0.1, (CLASSES[k], share, len(colors))
        assert len(set(colors)) >= 8, (CLASSES[k], set(colors))


def test_captions_name_visible_classes_only_all_of_them_half_the_time():
    rng = np.random.default_rng(0)
    full, multi = 0, 0
    for index in range(60):
        scene = render_scene(0, "pretrain", index, SIZE)[2]
        visible = {CLASSES[k] for k in scene.classes}
        for _ in range(5):
            text = caption(scene, rng)
            named = _named_classes(text)
            assert named <= visible and (named or not visible), (text, scene)
            if len(visible) > 1:
                multi += 1
                full += named == visible
    # A strict subset with probability _SUBSET_PROB (0.5), else every visible class.
    assert 0.35 < full / multi < 0.65, (full, multi)
    scene = Scene(classes=(1, 4, 5), colors=("red", "orange", "blue"), counts=(2, 1, 1),
                  background="noisy")  # fmt: skip
    texts = [caption(scene, rng) for _ in range(300)]
    assert len(set(texts)) > 50
    first = {min(("circle", "star", "stripes"), key=lambda w: t.find(w) % 1000) for t in texts}
    assert first == {"circle", "star", "stripes"}, "every class comes first in some caption"
    assert any("an orange star" in t for t in texts) and any("two circles" in t for t in texts)
    assert any("noisy background" in t for t in texts)
    assert any("background" not in t for t in texts)
    empty = Scene(classes=(), colors=(), counts=(), background="cluttered")
    assert caption(empty, rng) == "a cluttered background."


def test_hard_family_splits(tmp_path, monkeypatch, restore_catalog):
    monkeypatch.setattr(synthetic, "HARD", {**synthetic.HARD, "num_train": 40, "num_val": 5})
    names = register_synthetic(str(tmp_path))
    n = HARD_LABELED_COUNTS[1]
    assert {f"synthetic_hard_train_labeled_{n}", f"synthetic_hard_train_labeled_{n}_split3",
            "synthetic_hard_val"} <= set(names)  # fmt: skip
    train = {d["file_name"] for d in DatasetCatalog.get("synthetic_hard_train")}
    assert all("hiervl_synthetic_hard" in f for f in train) and len(train) == 40
    subsets = []
    for suffix in ("", "_split1", "_split2"):
        lab = {
            d["file_name"] for d in DatasetCatalog.get(f"synthetic_hard_train_labeled_{n}{suffix}")
        }
        unl = DatasetCatalog.get(f"synthetic_hard_train_unlabeled_{n}{suffix}")
        assert len(lab) == n and not lab & {d["file_name"] for d in unl}
        assert lab | {d["file_name"] for d in unl} == train
        assert all("sem_seg_file_name" not in d for d in unl)
        subsets.append(lab)
    assert subsets[0] != subsets[1] != subsets[2]
    # Split seed 0 is the partition the basic variant always had.
    assert synthetic._labeled_indices(0, 40, n).tolist() == sorted(
        np.random.default_rng([0, 2]).permutation(40)[:n].tolist()
    )
    assert len(DatasetCatalog.get("synthetic_hard_val")) == 5
