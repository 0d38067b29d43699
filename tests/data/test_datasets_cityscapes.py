"""Cityscapes: id -> trainId mapping, prepare_cityscapes (both methods), records."""

import importlib.machinery
import os
import runpy
import sys
import types

import numpy as np
import pytest
from dataset_trees import HEIGHT, WIDTH, read_label, write_image, write_label
from detectron2.data import DatasetCatalog, MetadataCatalog

from hiervl.data.datasets import cityscapes, register_all

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAMES = {"train": [("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")],
          "val": [("frankfurt", "frankfurt_000000_000294")]}  # fmt: skip
# Official label ids -> trainIds (cityscapesscripts' labels.py): a few of each kind.
KNOWN = {7: 0, 8: 1, 11: 2, 21: 8, 23: 10, 24: 11, 26: 13, 31: 16, 33: 18,
         0: 255, 1: 255, 6: 255, 9: 255, 10: 255, 14: 255, 29: 255, 30: 255}  # fmt: skip


def label_ids(seed):
    ids = np.array(sorted(KNOWN), dtype=np.uint8)
    return np.random.default_rng(seed).choice(ids, (HEIGHT, WIDTH))


def make_cityscapes(root):
    droot = os.path.join(root, "cityscapes")
    for part, frames in FRAMES.items():
        for k, (city, frame) in enumerate(frames):
            write_image(os.path.join(droot, "leftImg8bit", part, city, frame + "_leftImg8bit.png"))
            path = os.path.join(droot, "gtFine", part, city, frame + "_gtFine_labelIds.png")
            write_label(path, label_ids(k))
    return droot


def test_mapping_table():
    assert len(cityscapes.CLASSES) == 19
    assert cityscapes.CLASSES[0] == "road" and cityscapes.CLASSES[18] == "bicycle"
    ids = np.array(list(KNOWN), dtype=np.uint8)
    np.testing.assert_array_equal(cityscapes.label_ids_to_train_ids(ids), list(KNOWN.values()))
    assert (cityscapes.ID_TO_TRAIN_ID != 255).sum() == 19


def test_prepare_with_label_ids_and_records(tmp_path):
    droot = make_cityscapes(str(tmp_path))
    argv = sys.argv
    sys.argv = ["prepare_cityscapes.py", "--root", str(tmp_path), "--method", "labelids"]
    try:
        runpy.run_path(os.path.join(REPO, "datasets", "prepare_cityscapes.py"), run_name="__main__")
    finally:
        sys.argv = argv
    register_all(str(tmp_path))
    assert len(MetadataCatalog.get("cityscapes_train").stuff_classes) == 19
    train = DatasetCatalog.get("cityscapes_train")
    assert [r["image_id"] for r in train] == [f for _, f in FRAMES["train"]]
    for k, record in enumerate(train):
        city, frame = FRAMES["train"][k]
        assert record["sem_seg_file_name"] == os.path.join(
            droot, "gtFine", "train", city, frame + "_gtFine_labelTrainIds.png"
        )
        expected = np.vectorize(KNOWN.get)(label_ids(k))
        np.testing.assert_array_equal(read_label(record["sem_seg_file_name"]), expected)
        assert (record["height"], record["width"]) == (HEIGHT, WIDTH)
    assert len(DatasetCatalog.get("cityscapes_val")) == 1


def test_auto_uses_cityscapesscripts_when_installed(tmp_path, monkeypatch):
    droot = make_cityscapes(str(tmp_path))
    seen = {}

    def fake_main():
        seen["dataset"] = os.environ["CITYSCAPES_DATASET"]

    modules = {}
    for name in ("cityscapesscripts", "cityscapesscripts.preparation",
                 "cityscapesscripts.preparation.createTrainIdLabelImgs"):  # fmt: skip
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        modules[name] = module
        monkeypatch.setitem(sys.modules, name, module)
    modules["cityscapesscripts.preparation.createTrainIdLabelImgs"].main = fake_main
    modules["cityscapesscripts.preparation"].createTrainIdLabelImgs = modules[
        "cityscapesscripts.preparation.createTrainIdLabelImgs"
    ]
    # Set (then restored) so that the variable the code sets does not outlive the test.
    monkeypatch.setenv("CITYSCAPES_DATASET", "placeholder")
    counts = cityscapes.create_train_ids(droot, method="auto", workers=1)
    assert seen == {"dataset": droot} and counts["written"] == -1


def test_without_cityscapesscripts(tmp_path, monkeypatch, caplog):
    if cityscapes.has_cityscapesscripts():
        pytest.skip("cityscapesscripts is installed here")
    droot = make_cityscapes(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="pip install cityscapesscripts"):
        cityscapes.create_train_ids(droot, method="cityscapesscripts", workers=1)
    counts = cityscapes.create_train_ids(droot, method="auto", workers=1)
    assert counts == {"written": 3, "kept": 0}
    assert "pip install cityscapesscripts" in caplog.text
    empty = tmp_path / "empty" / "cityscapes" / "gtFine"
    empty.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="pip install cityscapesscripts"):
        cityscapes.create_train_ids(str(empty.parent), method="auto", workers=1)
