"""The dataset check (``python -m hiervl.data.check`` / ``train_net.py --check-data``): the
printed table against a hand count of the masks, check.png, and the exit status."""

import os
import re
import runpy
import sys

import numpy as np
import pytest
from dataset_trees import read_label, truncate, write_label, write_user_tree

from hiervl.data import check
from hiervl.data.check_sheet import COLUMNS, GAP, TILE
from hiervl.data.datasets.synthetic import CLASSES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "custom", "hiervl_custom_tiny.yaml")


def opts(root, *extra):
    return [
        "DATASETS.CUSTOM.ROOT", root,
        "DATASETS.CUSTOM.CLASSES_FILE", os.path.join(root, "classes.txt"),
        "OUTPUT_DIR", os.path.join(root, "out"),
        *extra,
    ]  # fmt: skip


@pytest.fixture()
def tree(tmp_path):
    root = write_user_tree(str(tmp_path / "mine"), labeled=5, unlabeled=6, val=3, size=40)
    # An ignore region in one mask, so the ignore share is not trivially zero.
    path = os.path.join(root, "labeled/masks/lab002.png")
    label = read_label(path).copy()
    label[:10, :] = 255
    write_label(path, label)
    return root


def hand_count(root):
    """Per-class pixels (last = ignore) and per-class image counts of the labelled masks."""
    folder = os.path.join(root, "labeled/masks")
    pixels = np.zeros(len(CLASSES) + 1, np.int64)
    images = np.zeros(len(CLASSES), np.int64)
    for name in sorted(os.listdir(folder)):
        mask = read_label(os.path.join(folder, name)).astype(np.int64)
        mask[mask == 255] = len(CLASSES)
        counts = np.bincount(mask.ravel(), minlength=len(CLASSES) + 1)
        pixels += counts
        images += counts[: len(CLASSES)] > 0
    return pixels, images


def test_table_matches_a_hand_count_and_the_picture_is_written(tree, capsys):
    status = check.main(["--config-file", CONFIG, *opts(tree)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"labelled\s+custom_train_labeled\s+5\s+40 x 40\s+.*labeled/images", out)
    assert re.search(r"unlabelled\s+custom_train_unlabeled\s+6\s+40 x 40", out)
    assert re.search(r"evaluation\s+custom_val\s+3\s+40 x 40", out)
    pixels, images = hand_count(tree)
    total = pixels.sum()
    assert f"labelled part (5 images, {total} pixels)" in out
    for k, name in enumerate(CLASSES):
        row = re.search(rf"\n\s+{k}\s+{name}\s+([\d.]+)%\s+(\d+)\n", out)
        assert row, name
        assert float(row.group(1)) == pytest.approx(100 * pixels[k] / total, abs=0.006)
        assert int(row.group(2)) == images[k]
    ignore = re.search(r"ignore \(255\)\s+([\d.]+)%", out)
    assert pixels[-1] > 0
    assert float(ignore.group(1)) == pytest.approx(100 * pixels[-1] / total, abs=0.006)
    never = [n for k, n in enumerate(CLASSES) if images[k] == 0]
    assert f"classes never in the labelled part: {', '.join(never) or 'none'}" in out
    assert "problems: none" in out
    import cv2

    picture = cv2.imread(os.path.join(tree, "out", "check.png"))
    assert picture.shape[1] == GAP + COLUMNS * (TILE + GAP)
    # Header, labelled rows (5 samples: 2 rows), val row, unlabelled rows: > 4 tile rows.
    assert picture.shape[0] > 4 * TILE


def test_problems_are_listed_by_file_and_exit_non_zero(tree, capsys):
    broken = os.path.join(tree, "unlabeled/images/phone/un002.jpg")
    truncate(broken)
    orphan = os.path.join(tree, "labeled/masks/orphan.png")
    write_label(orphan, np.zeros((40, 40), np.uint8))
    status = check.main(["--config-file", CONFIG, *opts(tree)])
    out = capsys.readouterr().out
    assert status == 1
    assert "PROBLEMS (2), training would stop:" in out
    assert f"cannot read image {broken}" in out and f"mask {orphan} has no image" in out
    assert "note:" not in out
    # The good files are still counted and drawn.
    assert re.search(r"unlabelled\s+custom_train_unlabeled\s+5\s", out)
    assert os.path.isfile(os.path.join(tree, "out", "check.png"))


def test_photos_in_both_parts_are_noted(tree, capsys):
    import shutil

    shutil.copy(
        os.path.join(tree, "labeled/images/lab001.jpg"), os.path.join(tree, "unlabeled/images")
    )
    assert check.main(["--config-file", CONFIG, *opts(tree)]) == 0
    out = capsys.readouterr().out
    assert (
        "note: 1 images have the same name in the labelled and the unlabelled part (lab001)" in out
    )


def test_missing_part_and_bad_class_file(tree, capsys):
    import shutil

    shutil.rmtree(os.path.join(tree, "val"))
    shutil.rmtree(os.path.join(tree, "unlabeled"))
    status = check.main(["--config-file", CONFIG, *opts(tree)])
    out = capsys.readouterr().out
    assert status == 1
    assert "unlabelled images not found: expected the folder" in out
    assert "note: custom dataset 'custom' has no val part" in out
    with open(os.path.join(tree, "classes.txt"), "a") as f:
        f.write("Circle \n")
    assert check.main(["--config-file", CONFIG, *opts(tree)]) == 1
    out = capsys.readouterr().out
    assert "dataset check:" in out and "#1 'circle' and #6 'Circle'" in out


def test_train_net_check_data(tree, monkeypatch, capsys):
    argv = ["train_net.py", "--config-file", CONFIG, "--check-data", *opts(tree)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        runpy.run_path(os.path.join(REPO, "train_net.py"), run_name="__main__")
    assert info.value.code == 0
    assert "problems: none" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(tree, "out", "check.png"))
