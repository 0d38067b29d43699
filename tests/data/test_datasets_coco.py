"""COCO: instance annotations (polygons, RLE) -> 81-class masks, prepare_coco, records."""

import json
import os
import runpy
import sys

import numpy as np
import pytest
from dataset_trees import read_label, write_image
from detectron2.data import DatasetCatalog, MetadataCatalog
from pycocotools import mask as mask_utils

from hiervl.data.datasets import coco, register_all

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H, W = 8, 10
# COCO category ids (not contiguous) of the classes used here.
PERSON, CAR, CAT, DOG = 1, 3, 17, 18


def rect(x0, y0, x1, y1):
    """Polygon of the pixel block rows y0..y1-1, columns x0..x1-1."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def label_of(category_id):
    return coco.CLASSES.index({PERSON: "person", CAR: "car", CAT: "cat", DOG: "dog"}[category_id])


def block(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def compressed_rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}  # as in the json


def annotations_image_1():
    """Person block, a dog inside it, a crowd car column (uncompressed RLE), a cat (RLE)."""
    return [
        {"id": 1, "category_id": PERSON, "iscrowd": 0, "segmentation": rect(0, 0, 8, 6)},
        {"id": 2, "category_id": DOG, "iscrowd": 0, "segmentation": rect(2, 1, 4, 3)},
        # Column-major counts: 9 columns of zeros, then column 9 all ones.
        {"id": 3, "category_id": CAR, "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": [9 * H, H]}},
        {"id": 4, "category_id": CAT, "iscrowd": 0,
         "segmentation": compressed_rle(block(6, 8, 0, 4))},
    ]  # fmt: skip


def expected_image_1():
    out = np.zeros((H, W), dtype=np.uint8)
    out[0:6, 0:8] = label_of(PERSON)
    out[1:3, 2:4] = label_of(DOG)  # the smaller instance wins the overlap
    out[:, 9] = label_of(CAR)
    out[6:8, 0:4] = label_of(CAT)
    return out


def test_class_table():
    assert len(coco.CLASSES) == 81 and coco.CLASSES[0] == "background"
    assert coco.CATEGORY_TO_LABEL[PERSON] == 1 and coco.CATEGORY_TO_LABEL[90] == 80
    assert coco.CLASSES[coco.CATEGORY_TO_LABEL[DOG]] == "dog"


def test_segmentation_formats():
    two_parts = rect(0, 0, 2, 2) + rect(5, 5, 7, 8)
    expected = block(0, 2, 0, 2) | block(5, 8, 5, 7)
    np.testing.assert_array_equal(coco.segmentation_to_mask(two_parts, H, W), expected)
    crowd = {"size": [H, W], "counts": [2 * H + 3, 2, H * W - 2 * H - 5]}  # column 2, rows 3-4
    np.testing.assert_array_equal(coco.segmentation_to_mask(crowd, H, W), block(3, 5, 2, 3))
    # Runs that stop short of the image would leave pycocotools' output uninitialised.
    short = {"size": [H, W], "counts": [2 * H + 3, 2]}
    with pytest.raises(ValueError, match=f"covers {2 * H + 5} pixels, the image has 8x10 = 80"):
        coco.segmentation_to_mask(short, H, W)
    m = block(1, 7, 3, 9)
    np.testing.assert_array_equal(coco.segmentation_to_mask(compressed_rle(m), H, W), m)


def test_overlaps_are_resolved_deterministically():
    anns = annotations_image_1()
    expected = expected_image_1()
    np.testing.assert_array_equal(coco.instances_to_semantic(anns, H, W), expected)
    np.testing.assert_array_equal(coco.instances_to_semantic(anns[::-1], H, W), expected)
    # Equal areas: the higher annotation id is painted last and wins.
    tie = [
        {"id": 6, "category_id": DOG, "iscrowd": 0, "segmentation": rect(1, 0, 3, 2)},
        {"id": 5, "category_id": PERSON, "iscrowd": 0, "segmentation": rect(0, 0, 2, 2)},
    ]
    out = coco.instances_to_semantic(tie, H, W)
    assert out[0, 0] == label_of(PERSON) and out[0, 1] == out[0, 2] == label_of(DOG)
    assert coco.instances_to_semantic([], H, W).max() == 0


def test_unknown_category_is_an_error():
    bad = [{"id": 9, "category_id": 12, "iscrowd": 0, "segmentation": rect(0, 0, 1, 1)}]
    with pytest.raises(ValueError, match="unknown category 12"):
        coco.instances_to_semantic(bad, H, W)
    short = {"size": [H, W], "counts": [5]}
    bad = [{"id": 4, "category_id": DOG, "iscrowd": 1, "segmentation": short}]
    with pytest.raises(ValueError, match="^annotation 4: uncompressed RLE covers 5 pixels"):
        coco.instances_to_semantic(bad, H, W)
    image = {"file_name": "000000000004.jpg", "id": 4, "height": H, "width": W}
    with pytest.raises(ValueError, match=r"^image 000000000004.jpg \(id 4\): annotation 4: "):
        coco._convert_one((image, bad, "/nonexistent", True))


def make_coco(root):
    droot = os.path.join(root, "coco")
    categories = [{"id": i, "name": coco.CLASSES[k + 1]} for k, i in enumerate(coco.THING_IDS)]
    parts = {
        "train": {1: annotations_image_1(), 2: [], 3: annotations_image_1()[:1]},
        "val": {139: annotations_image_1()[1:2]},
    }
    for part, images in parts.items():
        folder = coco.IMAGE_DIRS[part]
        data = {"images": [], "annotations": [], "categories": categories}
        for image_id, anns in images.items():
            name = f"{image_id:012d}.jpg"
            write_image(os.path.join(droot, folder, name), H, W, seed=image_id)
            data["images"].append({"id": image_id, "file_name": name, "height": H, "width": W})
            data["annotations"] += [{**a, "id": image_id * 100 + a["id"], "image_id": image_id}
                                    for a in anns]  # fmt: skip
        path = os.path.join(droot, coco.ANNOTATION_FILES[part])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f)
    return droot


def test_prepare_coco_and_records(tmp_path):
    droot = make_coco(str(tmp_path))
    argv = sys.argv
    sys.argv = ["prepare_coco.py", "--root", str(tmp_path), "--workers", "2"]
    try:
        runpy.run_path(os.path.join(REPO, "datasets", "prepare_coco.py"), run_name="__main__")
    finally:
        sys.argv = argv
    register_all(str(tmp_path))
    assert len(MetadataCatalog.get("coco_train").stuff_classes) == 81
    train = DatasetCatalog.get("coco_train")
    assert [r["image_id"] for r in train] == [f"{i:012d}" for i in (1, 2, 3)]
    assert all((r["height"], r["width"]) == (H, W) for r in train)
    np.testing.assert_array_equal(read_label(train[0]["sem_seg_file_name"]), expected_image_1())
    assert read_label(train[1]["sem_seg_file_name"]).max() == 0  # no annotations: background
    third = np.zeros((H, W), np.uint8)
    third[0:6, 0:8] = label_of(PERSON)
    np.testing.assert_array_equal(read_label(train[2]["sem_seg_file_name"]), third)
    (val,) = DatasetCatalog.get("coco_val")
    assert val["sem_seg_file_name"] == os.path.join(droot, "masks", "000000000139.png")
    assert read_label(val["sem_seg_file_name"]).sum() == 4 * label_of(DOG)


def test_existing_masks_are_kept_unless_overwrite(tmp_path):
    droot = make_coco(str(tmp_path))
    ann_file = os.path.join(droot, coco.ANNOTATION_FILES["val"])
    out = os.path.join(droot, "masks")
    assert coco.convert_instances(ann_file, out, workers=1) == {"written": 1, "kept": 0}
    assert coco.convert_instances(ann_file, out, workers=1) == {"written": 0, "kept": 1}
    counts = coco.convert_instances(ann_file, out, workers=1, overwrite=True)
    assert counts == {"written": 1, "kept": 0}
    missing = os.path.join(droot, "annotations", "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        coco.convert_instances(missing, out, workers=1)
