"""register_all: names, metadata, laziness, idempotence, missing-dataset errors."""

import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from hiervl.data.datasets import BENCHMARKS, DatasetNotFoundError, default_root, register_all

EXPECTED_COUNTS = {
    "voc": (92, 183, 366, 732, 1464),
    "coco": (232, 463, 925, 1849, 3697),
    "ade20k": (158, 316, 632, 1263, 2526),
    "cityscapes": (100, 186, 372, 744, 1488),
}
NUM_CLASSES = {"voc": 21, "coco": 81, "ade20k": 150, "cityscapes": 19}
TRAIN_NAMES = {"voc": "voc_train_aug", "coco": "coco_train", "ade20k": "ade20k_train",
               "cityscapes": "cityscapes_train"}  # fmt: skip


def test_names_and_metadata(tmp_path):
    root = str(tmp_path / "data")
    names = register_all(root)
    for key, counts in EXPECTED_COUNTS.items():
        expected = {TRAIN_NAMES[key], f"{key}_val"}
        expected |= {f"{key}_train_{kind}_{n}" for n in counts for kind in ("labeled", "unlabeled")}
        assert expected <= set(names)
        for name in expected:
            meta = MetadataCatalog.get(name)
            assert len(meta.stuff_classes) == NUM_CLASSES[key]
            assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
            assert meta.dataset_root == os.path.join(root, BENCHMARKS[key].dir_name)
            assert meta.image_root.startswith(meta.dataset_root)
            assert meta.sem_seg_root.startswith(meta.dataset_root)
    assert "synthetic_train" in names
    assert MetadataCatalog.get("coco_val").stuff_classes[:2] == ["background", "person"]
    assert MetadataCatalog.get("cityscapes_val").stuff_classes[0] == "road"
    assert MetadataCatalog.get("voc_val").stuff_classes[0] == "background"
    assert MetadataCatalog.get("voc_train_labeled_92").labeled_count == 92
    # Lazy: registering read and wrote nothing.
    assert not os.path.exists(root)


def test_register_twice_and_new_root(tmp_path):
    first = register_all(str(tmp_path / "a"))
    second = register_all(str(tmp_path / "b"))
    assert first == second and len(set(first)) == len(first)
    assert MetadataCatalog.get("ade20k_val").dataset_root.startswith(str(tmp_path / "b"))


def test_default_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    assert default_root() == str(tmp_path)
    register_all()
    assert MetadataCatalog.get("coco_train").dataset_root == str(tmp_path / "coco")
    monkeypatch.delenv("DETECTRON2_DATASETS")
    assert default_root() == "datasets"


@pytest.mark.parametrize("key", sorted(EXPECTED_COUNTS))
def test_missing_dataset_names_path_and_script(tmp_path, key):
    register_all(str(tmp_path))
    bench = BENCHMARKS[key]
    expected_path = os.path.join(str(tmp_path), bench.dir_name)
    for name in (TRAIN_NAMES[key], f"{key}_val", f"{key}_train_unlabeled_{bench.label_counts[0]}"):
        with pytest.raises(DatasetNotFoundError) as info:
            DatasetCatalog.get(name)
        assert expected_path in str(info.value)
        assert f"datasets/{bench.prepare_script}" in str(info.value)
