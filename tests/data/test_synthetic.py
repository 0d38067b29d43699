"""Built-in synthetic dataset: deterministic bytes, lazy/idempotent generation, masks
that match their images, and the registered labelled/unlabelled/val parts."""

import hashlib
import json
import multiprocessing
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from hiervl.data.datasets import synthetic
from hiervl.data.datasets.synthetic import (
    CLASS_COLORS,
    CLASSES,
    STRIPES_LIGHT,
    ensure_generated,
    register_synthetic,
    render_sample,
)

SMALL = {"num_train": 24, "num_val": 6, "image_size": 64}


def _digests(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_render_is_deterministic_and_seed_dependent():
    a_img, a_lab = render_sample(0, "train", 5, 64)
    b_img, b_lab = render_sample(0, "train", 5, 64)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    c_img, _ = render_sample(1, "train", 5, 64)
    d_img, _ = render_sample(0, "val", 5, 64)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_img, d_img)


def test_same_seed_same_bytes_and_idempotent(tmp_path):
    first = ensure_generated(str(tmp_path / "a"), seed=3, **SMALL)
    second = ensure_generated(str(tmp_path / "b"), seed=3, **SMALL)
    digests = _digests(first)
    assert len(digests) == 2 * (24 + 6) + 1 and digests == _digests(second)
    stamp = os.path.getmtime(os.path.join(first, "images", "train", "000000.jpg"))
    assert ensure_generated(str(tmp_path / "a"), seed=3, **SMALL) == first
    assert os.path.getmtime(os.path.join(first, "images", "train", "000000.jpg")) == stamp
    # Changed parameters regenerate in place; no staging folders are left behind.
    ensure_generated(str(tmp_path / "a"), seed=4, **SMALL)
    assert _digests(first) != digests
    with open(os.path.join(first, synthetic.MARKER)) as f:
        assert json.load(f)["seed"] == 4
    assert sorted(os.listdir(tmp_path / "a")) == [synthetic.DIR_NAME]


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    foreign = tmp_path / synthetic.DIR_NAME
    foreign.mkdir()
    (foreign / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        ensure_generated(str(tmp_path), **SMALL)
    with pytest.raises(ValueError, match="unknown"):
        ensure_generated(str(tmp_path / "x"), colour="red")


def test_masks_match_images(tmp_path):
    """Decoded JPEGs: each class's pixels mostly carry that class's colour cue (objects
    sometimes wear another class's colour, by design), the background carries none, and
    stripes are textured."""
    count = 100
    folder = ensure_generated(str(tmp_path), seed=0, num_train=count, num_val=1, image_size=64)
    images, labels = [], []
    for i in range(count):
        images.append(np.asarray(Image.open(f"{folder}/images/train/{i:06d}.jpg"), np.float64))
        labels.append(np.asarray(Image.open(f"{folder}/annotations/train/{i:06d}.png")))
        assert images[-1].shape == (64, 64, 3) and labels[-1].shape == (64, 64)
        assert (labels[-1] > 0).any(), "every image has at least one object"
    image, label = np.stack(images), np.stack(labels)
    assert set(np.unique(label).tolist()) == set(range(len(CLASSES)))
    # Nearest cue colour per pixel; a stripe pixel is either the stripes colour or light.
    palette = np.asarray([CLASS_COLORS[k] for k in sorted(CLASS_COLORS)] + [STRIPES_LIGHT])
    palette_class = np.asarray(sorted(CLASS_COLORS) + [CLASSES.index("stripes")])
    distance = np.linalg.norm(image[..., None, :] - palette, axis=-1)
    nearest_class = palette_class[distance.argmin(-1)]
    close = distance.min(-1) < 40
    for k in range(1, len(CLASSES)):
        agree = (nearest_class[label == k] == k).mean()
        assert agree > 0.6, f"only {agree:.2f} of {CLASSES[k]} pixels show its colour cue"
        assert close[label == k].mean() > 0.4
    assert close[label == 0].mean() < 0.01, "the background must not mimic a class colour"
    # Texture cue: neighbouring pixels differ far more inside stripes than inside squares.
    step = np.abs(np.diff(image, axis=2)).sum(-1)
    same = label[:, :, 1:] == label[:, :, :-1]
    inside = {k: step[same & (label[:, :, 1:] == k)].mean() for k in (2, 5)}
    assert CLASSES[2] == "square" and CLASSES[5] == "stripes"
    assert inside[5] > 3 * inside[2]


def test_registration_parts(tmp_path, restore_catalog):
    names = register_synthetic(str(tmp_path), seed=0, **SMALL)
    assert {"synthetic_train", "synthetic_val", "synthetic_train_labeled_16",
            "synthetic_train_unlabeled_16"} <= set(names)  # fmt: skip
    assert not os.listdir(tmp_path), "registration alone generates nothing"
    labeled = DatasetCatalog.get("synthetic_train_labeled_16")
    unlabeled = DatasetCatalog.get("synthetic_train_unlabeled_16")
    full = DatasetCatalog.get("synthetic_train")
    assert len(labeled) == 16 and len(unlabeled) == SMALL["num_train"] - 16
    lab_files = {d["file_name"] for d in labeled}
    unl_files = {d["file_name"] for d in unlabeled}
    assert not lab_files & unl_files
    assert lab_files | unl_files == {d["file_name"] for d in full}
    assert all("sem_seg_file_name" not in d for d in unlabeled)
    assert all(os.path.isfile(d["sem_seg_file_name"]) for d in labeled)
    assert len(DatasetCatalog.get("synthetic_val")) == SMALL["num_val"]
    # A labelled subset as large as the train split is a clear error, not a silent one.
    with pytest.raises(ValueError, match="labelled subset of 32"):
        DatasetCatalog.get("synthetic_train_labeled_32")
    meta = MetadataCatalog.get("synthetic_val")
    assert meta.stuff_classes == list(CLASSES) and meta.ignore_label == 255
    assert meta.evaluator_type == "sem_seg" and len(meta.stuff_colors) == len(CLASSES)


def _generate(root):
    return _digests(ensure_generated(root, seed=5, **SMALL))


def test_concurrent_processes_generate_once_consistently(tmp_path):
    """Two processes (e.g. two DDP ranks) loading at once both get the complete dataset."""
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        first, second = pool.map(_generate, [str(tmp_path)] * 2)
    assert first == second and len(first) == 2 * (24 + 6) + 1
    assert sorted(os.listdir(tmp_path)) == [synthetic.DIR_NAME]
