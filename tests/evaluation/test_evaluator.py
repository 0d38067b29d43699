"""The evaluator HierVL uses (``HierVLTrainer.build_evaluator``: detectron2's
``SemSegEvaluator``) on crafted predictions over a tiny custom-folder dataset: mIoU, fwIoU,
pixel accuracy and per-class IoU against hand computations.

detectron2's conventions, which these tests pin down:
- pixels labelled 255 (the metadata's ``ignore_label``) are dropped, whatever is predicted
  there;
- a class with no ground-truth pixel in the evaluated set has IoU (and accuracy) NaN and is
  left out of mIoU, fwIoU and mACC — whether or not it is predicted. Predicting it is not
  free: those pixels are false negatives of the ground-truth class they fall on. (Some
  codebases instead count such a predicted-only class as IoU 0 in the mean.)
- metrics are percentages.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from torch import nn

from hiervl.config import add_hiervl_config
from hiervl.data.datasets.custom import register_custom_from_cfg
from hiervl.engine.trainer import HierVLTrainer

IGNORE = 255
NAME = "evaltest"
VAL = f"{NAME}_val"

# Hand-worked example: 4 classes, one 2x4 image and one image that is all ignore.
CLASSES = ["sky", "road", "car", "boat"]
GT_A = np.array([[0, 0, 1, 1], [0, IGNORE, 1, 2]])
PRED_A = np.array([[0, 1, 1, 1], [0, 0, 2, 2]])
GT_B = np.full((3, 2), IGNORE)
PRED_B = np.array([[3, 3], [2, 1], [0, 3]])
# The 7 valid (gt, pred) pixels of A: (0,0) (0,1) (1,1) (1,1) (0,0) (1,2) (2,2).
#   sky:  gt 3, pred 2, tp 2 -> IoU 2/(3+2-2) = 2/3, acc 2/3
#   road: gt 3, pred 3, tp 2 -> IoU 2/(3+3-2) = 1/2, acc 2/3
#   car:  gt 1, pred 2, tp 1 -> IoU 1/(1+2-1) = 1/2, acc 1
#   boat: absent (its predictions in B fall on ignore pixels) -> NaN
EXPECTED_A = {
    "IoU": [2 / 3, 1 / 2, 1 / 2, math.nan],
    "ACC": [2 / 3, 2 / 3, 1.0, math.nan],
    "mIoU": (2 / 3 + 1 / 2 + 1 / 2) / 3,  # 5/9
    "fwIoU": 3 / 7 * 2 / 3 + 3 / 7 * 1 / 2 + 1 / 7 * 1 / 2,  # 4/7
    "mACC": (2 / 3 + 2 / 3 + 1) / 3,  # 7/9
    "pACC": 5 / 7,
}


def write_dataset(root, labels, classes):
    """Custom-folder tree (``images/``, ``masks/``, ``val.txt``) with ``labels`` as the
    val part plus one train image, registered from the config; returns the config."""
    stems = list(labels) + ["train0"]
    labels = {**labels, "train0": np.zeros((2, 2), dtype=np.uint8)}
    rng = np.random.default_rng(0)
    for stem in stems:
        os.makedirs(root / "images", exist_ok=True)
        os.makedirs(root / "masks", exist_ok=True)
        label = np.asarray(labels[stem], dtype=np.uint8)
        pixels = rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{stem}.png")
        Image.fromarray(label).save(root / "masks" / f"{stem}.png")
    (root / "val.txt").write_text("\n".join(s for s in stems if s != "train0") + "\n")
    cfg = add_hiervl_config(get_cfg())
    cfg.merge_from_list(
        ["DATASETS.CUSTOM.NAME", NAME, "DATASETS.CUSTOM.ROOT", str(root)]
        + ["DATASETS.CUSTOM.LAYOUT", "single_folder"]  # one folder, parts from val.txt
        + ["DATASETS.CUSTOM.CLASSES", list(classes), "DATASETS.CUSTOM.VAL_SPLIT", "val.txt"]
        + ["DATASETS.TEST", (VAL,), "OUTPUT_DIR", str(root / "output")]
        + ["DATALOADER.NUM_WORKERS", 0]
    )
    register_custom_from_cfg(cfg)
    return cfg


@pytest.fixture
def registered():
    """Removes the test dataset's registrations afterwards."""
    yield
    for part in ("train", "train_labeled", "train_unlabeled", "val"):
        if f"{NAME}_{part}" in DatasetCatalog.list():
            DatasetCatalog.remove(f"{NAME}_{part}")
            MetadataCatalog.remove(f"{NAME}_{part}")


def scores_for(pred, num_classes, seed=0):
    """(K, H, W) scores whose argmax over K is ``pred``: one-hot plus noise below the gap."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.0, 0.5, (num_classes, *pred.shape))
    np.put_along_axis(scores, pred[None].astype(np.int64), 1.0, axis=0)
    return torch.from_numpy(scores).float()


def by_stem():
    return {
        os.path.splitext(os.path.basename(r["file_name"]))[0]: r for r in DatasetCatalog.get(VAL)
    }


def evaluate(cfg, predictions, output_folder, *, one_by_one=False):
    """Run the trainer's evaluator on ``{stem: (H, W) predicted classes}``."""
    evaluator = HierVLTrainer.build_evaluator(cfg, VAL, output_folder=str(output_folder))
    evaluator.reset()
    records = by_stem()
    num_classes = len(MetadataCatalog.get(VAL).stuff_classes)
    inputs = [{"file_name": records[s]["file_name"]} for s in predictions]
    outputs = [
        {"sem_seg": scores_for(p, num_classes, i)} for i, p in enumerate(predictions.values())
    ]
    if one_by_one:
        for inp, out in zip(inputs, outputs):
            evaluator.process([inp], [out])
    else:
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()["sem_seg"]


def reference_metrics(gts, preds, num_classes):
    """Metrics from a confusion matrix built pixel by pixel (conf[g, p] = #pixels of class g
    predicted as p, ignore pixels skipped), with detectron2's NaN rule (see module doc)."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for gt, pred in zip(gts, preds):
        for g, p in zip(gt.ravel(), pred.ravel()):
            if g != IGNORE:
                conf[g, p] += 1
    tp = np.diag(conf).astype(float)
    gt_count, pred_count = conf.sum(axis=1), conf.sum(axis=0)
    present = gt_count > 0
    iou = np.full(num_classes, math.nan)
    acc = np.full(num_classes, math.nan)
    iou[present] = tp[present] / (gt_count + pred_count - tp)[present]
    acc[present] = tp[present] / gt_count[present]
    freq = gt_count / gt_count.sum()
    return {
        "IoU": iou,
        "ACC": acc,
        "mIoU": iou[present].mean(),
        "fwIoU": (freq[present] * iou[present]).sum(),
        "mACC": acc[present].mean(),
        "pACC": tp.sum() / gt_count.sum(),
    }


def assert_metrics(res, expected, classes):
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert res[key] == pytest.approx(100 * expected[key], abs=1e-9), key
    for kind in ("IoU", "ACC"):
        for name, value in zip(classes, expected[kind]):
            got = res[f"{kind}-{name}"]
            if math.isnan(value):
                assert math.isnan(got), f"{kind}-{name}: {got}, expected NaN"
            else:
                assert got == pytest.approx(100 * value, abs=1e-9), f"{kind}-{name}"


def test_hand_computed_example(tmp_path, registered):
    cfg = write_dataset(tmp_path, {"a": GT_A, "b": GT_B}, CLASSES)
    res = evaluate(cfg, {"a": PRED_A, "b": PRED_B}, tmp_path / "inference")
    assert_metrics(res, EXPECTED_A, CLASSES)
    assert res["mIoU"] == pytest.approx(100 * 5 / 9) and res["fwIoU"] == pytest.approx(100 * 4 / 7)
    # The evaluator also dumps what it saw, for inspection.
    assert os.path.isfile(tmp_path / "inference" / "sem_seg_predictions.json")


def test_random_maps_match_confusion_matrix(tmp_path, registered):
    """Several images of different sizes, ~10% ignore; class 4 is neither in the GT nor
    predicted, class 5 is predicted but never in the GT: both NaN, both out of the mean."""
    classes = ["c0", "c1", "c2", "c3", "c4", "c5"]
    rng = np.random.default_rng(1)
    gts, preds = {}, {}
    for i, shape in enumerate([(7, 9), (12, 5), (10, 10)]):
        gt = rng.integers(0, 4, shape)
        gt[rng.random(shape) < 0.1] = IGNORE
        pred = np.where(gt == IGNORE, rng.integers(0, 4, shape), gt)
        wrong = rng.random(shape) < 0.3
        pred[wrong] = rng.choice([0, 1, 2, 3, 5], size=int(wrong.sum()))
        gts[f"im{i}"], preds[f"im{i}"] = gt, pred
    all_gt = np.concatenate([g.ravel() for g in gts.values()])
    all_pred = np.concatenate([p.ravel() for p in preds.values()])
    assert 5 in all_pred[all_gt != IGNORE] and 5 not in all_gt and 4 not in all_pred
    cfg = write_dataset(tmp_path, gts, classes)
    res = evaluate(cfg, preds, tmp_path / "inference")
    expected = reference_metrics(list(gts.values()), list(preds.values()), len(classes))
    assert np.isnan(expected["IoU"][[4, 5]]).all()
    assert_metrics(res, expected, classes)
    # Predicting class 5 costs: the same predictions with those pixels set right score higher.
    fixed = {
        s: np.where(p == 5, np.where(gts[s] == IGNORE, 0, gts[s]), p) for s, p in preds.items()
    }
    assert evaluate(cfg, fixed, tmp_path / "inference2")["mIoU"] > res["mIoU"]


def test_ignore_pixels_and_batching_do_not_matter(tmp_path, registered):
    cfg = write_dataset(tmp_path, {"a": GT_A, "b": GT_B}, CLASSES)
    base = evaluate(cfg, {"a": PRED_A, "b": PRED_B}, tmp_path / "i0")
    other_a = PRED_A.copy()
    other_a[GT_A == IGNORE] = 3  # a class absent from the GT, on the ignore pixel only
    other_b = np.full(GT_B.shape, 2)
    changed = evaluate(cfg, {"a": other_a, "b": other_b}, tmp_path / "i1", one_by_one=True)
    for key in ["mIoU", "fwIoU", "mACC", "pACC"] + [f"IoU-{c}" for c in CLASSES]:
        assert changed[key] == pytest.approx(base[key], nan_ok=True), key
    assert math.isnan(changed["IoU-boat"])


class CannedModel(nn.Module):
    """Returns the crafted scores of each input file (a stand-in for HierVL's inference)."""

    def __init__(self, predictions, num_classes):
        super().__init__()
        self.predictions = predictions
        self.num_classes = num_classes

    def forward(self, inputs):
        outputs = []
        for item in inputs:
            pred = self.predictions[item["file_name"]]
            assert (item["height"], item["width"]) == pred.shape, item["file_name"]
            outputs.append({"sem_seg": scores_for(pred, self.num_classes)})
        return outputs


def test_trainer_test_writes_metrics_json(tmp_path, registered):
    """``HierVLTrainer.test`` (the --eval-only path): test loader -> evaluator ->
    OUTPUT_DIR/metrics.json keyed by the dataset name, with the hand-computed values."""
    cfg = write_dataset(tmp_path, {"a": GT_A, "b": GT_B}, CLASSES)
    records = by_stem()
    model = CannedModel(
        {records["a"]["file_name"]: PRED_A, records["b"]["file_name"]: PRED_B}, len(CLASSES)
    )
    results = HierVLTrainer.test(cfg, model)
    assert_metrics(results["sem_seg"], EXPECTED_A, CLASSES)
    text = (tmp_path / "output" / "metrics.json").read_text(encoding="utf-8")

    def reject(constant):
        raise AssertionError(f"metrics.json is not strict JSON: {constant}")

    written = json.loads(text, parse_constant=reject)
    assert list(written) == [VAL] and set(written[VAL]) == {"sem_seg"}
    # Undefined metrics (class absent from the ground truth) are null, not NaN.
    assert written[VAL]["sem_seg"][f"IoU-{CLASSES[3]}"] is None
    restored = {k: math.nan if v is None else v for k, v in written[VAL]["sem_seg"].items()}
    assert_metrics(restored, EXPECTED_A, CLASSES)
