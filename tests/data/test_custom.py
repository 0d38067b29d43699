"""Custom datasets, single-folder layout (benchmark replication): registration from the
config / CLI opts, split files and fractions, nested trees, validation."""

import os
import re

import numpy as np
import pytest
from dataset_trees import HEIGHT, WIDTH, write_image, write_label
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from hiervl.config import add_hiervl_config
from hiervl.data.datasets import custom

CLASSES = ["background", "cell", "nucleus"]
STEMS = [f"img{i:02d}" for i in range(20)]


def make_folder(root, stems=STEMS):
    for k, stem in enumerate(stems):
        write_image(os.path.join(root, "images", stem + ".jpg"), seed=k)
        label = np.full((HEIGHT, WIDTH), k % len(CLASSES), dtype=np.uint8)
        label[0, 0] = 255
        write_label(os.path.join(root, "masks", stem + ".png"), label)
    return root


def cfg_for(root, *opts):
    cfg = add_hiervl_config(get_cfg())
    cfg.merge_from_list(
        [
            "DATASETS.CUSTOM.NAME",
            "mycells",
            "DATASETS.CUSTOM.LAYOUT",
            "single_folder",
            "DATASETS.CUSTOM.ROOT",
            str(root),
            "DATASETS.CUSTOM.CLASSES",
            CLASSES,
            *opts,
        ]
    )
    return cfg


def ids(name):
    return [r["image_id"] for r in DatasetCatalog.get(name)]


def test_register_from_cli_opts_with_fractions(tmp_path):
    make_folder(str(tmp_path))
    opts = ["DATASETS.CUSTOM.LABELED_FRACTION", 0.25, "DATASETS.CUSTOM.VAL_FRACTION", 0.2]
    names = custom.register_custom_from_cfg(cfg_for(tmp_path, *opts))
    assert names == [
        "mycells_train",
        "mycells_train_labeled",
        "mycells_train_unlabeled",
        "mycells_val",
    ]
    meta = MetadataCatalog.get("mycells_val")
    assert meta.stuff_classes == CLASSES and meta.ignore_label == 255
    assert meta.evaluator_type == "sem_seg" and meta.sem_seg_root == str(tmp_path / "masks")
    val, train = ids("mycells_val"), ids("mycells_train")
    labeled, unlabeled = ids("mycells_train_labeled"), ids("mycells_train_unlabeled")
    assert len(val) == 4 and len(train) == 16 and len(labeled) == 4 and len(unlabeled) == 12
    assert sorted(val + train) == STEMS and sorted(labeled + unlabeled) == train
    assert not set(val) & set(train)
    records = DatasetCatalog.get("mycells_train_unlabeled")
    assert all("sem_seg_file_name" not in r for r in records)
    record = DatasetCatalog.get("mycells_train_labeled")[0]
    assert record["sem_seg_file_name"] == str(tmp_path / "masks" / f"{record['image_id']}.png")
    assert (record["height"], record["width"]) == (HEIGHT, WIDTH)
    # Same seed, same parts; another seed, other parts.
    custom.register_custom_from_cfg(cfg_for(tmp_path, *opts))
    assert ids("mycells_train_labeled") == labeled
    custom.register_custom_from_cfg(cfg_for(tmp_path, *opts, "DATASETS.CUSTOM.SEED", 5))
    assert ids("mycells_train_labeled") != labeled


def test_split_files_and_class_file(tmp_path):
    make_folder(str(tmp_path))
    (tmp_path / "classes.txt").write_text("# names\nbackground\ncell\n\nnucleus\n")
    (tmp_path / "val.txt").write_text("img00\nimages/img01.jpg masks/img01.png\n")
    (tmp_path / "labeled.txt").write_text("img05\nimg07.jpg")
    cfg = add_hiervl_config(get_cfg())
    cfg.merge_from_list(
        [
            "DATASETS.CUSTOM.NAME",
            "c2",
            "DATASETS.CUSTOM.LAYOUT",
            "single_folder",
            "DATASETS.CUSTOM.ROOT",
            str(tmp_path),
            "DATASETS.CUSTOM.CLASSES_FILE",
            "classes.txt",
            "DATASETS.CUSTOM.VAL_SPLIT",
            "val.txt",
            "DATASETS.CUSTOM.LABELED_SPLIT",
            str(tmp_path / "labeled.txt"),
        ]
    )
    custom.register_custom_from_cfg(cfg)
    assert MetadataCatalog.get("c2_train").stuff_classes == CLASSES
    assert ids("c2_val") == ["img00", "img01"]
    assert ids("c2_train_labeled") == ["img05", "img07"]
    assert len(ids("c2_train_unlabeled")) == 16


def test_no_custom_dataset_is_a_no_op():
    assert custom.register_custom_from_cfg(add_hiervl_config(get_cfg())) == []


@pytest.mark.parametrize(
    "opts, message",
    [
        (["DATASETS.CUSTOM.ROOT", ""], "DATASETS.CUSTOM.ROOT is empty"),
        (["DATASETS.CUSTOM.CLASSES_FILE", "c.txt"], "exactly one of"),
        (["DATASETS.CUSTOM.CLASSES", ["a", "a"]], "same text query"),
        (["DATASETS.CUSTOM.CLASSES", ["Cell", "cell "]], r"#0 'Cell' and #1 'cell '"),
        (["DATASETS.CUSTOM.CLASSES", [f"c{i}" for i in range(256)]], "at most 255 classes"),
        (["DATASETS.CUSTOM.LAYOUT", "flat"], "LAYOUT 'flat' must be one of"),
        (["DATASETS.CUSTOM.LABELED_FRACTION", 0.0], "LABELED_FRACTION 0.0"),
        (["DATASETS.CUSTOM.VAL_FRACTION", 1.0], "VAL_FRACTION 1.0"),
        (["DATASETS.CUSTOM.NAME", "my cells"], "whitespace"),
    ],
)
def test_bad_config(tmp_path, opts, message):
    with pytest.raises(ValueError, match=message):
        custom.register_custom_from_cfg(cfg_for(tmp_path, *opts))


def test_missing_class_file(tmp_path):
    cfg = add_hiervl_config(get_cfg())
    cfg.merge_from_list(
        [
            "DATASETS.CUSTOM.NAME",
            "c",
            "DATASETS.CUSTOM.ROOT",
            str(tmp_path),
            "DATASETS.CUSTOM.CLASSES_FILE",
            "nope.txt",
        ]
    )
    with pytest.raises(ValueError, match=f"{tmp_path / 'nope.txt'} does not exist"):
        custom.register_custom_from_cfg(cfg)


def break_folder(root, problem):
    """Introduce one problem into a valid folder; returns the file the error must name."""
    if problem == "unreadable image":
        path = os.path.join(root, "images", "img03.jpg")
        with open(path, "wb") as f:
            f.write(b"not a jpeg")
    elif problem == "no mask":
        path = os.path.join(root, "masks", "img04.png")
        os.remove(path)
    elif problem == "mask size":
        path = os.path.join(root, "masks", "img05.png")
        write_label(path, np.zeros((HEIGHT + 1, WIDTH), dtype=np.uint8))
    elif problem == "label value":
        path = os.path.join(root, "masks", "img06.png")
        label = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        label[1, 1], label[2, 2], label[3, 3] = 3, 254, 255  # 3 and 254 >= K=3; 255 is fine
        write_label(path, label)
    elif problem == "rgb mask":
        path = os.path.join(root, "masks", "img07.png")
        write_image(path)
    return path


@pytest.mark.parametrize(
    "problem, message",
    [
        ("unreadable image", "cannot read image .*: not an image"),
        ("no mask", "has no mask"),
        ("mask size", f"is {WIDTH}x{HEIGHT} .* but its mask .* is {WIDTH}x{HEIGHT + 1}"),
        ("label value", r"has values \[3, 254\] but DATASETS.CUSTOM.CLASSES lists K=3"),
        ("rgb mask", "single-channel"),
    ],
)
def test_bad_folder(tmp_path, problem, message):
    make_folder(str(tmp_path))
    path = break_folder(str(tmp_path), problem)
    custom.register_custom_from_cfg(cfg_for(tmp_path))
    # Each part is validated when loaded: the broken file is in exactly one of the two.
    errors = []
    for part in ("train", "val"):
        try:
            DatasetCatalog.get(f"mycells_{part}")
        except ValueError as e:
            errors.append(str(e))
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    named = path if problem != "no mask" else os.path.join(str(tmp_path), "images", "img04.jpg")
    assert named in errors[0]


def test_bad_split_files(tmp_path):
    make_folder(str(tmp_path))
    (tmp_path / "val.txt").write_text("img00\nimg99\n")
    custom.register_custom_from_cfg(cfg_for(tmp_path, "DATASETS.CUSTOM.VAL_SPLIT", "val.txt"))
    with pytest.raises(ValueError, match=r"val.txt: 1 entries name no image.*img99"):
        DatasetCatalog.get("mycells_val")
    (tmp_path / "val.txt").write_text("img00\n")
    (tmp_path / "lab.txt").write_text("img00\nimg01\n")
    custom.register_custom_from_cfg(
        cfg_for(
            tmp_path,
            "DATASETS.CUSTOM.VAL_SPLIT",
            "val.txt",
            "DATASETS.CUSTOM.LABELED_SPLIT",
            "lab.txt",
        )
    )
    with pytest.raises(ValueError, match=r"lab.txt: images also in the val part: \['img00'\]"):
        DatasetCatalog.get("mycells_train_labeled")


def test_nested_train_val_tree_with_split_files(tmp_path):
    """An existing images/{train,val} + masks/{train,val} tree works as it is, no
    flattening: ids are the paths below images/, masks mirror them."""
    for split, stems in (("train", STEMS[:6]), ("val", STEMS[6:8])):
        for k, stem in enumerate(stems):
            write_image(str(tmp_path / "images" / split / f"{stem}.jpg"), seed=k)
            write_label(
                str(tmp_path / "masks" / split / f"{stem}.png"),
                np.full((HEIGHT, WIDTH), k % 3, np.uint8),
            )
    (tmp_path / "labeled.txt").write_text(
        "train/img00\nimages/train/img01.jpg masks/train/img01.png\nimg02\n"
    )
    (tmp_path / "val.txt").write_text(f"{tmp_path}/images/val/img06.jpg\nval/img07.jpg\n")
    opts = ["DATASETS.CUSTOM.LABELED_SPLIT", "labeled.txt", "DATASETS.CUSTOM.VAL_SPLIT", "val.txt"]
    custom.register_custom_from_cfg(cfg_for(tmp_path, *opts))
    assert ids("mycells_train_labeled") == ["train/img00", "train/img01", "train/img02"]
    assert ids("mycells_train_unlabeled") == ["train/img03", "train/img04", "train/img05"]
    assert ids("mycells_val") == ["val/img06", "val/img07"]
    record = DatasetCatalog.get("mycells_val")[1]
    assert record["file_name"] == str(tmp_path / "images" / "val" / "img07.jpg")
    assert record["sem_seg_file_name"] == str(tmp_path / "masks" / "val" / "img07.png")
    # A bare stem that two sub-folders share is ambiguous: refused, naming the file.
    write_image(str(tmp_path / "images" / "val" / "img02.jpg"))
    write_label(str(tmp_path / "masks" / "val" / "img02.png"), np.zeros((HEIGHT, WIDTH), np.uint8))
    custom.register_custom_from_cfg(cfg_for(tmp_path, *opts))
    with pytest.raises(ValueError, match=r"labeled.txt: 1 entries name no image.*'img02'"):
        DatasetCatalog.get("mycells_train_labeled")
