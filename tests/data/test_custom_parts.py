"""Custom datasets in the user's layout ("parts"): labelled images + masks, unlabelled
images alone in nested folders, an optional val part; each error a message naming files."""

import os

import numpy as np
import pytest
from dataset_trees import truncate, write_label, write_photo, write_user_tree
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from hiervl.config import add_hiervl_config
from hiervl.data.datasets import custom
from hiervl.data.datasets.common import DatasetNotFoundError
from hiervl.data.datasets.palettes import generated_palette
from hiervl.data.datasets.synthetic import CLASSES


def cfg_for(root, *opts):
    cfg = add_hiervl_config(get_cfg())
    cfg.merge_from_list(
        [
            "DATASETS.CUSTOM.NAME",
            "mine",
            "DATASETS.CUSTOM.ROOT",
            str(root),
            "DATASETS.CUSTOM.CLASSES_FILE",
            "classes.txt",
            *opts,
        ]
    )
    return cfg


@pytest.fixture()
def tree(tmp_path):
    return write_user_tree(str(tmp_path), labeled=3, unlabeled=4, val=2, size=32)


def load(name):
    return DatasetCatalog.get(name)


def test_parts_layout_as_the_user_has_it(tree):
    names = custom.register_custom_from_cfg(cfg_for(tree))
    assert names == ["mine_train", "mine_train_labeled", "mine_train_unlabeled", "mine_val"]
    labeled, unlabeled, val = (
        load("mine_train_labeled"),
        load("mine_train_unlabeled"),
        load("mine_val"),
    )
    assert [r["image_id"] for r in labeled] == ["lab000", "lab001", "lab002"]
    assert labeled[0]["sem_seg_file_name"] == os.path.join(tree, "labeled/masks/lab000.png")
    assert (labeled[0]["height"], labeled[0]["width"]) == (32, 32)
    # Nested folders, both extensions, and no label key at all in the unlabelled records.
    assert [r["image_id"] for r in unlabeled] == [
        "camera/un001",
        "camera/un003",
        "phone/un000",
        "phone/un002",
    ]
    assert unlabeled[0]["file_name"].endswith("unlabeled/images/camera/un001.jpeg")
    assert all("sem_seg_file_name" not in r for r in unlabeled)
    assert [r["image_id"] for r in val] == ["val000", "val001"]
    meta = MetadataCatalog.get("mine_train_labeled")
    assert meta.stuff_classes == list(CLASSES) and meta.ignore_label == 255
    assert meta.stuff_colors == generated_palette(len(CLASSES))
    assert meta.image_root == os.path.join(tree, "labeled/images")
    assert load("mine_train") == labeled


def test_absolute_part_folders_without_root(tree, tmp_path):
    cfg = add_hiervl_config(get_cfg())
    cfg.merge_from_list(
        [
            "DATASETS.CUSTOM.NAME", "abs",
            "DATASETS.CUSTOM.CLASSES_FILE", os.path.join(tree, "classes.txt"),
            "DATASETS.CUSTOM.LABELED.IMAGES", os.path.join(tree, "labeled/images"),
            "DATASETS.CUSTOM.LABELED.MASKS", os.path.join(tree, "labeled/masks"),
            "DATASETS.CUSTOM.UNLABELED.IMAGES", os.path.join(tree, "unlabeled/images/phone"),
            "DATASETS.CUSTOM.VAL.IMAGES", "",
        ]
    )  # fmt: skip
    custom.register_custom_from_cfg(cfg)
    assert len(load("abs_train_labeled")) == 3 and len(load("abs_train_unlabeled")) == 2
    assert not custom.has_val(custom.spec_from_cfg(cfg))


def test_no_val_part_means_no_periodic_evaluation(tree):
    import shutil

    shutil.rmtree(os.path.join(tree, "val"))
    cfg = cfg_for(tree, "DATASETS.TEST", "('mine_val', 'other_val')")
    custom.register_custom_from_cfg(cfg)
    message = custom.drop_absent_val(cfg)
    assert cfg.DATASETS.TEST == ("other_val",)
    assert "has no val part" in message and os.path.join(tree, "val/images") in message
    assert custom.drop_absent_val(cfg) is None  # said once
    with pytest.raises(DatasetNotFoundError, match="has no val part"):
        load("mine_val")
    # With the folder, nothing changes.
    write_user_tree(tree, labeled=1, unlabeled=1, val=1, size=32)
    cfg = cfg_for(tree, "DATASETS.TEST", "('mine_val',)")
    assert custom.drop_absent_val(cfg) is None and cfg.DATASETS.TEST == ("mine_val",)


def break_tree(root, problem):
    """One of the issue's error cases; returns (dataset loaded, expected message, files)."""
    if problem == "part missing":
        import shutil

        shutil.rmtree(os.path.join(root, "unlabeled"))
        folder = os.path.join(root, "unlabeled/images")
        return "mine_train_unlabeled", "unlabelled images not found", [folder, "UNLABELED.IMAGES"]
    if problem == "masks folder missing":
        import shutil

        shutil.rmtree(os.path.join(root, "labeled/masks"))
        folder = os.path.join(root, "labeled/masks")
        return "mine_train_labeled", "labelled masks not found", [folder, "LABELED.MASKS"]
    if problem == "corrupt unlabelled image":
        path = os.path.join(root, "unlabeled/images/camera/un003.jpeg")
        truncate(path)
        return "mine_train_unlabeled", "cannot read image", [path]
    if problem == "mask without image":
        path = os.path.join(root, "labeled/masks/extra.png")
        write_label(path, np.zeros((32, 32), np.uint8))
        return "mine_train_labeled", "has no image", [path]
    if problem == "class count":
        path = os.path.join(root, "labeled/masks/lab001.png")
        label = np.zeros((32, 32), np.uint8)
        label[0, :3] = (6, 7, 255)  # K = 6: 6 and 7 are no class, 255 is ignore
        write_label(path, label)
        message = r"has values \[6, 7\] but .*classes.txt lists K=6 classes \(values 0..5"
        return "mine_train_labeled", message, [path, os.path.join(root, "classes.txt")]
    assert problem == "corrupt val image"
    path = os.path.join(root, "val/images/val001.jpg")
    truncate(path)
    return "mine_val", "cannot read image", [path]


PROBLEMS = [
    "part missing",
    "masks folder missing",
    "corrupt unlabelled image",
    "mask without image",
    "class count",
    "corrupt val image",
]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_each_error_names_its_files(tree, problem):
    name, message, named = break_tree(tree, problem)
    custom.register_custom_from_cfg(cfg_for(tree))
    with pytest.raises((ValueError, DatasetNotFoundError), match=message) as info:
        load(name)
    assert all(text in str(info.value) for text in named), str(info.value)


def test_phone_photo_with_exif_orientation_6_against_its_mask(tmp_path):
    """Stored 48x32 with orientation 6: displayed (and trained on) 32 wide, 48 high. A mask
    drawn on the stored pixels is refused, naming both files; one of the displayed size
    is accepted, in the labelled and in the val part alike."""
    root = write_user_tree(str(tmp_path), labeled=1, unlabeled=1, val=1, size=32)
    photo = os.path.join(root, "labeled/images/phone.jpg")
    mask = os.path.join(root, "labeled/masks/phone.png")
    write_photo(photo, width=48, height=32, orientation=6)
    write_label(mask, np.zeros((32, 48), np.uint8))
    custom.register_custom_from_cfg(cfg_for(root))
    with pytest.raises(ValueError) as info:
        load("mine_train_labeled")
    text = str(info.value)
    assert f"image {photo} is 32x48" in text and f"mask {mask} is 48x32" in text
    assert "before its EXIF orientation 6" in text
    write_label(mask, np.zeros((48, 32), np.uint8))
    custom.register_custom_from_cfg(cfg_for(root))
    record = [r for r in load("mine_train_labeled") if r["image_id"] == "phone"][0]
    assert (record["height"], record["width"]) == (48, 32)
    # Unlabelled photos get the oriented size too (the mappers read them oriented).
    write_photo(os.path.join(root, "unlabeled/images/p.jpg"), 48, 32, orientation=8)
    record = [r for r in load("mine_train_unlabeled") if r["image_id"] == "p"][0]
    assert (record["height"], record["width"]) == (48, 32)


def test_flat_single_folder_tree_gets_a_hint(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "classes.txt").write_text("a\nb\n")
    custom.register_custom_from_cfg(cfg_for(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="set DATASETS.CUSTOM.LAYOUT single_folder"):
        load("mine_train_labeled")
