"""``make quickstart``: the whole HierVL method learning on the built-in data, on a CPU.

1. pretrains a small CLIP on captions of the synthetic images (``hiervl.tools.pretrain_clip``;
   reused from ``<output-dir>/clip/`` when its settings are unchanged), so that HSQG's
   relevance gate, MaskCLIP guidance and the vision-language losses have a real image-text
   alignment to work with;
2. trains the quickstart config (every component of the paper on) on the labelled and
   unlabelled images of the hard synthetic variant and, at the same time in a second
   process, the same model for the same iterations on the labelled images only;
3. evaluates both on the validation set, next to the trivial baseline that predicts the
   labelled set's most frequent class everywhere;
4. writes ``metrics.json`` and ``demo.png`` (input | prediction | ground truth) to the
   output folder and prints the three mIoU numbers.

``--seed N`` sets SEED (initialisation, data order, augmentation) and picks the labelled
subset of split seed N (``..._labeled_<n>_split<N>``); the CLIP pretraining is the same for
every seed.

    python -m hiervl.quickstart [--output-dir output/quickstart] [--seed N] [--iters N] [opts ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import platform
import sys
import time
from typing import Dict, List, Sequence

import cv2
import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from hiervl.data.image_io import read_image, read_mask
from hiervl.demo.visualizer import DatasetPalette, SemanticVisualizer
from hiervl.engine.checkpoint import atomic_write_text
from hiervl.engine.launcher import setup_cfg
from hiervl.engine.trainer import HierVLTrainer, json_safe
from hiervl.tools.pretrain_clip import PretrainSettings, ensure_pretrained

logger = logging.getLogger("hiervl.quickstart")

DEFAULT_CONFIG = "configs/tiny/hiervl_quickstart.yaml"
DEMO_IMAGES = 4
# Each training runs on one thread: the tiny model's ops gain little from a second one,
# the two trainings then share a 2-core machine without contention, and the results do
# not depend on the machine's core count.
TRAIN_THREADS = 1


def train_and_evaluate(config: str, opts: Sequence[str], output_dir: str):
    """Train ``config`` with ``opts`` into ``output_dir``; returns (cfg, model, sem_seg metrics)."""
    cfg = setup_cfg(config, list(opts) + ["OUTPUT_DIR", output_dir])
    os.makedirs(output_dir, exist_ok=True)
    atomic_write_text(cfg.dump(), os.path.join(output_dir, "config.yaml"))
    # train_net.py seeds through detectron2's default_setup; a trainer built here must too,
    # or the initialisation would depend on what ran before in this process.
    seed_all_rng(cfg.SEED)
    trainer = HierVLTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model
    # The trainer's evaluation hook already evaluated the final model (EVAL_PERIOD 0 still
    # evaluates once after the last iteration).
    results = getattr(trainer, "_last_eval_results", None) or HierVLTrainer.test(cfg, model)
    return cfg, model, results["sem_seg"]


def _train_in_child(config: str, opts: Sequence[str], output_dir: str, log_path: str) -> None:
    """Body of the second process: one training, logged to ``log_path`` only; its metrics
    go to ``output_dir/metrics.json`` (written by the trainer's evaluation)."""
    torch.set_num_threads(TRAIN_THREADS)
    os.makedirs(output_dir, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s", "%m/%d %H:%M:%S"))
    for name in ("hiervl", "detectron2", "fvcore"):
        named = logging.getLogger(name)
        named.handlers[:] = [handler]
        named.setLevel(logging.INFO)
        named.propagate = False
    train_and_evaluate(config, opts, output_dir)


def _label_map(record: dict) -> np.ndarray:
    return read_mask(record["sem_seg_file_name"]).astype(np.int64)


def majority_baseline(labeled_name: str, val_name: str, num_classes: int) -> Dict[str, float]:
    """mIoU / pixel accuracy of predicting the labelled set's most frequent class everywhere.

    Same rule as detectron2's SemSegEvaluator: classes absent from the validation ground
    truth are left out of the mean.
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    for record in DatasetCatalog.get(labeled_name):
        labels = _label_map(record)
        counts += np.bincount(labels[labels < num_classes], minlength=num_classes)
    majority = int(counts.argmax())
    gt_pixels = np.zeros(num_classes, dtype=np.int64)
    for record in DatasetCatalog.get(val_name):
        labels = _label_map(record)
        gt_pixels += np.bincount(labels[labels < num_classes], minlength=num_classes)
    valid = gt_pixels.sum()
    present = gt_pixels > 0
    # Predicting one class everywhere: IoU(majority) = its share of valid pixels, 0 for others.
    iou = np.zeros(num_classes)
    iou[majority] = gt_pixels[majority] / valid
    return {
        "mIoU": 100.0 * float(iou[present].mean()),
        "pACC": 100.0 * float(gt_pixels[majority] / valid),
        "majority_class": MetadataCatalog.get(labeled_name).stuff_classes[majority],
    }


def demo_picture(model, cfg, val_name: str, path: str, count: int = DEMO_IMAGES) -> str:
    """Rows of input | prediction | ground truth for the first ``count`` validation images."""
    metadata = MetadataCatalog.get(val_name)
    names = metadata.stuff_classes
    palette = DatasetPalette.from_metadata(metadata)
    visualizer = SemanticVisualizer(alpha=0.6, draw_legend=False, palette=palette)
    rows = []
    model.eval()
    for record in DatasetCatalog.get(val_name)[:count]:
        bgr = read_image(record["file_name"], format="BGR")
        rgb = torch.from_numpy(np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1)))
        with torch.no_grad():
            scores = model([{"image": rgb, "height": bgr.shape[0], "width": bgr.shape[1]}])
        pred = scores[0]["sem_seg"].argmax(0).cpu().numpy()
        gt = _label_map(record)
        gt = np.where(gt == 255, -1, gt)
        rows.append(
            np.concatenate(
                [bgr, visualizer.draw(bgr, pred, names), visualizer.draw(bgr, gt, names)], axis=1
            )
        )
    picture = np.concatenate(rows, axis=0)
    scale = max(1, 384 // bgr.shape[0])
    picture = cv2.resize(picture, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    header = np.full((32, picture.shape[1], 3), 255, np.uint8)
    third = picture.shape[1] // 3
    for i, title in enumerate(["input", "HierVL prediction", "ground truth"]):
        cv2.putText(header, title, (i * third + 8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7, 0, 2)
    picture = np.concatenate([header, picture], axis=0)
    cv2.imwrite(path, picture)
    return path


def _summary(metrics: Dict[str, float]) -> Dict[str, float]:
    keys = ("mIoU", "fwIoU", "pACC", "mACC")
    out = {k: float(metrics[k]) for k in keys if k in metrics}
    out.update({k: float(v) for k, v in metrics.items() if k.startswith("IoU-")})
    return out


def _clip_summary(path: str, record) -> Dict[str, object]:
    if record is None:  # --clip-checkpoint
        return {"checkpoint": path, "pretrained_here": False}
    zero_shot = record["zero_shot"]["pretrained"]
    return {
        "checkpoint": path,
        "pretrained_here": True,
        "reused": record["reused"],
        "seconds": record["seconds"],
        "presence_auc_mean": zero_shot["auc_mean"],
        "maskclip_mIoU": zero_shot["maskclip_mIoU"],
    }


def seed_opts(cfg, seed: int) -> List[str]:
    """Overrides for ``--seed``: SEED, and the labelled/unlabelled subsets of split seed
    ``seed`` (the config's own names for seed 0). ``ValueError`` when the config's training
    sets have no such split registered."""
    opts = ["SEED", str(seed)]
    if seed == 0:
        return opts
    registered = set(DatasetCatalog.list())
    for key in ("TRAIN_LABELED", "TRAIN_UNLABELED"):
        names = [f"{name}_split{seed}" for name in getattr(cfg.DATASETS, key)]
        missing = [name for name in names if name not in registered]
        if missing:
            raise ValueError(
                f"--seed {seed}: DATASETS.{key} has no split-seed-{seed} version registered "
                f"({missing}); built-in splits exist for the synthetic_hard_* datasets"
            )
        opts += [f"DATASETS.{key}", repr(tuple(names))]
    return opts


def main(argv: List[str] = None) -> Dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--output-dir", default="output/quickstart")
    parser.add_argument("--seed", type=int, default=0, help="SEED and labelled split seed")
    parser.add_argument("--iters", type=int, default=0, help="override SOLVER.MAX_ITER")
    parser.add_argument(
        "--clip-dir", default="", help="cache of pretrained CLIPs (default <output-dir>/clip)"
    )
    parser.add_argument(
        "--clip-checkpoint",
        default="",
        help="use this CLIP checkpoint (the config's CUSTOM architecture) instead of pretraining",
    )
    clip_defaults = PretrainSettings()
    parser.add_argument("--clip-steps", type=int, default=clip_defaults.steps)
    parser.add_argument("--clip-batch", type=int, default=clip_defaults.batch_size)
    parser.add_argument("--clip-images", type=int, default=clip_defaults.num_images)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="extra config overrides")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    setup_logger(name="hiervl")
    setup_logger(name="detectron2", abbrev_name="d2")
    start = time.perf_counter()

    logger.info("[1/4] the small CLIP, pretrained on synthetic image-caption pairs")
    base_cfg = setup_cfg(args.config_file, args.opts)
    if args.clip_checkpoint:
        clip_path, clip_record = args.clip_checkpoint, None
    else:
        clip_settings = dataclasses.replace(
            clip_defaults,
            steps=args.clip_steps,
            batch_size=args.clip_batch,
            num_images=args.clip_images,
        )
        clip_path, clip_record = ensure_pretrained(
            base_cfg, args.clip_dir or os.path.join(args.output_dir, "clip"), clip_settings
        )
    opts = list(args.opts) + seed_opts(base_cfg, args.seed)
    opts += ["MODEL.HIERVL.CLIP.PRETRAINED", clip_path, "TEST.EVAL_PERIOD", "0"]
    if args.iters > 0:
        opts += ["SOLVER.MAX_ITER", str(args.iters)]

    # Generate the dataset files here once, rather than in both training processes.
    for name in (*base_cfg.DATASETS.TRAIN_LABELED, *base_cfg.DATASETS.TEST):
        DatasetCatalog.get(name)
    logger.info("[2/4] labelled-only training started in a second process")
    sup_dir = os.path.join(args.output_dir, "labeled_only")
    sup_log = os.path.join(args.output_dir, "labeled_only.log")
    os.makedirs(args.output_dir, exist_ok=True)
    child = multiprocessing.get_context("spawn").Process(
        target=_train_in_child,
        args=(args.config_file, opts + ["MODEL.HIERVL.SSL.ENABLED", "False"], sup_dir, sup_log),
    )
    child.start()
    logger.info("[3/4] semi-supervised training (labelled + unlabelled images)")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        cfg, model, semi = train_and_evaluate(
            args.config_file, opts, os.path.join(args.output_dir, "semi_supervised")
        )
    finally:
        torch.set_num_threads(previous_threads)
        child.join()
    if child.exitcode != 0:
        raise RuntimeError(
            f"the labelled-only training failed (exit code {child.exitcode}); see {sup_log}"
        )
    with open(os.path.join(sup_dir, "metrics.json")) as f:
        sup = json.load(f)[cfg.DATASETS.TEST[0]]["sem_seg"]
    sup = {k: float("nan") if v is None else v for k, v in sup.items()}

    logger.info("[4/4] baseline, demo picture, metrics")
    labeled_name, val_name = cfg.DATASETS.TRAIN_LABELED[0], cfg.DATASETS.TEST[0]
    num_classes = len(MetadataCatalog.get(val_name).stuff_classes)
    base = majority_baseline(labeled_name, val_name, num_classes)
    n_labeled = len(DatasetCatalog.get(labeled_name))
    n_unlabeled = len(DatasetCatalog.get(cfg.DATASETS.TRAIN_UNLABELED[0]))
    picture = demo_picture(model, cfg, val_name, os.path.join(args.output_dir, "demo.png"))
    metrics = {
        "semi_supervised": _summary(semi),
        "labeled_only": _summary(sup),
        "majority_class": base,
        "seed": args.seed,
        "iterations": cfg.SOLVER.MAX_ITER,
        "labeled_dataset": labeled_name,
        "unlabeled_dataset": cfg.DATASETS.TRAIN_UNLABELED[0],
        "val_dataset": val_name,
        "clip": _clip_summary(clip_path, clip_record),
        "machine": machine_summary(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    path = os.path.join(args.output_dir, "metrics.json")
    atomic_write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n", path)
    rows = [
        (f"semi-supervised ({n_labeled} labelled + {n_unlabeled} unlabelled)", semi["mIoU"]),
        (f"labelled images only ({n_labeled}), same iterations", sup["mIoU"]),
        (f"majority class '{base['majority_class']}' everywhere", base["mIoU"]),
    ]
    width = max(len(name) for name, _ in rows)
    clip_note = (
        "given"
        if clip_record is None
        else "reused"
        if clip_record["reused"]
        else (f"{clip_record['seconds'] / 60:.1f} min")
    )
    lines = [
        f"HierVL quickstart (seed {args.seed}): mIoU (%) on {val_name}, "
        f"{cfg.SOLVER.MAX_ITER} iterations, {metrics['seconds'] / 60:.1f} min in all "
        f"(CLIP pretraining: {clip_note})"
    ]
    lines += [f"  {name:<{width}} : {value:6.2f}" for name, value in rows]
    machine = metrics["machine"]
    lines += [
        f"machine: torch {machine['torch']}, CPU kernels {machine['cpu_capability']}, "
        f"{machine['cpu_count']} cores (the mIoU depends on these too: see README.md)",
        f"metrics: {path}",
        f"demo picture: {picture}",
    ]
    print("\n" + "\n".join(lines))
    return metrics


def machine_summary() -> Dict[str, object]:
    """What the numbers of a run depend on besides the code and the seed: torch's version
    and the SIMD kernels it dispatches to on this CPU (e.g. AVX2 vs AVX512 give different
    float rounding, and a few hundred iterations of training turn that into different
    mIoU), the training threads and the core count."""
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "train_threads": TRAIN_THREADS,
    }


def cli(argv: List[str] = None) -> int:
    """``python -m hiervl.quickstart``: exit status 1 with a one-line message for a user
    error (a config key, a checkpoint, an image file) or a non-finite loss."""
    try:
        main(argv)
    except (ValueError, FloatingPointError) as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
