"""Pascal VOC: prepare_voc's train_aug list, records, label folders, split parts."""

import os
import runpy
import sys

import numpy as np
import pytest
from dataset_trees import HEIGHT, WIDTH, read_label, write_image, write_label
from detectron2.data import DatasetCatalog

from hiervl.data import splits
from hiervl.data.datasets import DatasetNotFoundError, register_all

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_IDS = [f"2008_{i:06d}" for i in range(100)]  # > the 92 labelled of the smallest split
VAL_IDS = ["2007_000033", "2007_000042"]
# A VOC-like palette: index k gets an arbitrary distinct colour.
PALETTE = [c for k in range(256) for c in ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256)]


def make_voc(root, *, aug=True):
    droot = os.path.join(root, "VOCdevkit", "VOC2012")
    label_dir = "SegmentationClassAug" if aug else "SegmentationClass"
    for k, i in enumerate(TRAIN_IDS + VAL_IDS):
        write_image(os.path.join(droot, "JPEGImages", i + ".jpg"), seed=k)
        label = np.full((HEIGHT, WIDTH), k % 21, dtype=np.uint8)
        label[0, 0] = 255  # VOC's object boundaries are 255
        write_label(os.path.join(droot, label_dir, i + ".png"), label, None if aug else PALETTE)
    lists = os.path.join(droot, "ImageSets", "Segmentation")
    os.makedirs(lists, exist_ok=True)
    with open(os.path.join(lists, "val.txt"), "w") as f:
        f.write("\n".join(VAL_IDS) + "\n")
    return droot


def run_prepare(root):
    argv = sys.argv
    sys.argv = ["prepare_voc.py", "--root", str(root)]
    try:
        runpy.run_path(os.path.join(REPO, "datasets", "prepare_voc.py"), run_name="__main__")
    finally:
        sys.argv = argv


def test_prepare_and_records(tmp_path):
    droot = make_voc(str(tmp_path))
    run_prepare(tmp_path)
    with open(os.path.join(droot, "ImageSets", "Segmentation", "train_aug.txt")) as f:
        assert f.read().split() == sorted(TRAIN_IDS)  # every labelled image minus val
    register_all(str(tmp_path))
    train = DatasetCatalog.get("voc_train_aug")
    assert [r["image_id"] for r in train] == sorted(TRAIN_IDS)
    record = train[3]
    assert record["file_name"] == os.path.join(droot, "JPEGImages", record["image_id"] + ".jpg")
    assert (record["height"], record["width"]) == (HEIGHT, WIDTH)
    assert record["sem_seg_file_name"].endswith(f"SegmentationClassAug/{record['image_id']}.png")
    label = read_label(record["sem_seg_file_name"])
    assert label[0, 0] == 255 and label[1, 1] == 3
    val = DatasetCatalog.get("voc_val")
    assert [r["image_id"] for r in val] == VAL_IDS


def test_fallback_to_segmentation_class_palette_pngs(tmp_path):
    make_voc(str(tmp_path), aug=False)
    run_prepare(tmp_path)
    register_all(str(tmp_path))
    val = DatasetCatalog.get("voc_val")
    assert "/SegmentationClass/" in val[0]["sem_seg_file_name"]
    # Palette PNGs decode to class indices, not colours.
    label = read_label(val[1]["sem_seg_file_name"])
    assert label.ndim == 2 and label[0, 0] == 255 and label[1, 1] == 101 % 21


def test_missing_train_aug_list_names_prepare_script(tmp_path):
    make_voc(str(tmp_path))
    register_all(str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="train_aug.txt.*prepare_voc.py"):
        DatasetCatalog.get("voc_train_aug")


def test_split_parts_from_a_seeded_list(tmp_path):
    make_voc(str(tmp_path))
    run_prepare(tmp_path)
    splits.generate("voc", 92, str(tmp_path), seed=3)
    register_all(str(tmp_path))
    labeled = DatasetCatalog.get("voc_train_labeled_92")
    unlabeled = DatasetCatalog.get("voc_train_unlabeled_92")
    assert len(labeled) == 92 and len(unlabeled) == len(TRAIN_IDS) - 92
    assert all("sem_seg_file_name" in r for r in labeled)
    assert all("sem_seg_file_name" not in r for r in unlabeled)  # labels never leak
    ids_l = {r["image_id"] for r in labeled}
    ids_u = {r["image_id"] for r in unlabeled}
    assert not ids_l & ids_u and ids_l | ids_u == set(TRAIN_IDS)
