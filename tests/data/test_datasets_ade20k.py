"""ADE20K: reduce_zero_label at prepare time (0 -> 255, k -> k-1) and the records."""

import os
import runpy
import sys

import numpy as np
import pytest
from dataset_trees import HEIGHT, WIDTH, read_label, write_image, write_label
from detectron2.data import DatasetCatalog, MetadataCatalog

from hiervl.data.datasets import DatasetNotFoundError, ade20k, register_all

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = {
    "training": ["ADE_train_00000001", "ADE_train_00000002"],
    "validation": ["ADE_val_00000001"],
}


def raw_label(seed):
    """Raw values cover 0 (other), 1 and 150 (first and last classes)."""
    label = np.random.default_rng(seed).integers(0, 151, (HEIGHT, WIDTH)).astype(np.uint8)
    label[0, :3] = [0, 1, 150]
    return label


def make_ade(root):
    droot = os.path.join(root, "ADEChallengeData2016")
    for part, stems in PARTS.items():
        for k, stem in enumerate(stems):
            write_image(os.path.join(droot, "images", part, stem + ".jpg"), seed=k)
            write_label(os.path.join(droot, "annotations", part, stem + ".png"), raw_label(k))
    return droot


def test_reduce_zero_label_by_hand():
    raw = np.array([[0, 1, 2], [149, 150, 0]], dtype=np.uint8)
    expected = np.array([[255, 0, 1], [148, 149, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(ade20k.reduce_zero_label(raw), expected)
    with pytest.raises(ValueError, match="151"):
        ade20k.reduce_zero_label(np.array([[151]], dtype=np.uint8))


def test_raw_labels_alone_are_refused(tmp_path):
    make_ade(str(tmp_path))
    register_all(str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="annotations_detectron2.*prepare_ade20k.py"):
        DatasetCatalog.get("ade20k_train")


def test_prepare_and_records(tmp_path):
    droot = make_ade(str(tmp_path))
    argv = sys.argv
    sys.argv = ["prepare_ade20k.py", "--root", str(tmp_path), "--workers", "1"]
    try:
        runpy.run_path(os.path.join(REPO, "datasets", "prepare_ade20k.py"), run_name="__main__")
    finally:
        sys.argv = argv
    register_all(str(tmp_path))
    assert len(MetadataCatalog.get("ade20k_val").stuff_classes) == 150
    train = DatasetCatalog.get("ade20k_train")
    assert [r["image_id"] for r in train] == PARTS["training"]
    for k, record in enumerate(train):
        assert record["sem_seg_file_name"].startswith(os.path.join(droot, "annotations_detectron2"))
        label = read_label(record["sem_seg_file_name"])
        raw = raw_label(k)
        assert list(label[0, :3]) == [255, 0, 149]
        np.testing.assert_array_equal(label[raw == 0], 255)
        np.testing.assert_array_equal(label[raw > 0], raw[raw > 0] - 1)
    (val,) = DatasetCatalog.get("ade20k_val")
    assert val["file_name"] == os.path.join(droot, "images", "validation", "ADE_val_00000001.jpg")
    assert (val["height"], val["width"]) == (HEIGHT, WIDTH)
