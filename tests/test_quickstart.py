"""``make quickstart`` (``python -m hiervl.quickstart``): the majority-class baseline by hand,
and a short end-to-end run (2 iterations of each training) checking what it writes."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog

from hiervl import quickstart
from hiervl.engine.launcher import setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _register(name, label_maps, folder):
    records = []
    for i, labels in enumerate(label_maps):
        path = os.path.join(folder, f"{name}_{i}.png")
        cv2.imwrite(path, np.asarray(labels, dtype=np.uint8))
        records.append({"file_name": path, "sem_seg_file_name": path})
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c", "d"])


def test_majority_baseline_by_hand(tmp_path):
    # Labelled set: class 1 has 5 pixels, class 0 has 3, class 2 has 1 (255 ignored).
    _register("qs_lab", [[[1, 1, 0], [255, 0, 2]], [[1, 1, 1], [0, 255, 255]]], tmp_path)
    # Validation: 10 valid pixels; class 1 covers 4; classes 0 and 2 present; 3 absent.
    _register(
        "qs_val", [[[1, 1, 0, 0, 255]], [[2, 1, 0, 2, 1]], [[0, 255, 255, 255, 255]]], tmp_path
    )
    base = quickstart.majority_baseline("qs_lab", "qs_val", num_classes=4)
    assert base["majority_class"] == "b"
    # IoU(b) = 4 / 10 (predicted everywhere valid, 4 true); IoU(a) = IoU(c) = 0; d absent.
    assert base["mIoU"] == pytest.approx(100 * (0.4 + 0 + 0) / 3)
    assert base["pACC"] == pytest.approx(40.0)


def test_seed_option_picks_the_split_seed():
    cfg = setup_cfg(os.path.join(REPO, quickstart.DEFAULT_CONFIG), [])
    assert quickstart.seed_opts(cfg, 0) == ["SEED", "0"]
    opts = quickstart.seed_opts(cfg, 3)
    assert opts[:2] == ["SEED", "3"]
    merged = setup_cfg(os.path.join(REPO, quickstart.DEFAULT_CONFIG), opts)
    assert merged.DATASETS.TRAIN_LABELED == ("synthetic_hard_train_labeled_8_split3",)
    assert merged.DATASETS.TRAIN_UNLABELED == ("synthetic_hard_train_unlabeled_8_split3",)
    other = setup_cfg(os.path.join(REPO, "configs", "tiny", "hiervl_tiny_16.yaml"), [])
    with pytest.raises(ValueError, match="no split-seed-3 version"):
        quickstart.seed_opts(other, 3)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path, monkeypatch):
    root = os.path.abspath(os.environ.get("DETECTRON2_DATASETS", os.path.join(REPO, "datasets")))
    monkeypatch.setenv("DETECTRON2_DATASETS", root)
    monkeypatch.chdir(REPO)
    out = tmp_path / "qs"
    tiny_clip = ["--clip-steps", "3", "--clip-batch", "8", "--clip-images", "16"]
    fast = ["DATALOADER.NUM_WORKERS", "0", "MODEL.HIERVL.LOSS.TRAIN_NUM_POINTS", "256"]
    metrics = quickstart.main(["--output-dir", str(out), "--iters", "2", *tiny_clip, *fast])

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["iterations"] == 2 and on_disk["seed"] == 0
    assert on_disk["labeled_dataset"] == "synthetic_hard_train_labeled_8"
    assert on_disk["machine"]["torch"] == torch.__version__
    assert on_disk["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert on_disk["machine"]["train_threads"] == quickstart.TRAIN_THREADS
    for run in ("semi_supervised", "labeled_only"):
        assert 0.0 <= on_disk[run]["mIoU"] <= 100.0
        assert (out / run / "model_final.pth").is_file()
    # Both runs start from the CLIP pretrained (and cached) under the output folder, with
    # every component of the paper on; they differ only in the semi-supervised losses.
    checkpoint = on_disk["clip"]["checkpoint"]
    assert checkpoint.startswith(str(out / "clip")) and os.path.isfile(checkpoint)
    semi_cfg = yaml.safe_load((out / "semi_supervised" / "config.yaml").read_text())
    sup_cfg = yaml.safe_load((out / "labeled_only" / "config.yaml").read_text())
    h = semi_cfg["MODEL"]["HIERVL"]
    assert h["CLIP"]["PRETRAINED"] == checkpoint
    assert h["HSQG"]["ENABLED"] and h["CMSAM"]["ENABLED"] and h["DECODER"]["NUM_VISUAL_QUERIES"] > 0
    # The entropy term is not in the paper (off by default since issue 12b).
    assert h["SSL"]["MASKCLIP_ENABLED"] and not h["SSL"]["ENTROPY_ENABLED"]
    assert h["VL"]["PROMPT_ENABLED"] and h["VL"]["MASK_ENABLED"] and h["VL"]["PT_ENABLED"]
    assert h["LOSS"]["REL_WEIGHT"] > 0 and h["LOSS"]["QT_WEIGHT"] > 0
    assert h["SSL"]["ENABLED"] is True
    assert sup_cfg["MODEL"]["HIERVL"]["SSL"]["ENABLED"] is False
    for cfg in (semi_cfg, sup_cfg):
        cfg["MODEL"]["HIERVL"]["SSL"]["ENABLED"] = None
        cfg["OUTPUT_DIR"] = None
    assert semi_cfg == sup_cfg
    assert (out / "labeled_only.log").read_text().strip(), "the second process logs to a file"
    picture = cv2.imread(str(out / "demo.png"))
    # 4 validation images of 64 px scaled x6, three panels side by side, a 32 px header.
    assert picture.shape == (32 + 4 * 384, 3 * 384, 3)
