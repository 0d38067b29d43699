"""Why a quickstart run gains (or not) from its unlabelled images: for a trained model, on the
validation set and on unlabelled training images (the synthetic generator knows their labels),

- mIoU with HSQG's predicted relevance gate (what inference does) and with the ground-truth
  gate (the classes present given): what the gate's mistakes cost;
- the share of pixels whose pseudo-label would pass SSL.CONF_THRESHOLD, and how many of
  those are right, over all pixels and over foreground pixels only: whether the
  weak-to-strong consistency teaches the model its right or its wrong answers;
- the same per class (predicted gate), with the class its confident wrong pixels are
  most often taken for.

    python benchmarks/quickstart_diagnosis.py output/quickstart/semi_supervised \
        [--weights model_final.pth] [--unlabeled 200]
"""

import argparse
import os

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from hiervl.data.image_io import read_image, read_mask
from hiervl.engine.checkpoint import HierVLCheckpointer
from hiervl.engine.launcher import setup_cfg
from hiervl.engine.trainer import HierVLTrainer
from hiervl.tools.zero_shot import confusion_iou


def _load(name, count):
    """(N, 3, S, S) float RGB images and (N, S, S) int64 label maps of a synthetic set."""
    records = DatasetCatalog.get(name)[:count]
    images, labels = [], []
    for r in records:
        rgb = read_image(r["file_name"], format="RGB")
        images.append(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float())
        # Unlabelled records carry no mask path; the generator wrote one next to the image.
        mask = r.get("sem_seg_file_name") or r["file_name"].replace("images", "annotations")
        labels.append(read_mask(mask.replace(".jpg", ".png")).astype(np.int64))
    return torch.stack(images), np.stack(labels)


def diagnose(model, cfg, name, count):
    classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).stuff_classes
    num_classes = len(classes)
    images, labels = _load(name, count)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
    x = (images - mean) / std
    present = np.stack([np.bincount(g.ravel(), minlength=256)[:num_classes] > 0 for g in labels])
    rows = []
    for gate, presence in (
        ("predicted gate", None),
        ("ground-truth gate", torch.from_numpy(present)),
    ):
        with torch.no_grad():
            out = model.model(x, presence=presence)
            probs = model.model.semantic_probs(model.model.semantic_scores(out, labels.shape[1:]))
        conf, pred = (t.numpy() for t in probs.max(1))
        keep = conf >= cfg.MODEL.HIERVL.SSL.CONF_THRESHOLD
        right = pred == labels
        fg = (labels > 0) & (labels < num_classes)
        miou = 100 * np.nanmean(confusion_iou(labels, pred, num_classes=num_classes))
        rows.append(
            f"  {name:<36} {gate:<17} mIoU {miou:5.1f} | confident {100 * keep.mean():5.1f} % "
            f"right {100 * right[keep].mean():5.1f} % | foreground: confident "
            f"{100 * keep[fg].mean():5.1f} % right {100 * right[keep & fg].mean():5.1f} %"
        )
        if presence is None:
            rows += _per_class(labels, pred, keep, classes)
    return rows


def _per_class(labels, pred, keep, classes):
    """One line per class: how many of its pixels are confident, how many of those are
    right, and what the confident wrong ones are taken for (what the strong views learn)."""
    rows = []
    for c, cls in enumerate(classes):
        own = labels == c
        if not own.any():
            continue
        sure = own & keep
        wrong = np.bincount(pred[sure & (pred != c)], minlength=len(classes))
        worst = f"{classes[int(wrong.argmax())]} {100 * wrong.max() / max(sure.sum(), 1):4.1f} %"
        rows.append(
            f"      {cls:<12} confident {100 * sure.sum() / own.sum():5.1f} % right "
            f"{100 * (pred[sure] == c).mean() if sure.any() else float('nan'):5.1f} % | "
            f"most taken for {worst if wrong.any() else '-'}"
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a training's output folder (holds config.yaml)")
    p.add_argument("--weights", default="model_final.pth", help="file in the run folder")
    p.add_argument("--unlabeled", type=int, default=200, help="unlabelled images to check")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = setup_cfg(os.path.join(args.run, "config.yaml"), [])
    model = HierVLTrainer.build_model(cfg)
    HierVLCheckpointer(model).load(os.path.join(args.run, args.weights))
    model.eval()
    lines = [
        f"{args.run} ({args.weights}), SSL.CONF_THRESHOLD {cfg.MODEL.HIERVL.SSL.CONF_THRESHOLD}"
    ]
    lines += diagnose(model, cfg, cfg.DATASETS.TEST[0], 10**9)
    lines += diagnose(model, cfg, cfg.DATASETS.TRAIN_UNLABELED[0], args.unlabeled)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
