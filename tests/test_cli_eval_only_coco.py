"""Acceptance of issue 5 through the real CLI:
``python train_net.py --config-file configs/coco/hiervl_232.yaml --eval-only MODEL.WEIGHTS ...``
on a generated COCO-layout tree (JPEGs + instances json with polygon, compressed-RLE and crowd
uncompressed-RLE instances, masks rendered by ``datasets/prepare_coco.py``), with the tiny
model of ``configs/tiny/Base-Tiny.yaml`` given as command-line overrides. The weights are an
untrained tiny model saved by ``HierVLCheckpointer``: this checks the plumbing (sliding window
over several windows on images that are not multiples of the crop or the patch, evaluator,
``metrics.json``), not the accuracy. Also: the errors for a missing dataset and for missing
weights.
"""

import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import yaml
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from PIL import Image
from pycocotools import mask as mask_utils

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "coco", "hiervl_232.yaml")
TINY = os.path.join(REPO, "configs", "tiny", "Base-Tiny.yaml")
# Windows of 64 with stride 32 on the images below: 2x2 or 2x3 windows each.
CROP = 64
THINGS = [c for c in COCO_CATEGORIES if c["isthing"]]
CLASSES = ["background"] + [c["name"] for c in THINGS]
LABEL_OF = {c["id"]: k + 1 for k, c in enumerate(THINGS)}  # COCO category id -> mask value
PERSON, CAR, DOG = 1, 3, 18  # COCO category ids
SUBPROCESS_TIMEOUT = 300


def flatten(node, prefix):
    """``{"A": {"B": 1}}`` -> ``["A.B", "1"]``, values written so ``merge_from_list`` reads
    them back (lists and numbers through literal_eval, strings as they are)."""
    opts = []
    for key, value in node.items():
        if isinstance(value, dict):
            opts += flatten(value, f"{prefix}{key}.")
        else:
            opts += [f"{prefix}{key}", value if isinstance(value, str) else repr(value)]
    return opts


def tiny_model_opts():
    """The MODEL section of the tiny config as KEY VALUE overrides."""
    with open(TINY, encoding="utf-8") as f:
        model = yaml.safe_load(f)["MODEL"]
    opts = flatten(model, "MODEL.")
    pairs = dict(zip(opts[::2], opts[1::2]))
    # The overrides that make it tiny and offline must be there.
    assert pairs["MODEL.DEVICE"] == "cpu" and pairs["MODEL.HIERVL.CLIP.MODEL_NAME"] == "custom"
    assert pairs["MODEL.HIERVL.CLIP.PRETRAINED"] == ""
    return opts


def rle_uncompressed(mask):
    """COCO uncompressed RLE (crowd format): column-major run lengths, zeros first."""
    flat = mask.ravel(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def rle_compressed(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def box(height, width, y0, y1, x0, x1):
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def write_coco_tree(root):
    """``<root>/coco/{val2017, annotations/instances_val2017.json}``; returns the expected
    rendered masks ``{image id: (H, W) uint8}`` (0 = background)."""
    coco = root / "coco"
    os.makedirs(coco / "val2017")
    os.makedirs(coco / "annotations")
    # (id, height, width): none a multiple of the crop, the last not even of the patch (16).
    sizes = [(139, 80, 96), (285, 96, 80), (632, 70, 90)]
    rng = np.random.default_rng(0)
    images, annotations, expected = [], [], {}
    for image_id, height, width in sizes:
        name = f"{image_id:012d}.jpg"
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(coco / "val2017" / name, quality=90)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        expected[image_id] = np.zeros((height, width), dtype=np.uint8)

    def add(image_id, category, segmentation, mask, iscrowd=0):
        annotations.append(
            {"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
             "segmentation": segmentation, "area": float(mask.sum()), "iscrowd": iscrowd,
             "bbox": [0.0, 0.0, 1.0, 1.0]}
        )  # fmt: skip
        expected[image_id][mask] = LABEL_OF[category]

    # Image 139: a person polygon (axis-aligned rectangle, so its raster is exact) and a
    # car as compressed RLE, disjoint.
    person = box(80, 96, 10, 50, 8, 40)
    add(139, PERSON, [[8, 10, 40, 10, 40, 50, 8, 50]], person)
    car = box(80, 96, 40, 75, 55, 90)
    add(139, CAR, rle_compressed(car), car)
    # Image 285: a crowd of people as uncompressed RLE and a dog as compressed RLE.
    crowd = box(96, 80, 0, 30, 0, 80)
    add(285, PERSON, rle_uncompressed(crowd), crowd, iscrowd=1)
    dog = box(96, 80, 50, 90, 20, 60)
    add(285, DOG, rle_compressed(dog), dog)
    # Image 632: no annotation, all background.
    categories = [{"id": c["id"], "name": c["name"], "supercategory": ""} for c in THINGS]
    with open(coco / "annotations" / "instances_val2017.json", "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return expected


def run_cli(args, datasets_root, timeout=SUBPROCESS_TIMEOUT):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def eval_only_args(weights, output_dir):
    return [
        "train_net.py", "--config-file", CONFIG, "--eval-only",
        "MODEL.WEIGHTS", str(weights), *tiny_model_opts(),
        "TEST.SLIDING_WINDOW.CROP_SIZE", str(CROP), "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny model built from the same config + overrides, saved with
    HierVLCheckpointer."""
    from hiervl.engine.checkpoint import HierVLCheckpointer
    from hiervl.engine.launcher import setup_cfg
    from hiervl.engine.trainer import HierVLTrainer

    folder = tmp_path_factory.mktemp("ckpt")
    opts = tiny_model_opts() + ["TEST.SLIDING_WINDOW.CROP_SIZE", CROP, "OUTPUT_DIR", str(folder)]
    cfg = setup_cfg(CONFIG, opts)
    model = HierVLTrainer.build_model(cfg)
    HierVLCheckpointer(model, save_dir=str(folder)).save("tiny_untrained")
    return folder / "tiny_untrained.pth"


def iou_table(gts, preds, num_classes):
    """Per-class IoU in % (NaN for classes without GT pixels), mIoU, pixel accuracy."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for gt, pred in zip(gts, preds):
        np.add.at(conf, (gt.ravel(), pred.ravel()), 1)
    tp = np.diag(conf).astype(float)
    gt_count, pred_count = conf.sum(axis=1), conf.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(gt_count > 0, tp / (gt_count + pred_count - tp), np.nan)
    return 100 * iou, 100 * np.nanmean(iou), 100 * tp.sum() / gt_count.sum()


def test_eval_only_on_generated_coco(tmp_path, monkeypatch, checkpoint):
    root = tmp_path / "datasets"
    expected = write_coco_tree(root)
    # The prepare script's own main, in this process (one interpreter start less).
    argv = ["prepare_coco.py", "--root", str(root), "--parts", "val", "--workers", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(os.path.join(REPO, "datasets", "prepare_coco.py"), run_name="__main__")
    gts = {}
    for image_id, mask in expected.items():
        gts[image_id] = np.asarray(Image.open(root / "coco" / "masks" / f"{image_id:012d}.png"))
        np.testing.assert_array_equal(gts[image_id], mask, err_msg=f"mask of {image_id}")

    out = tmp_path / "output"
    proc = run_cli(eval_only_args(checkpoint, out), root)
    assert proc.returncode == 0, proc.stderr[-5000:]
    with open(out / "config.yaml", encoding="utf-8") as f:
        sliding = yaml.safe_load(f)["TEST"]["SLIDING_WINDOW"]
    assert sliding["ENABLED"] and sliding["CROP_SIZE"] == CROP and sliding["STRIDE"] == 0
    with open(out / "metrics.json", encoding="utf-8") as f:
        metrics = json.load(f)  # strict JSON: null for the IoU of classes without GT pixels
    assert list(metrics) == ["coco_val"]
    res = metrics["coco_val"]["sem_seg"]
    iou_keys = {k for k in res if k.startswith("IoU-")}
    assert iou_keys == {f"IoU-{name}" for name in CLASSES} and len(iou_keys) == 81
    present = {"background", "person", "car", "dog"}
    for name in CLASSES:
        assert (res[f"IoU-{name}"] is None) == (name not in present), name

    # The predictions the evaluator saw (its RLE dump) are full-size maps, and the metrics
    # are those of these maps against the rendered masks (an untrained model mostly predicts
    # one class everywhere, so the IoUs are small; exact values: tests/evaluation).
    with open(out / "inference" / "sem_seg_predictions.json", encoding="utf-8") as f:
        dump = json.load(f)
    preds = {image_id: np.full(gt.shape, -1) for image_id, gt in gts.items()}
    for entry in dump:
        image_id = int(os.path.splitext(os.path.basename(entry["file_name"]))[0])
        mask = mask_utils.decode(entry["segmentation"]).astype(bool)
        assert mask.shape == gts[image_id].shape, entry["file_name"]
        preds[image_id][mask] = entry["category_id"]
    assert all((p >= 0).all() for p in preds.values()), "every pixel has one prediction"
    ids = sorted(gts)
    iou, miou, pacc = iou_table([gts[i] for i in ids], [preds[i] for i in ids], len(CLASSES))
    assert res["mIoU"] == pytest.approx(miou) and res["pACC"] == pytest.approx(pacc)
    for k, name in enumerate(CLASSES):
        expected = None if np.isnan(iou[k]) else pytest.approx(iou[k])
        assert res[f"IoU-{name}"] == expected, name
    assert "mIoU" in proc.stdout + proc.stderr  # the table is logged as well


def test_eval_only_missing_dataset_names_path_and_script(tmp_path, checkpoint):
    root = tmp_path / "empty_datasets"
    root.mkdir()
    proc = run_cli(eval_only_args(checkpoint, tmp_path / "output"), root)
    assert proc.returncode != 0
    assert str(root / "coco") in proc.stderr and "prepare_coco.py" in proc.stderr, proc.stderr[
        -3000:
    ]
    assert not (tmp_path / "output" / "metrics.json").exists()


def test_eval_only_missing_weights_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model.pth"
    proc = run_cli(eval_only_args(missing, tmp_path / "output"), tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"ERROR: cannot read MODEL.WEIGHTS checkpoint {missing}: no such file", last
    assert not (tmp_path / "output" / "metrics.json").exists()
