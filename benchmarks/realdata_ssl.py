"""Semi-supervised vs labelled-only on a folder of real photos, several seeds.

The folder has a user's layout (``../shared/realdata/coco128_person`` by default)::

    ROOT/classes.txt                 one class name per line, index 0 first
    ROOT/labeled/{images,masks}/     labelled images and their PNG masks (class ids, 255 ignore)
    ROOT/unlabeled/images/           unlabelled images, no masks
    ROOT/val/{images,masks}/         validation images and masks

The three parts are registered with detectron2 directly (``realdata_labeled``,
``realdata_unlabeled`` without ``sem_seg_file_name``, ``realdata_val``) and the tiny model
of ``configs/tiny/Base-Tiny.yaml`` is trained from scratch twice per seed, for the same
iterations: with the unlabelled images (SSL.ENABLED True) and without. Random-init CLIP
towers have no image-text alignment, so the parts that rely on it are off, as in the
quickstart (HSQG's relevance gate, MaskCLIP guidance, L_prompt, L_mask, L_pt); any config
key can be overridden after ``--``, for both runs of every seed.

    python benchmarks/realdata_ssl.py --seeds 0 1 2 --iters 300 [-- KEY VALUE ...]

Prints one row per seed (mIoU of both runs, their difference, and the share of
iterations whose consistency loss saw no confident pixel) and the mean ± std; writes
``OUTPUT/results.json``. Timings depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from typing import Dict, List, Sequence

from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from hiervl.data.datasets.common import EVALUATOR_TYPE, IGNORE_LABEL, make_records, register
from hiervl.engine.launcher import setup_cfg
from hiervl.engine.trainer import HierVLTrainer

logger = logging.getLogger("hiervl.realdata_ssl")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/realdata next to the checkout (or next to the folder of a git worktree).
_CANDIDATES = [
    os.path.join(up, "shared", "realdata", "coco128_person")
    for up in (os.path.dirname(REPO), os.path.dirname(os.path.dirname(REPO)))
]
DEFAULT_ROOT = next((c for c in _CANDIDATES if os.path.isdir(c)), _CANDIDATES[0])
BASE_CONFIG = os.path.join(REPO, "configs", "tiny", "Base-Tiny.yaml")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NAMES = {"labeled": "realdata_labeled", "unlabeled": "realdata_unlabeled", "val": "realdata_val"}

# What random-init CLIP towers make meaningless (see configs/tiny/hiervl_quickstart.yaml).
RANDOM_INIT_OPTS = [
    "MODEL.HIERVL.HSQG.ENABLED", "False",
    "MODEL.HIERVL.SSL.MASKCLIP_ENABLED", "False",
    "MODEL.HIERVL.VL.PROMPT_ENABLED", "False",
    "MODEL.HIERVL.VL.MASK_ENABLED", "False",
    "MODEL.HIERVL.VL.PT_ENABLED", "False",
]  # fmt: skip


def _stems(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"expected the folder {folder}")
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))


def _part(root: str, part: str, labelled: bool) -> List[dict]:
    images = _stems(os.path.join(root, part, "images"))
    paths = [os.path.join(root, part, "images", f) for f in images]
    ids = [f"{part}/{os.path.splitext(f)[0]}" for f in images]
    masks = None
    if labelled:
        masks = [os.path.join(root, part, "masks", os.path.splitext(f)[0] + ".png") for f in images]
        missing = [m for m in masks if not os.path.isfile(m)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} masks are missing, e.g. {missing[0]}")
    return make_records(paths, masks, ids)


def register_folder(root: str) -> List[str]:
    """Register the three parts of ``root``; returns the class names."""
    with open(os.path.join(root, "classes.txt")) as f:
        classes = [line.strip() for line in f if line.strip()]
    metadata = {
        "stuff_classes": classes,
        "ignore_label": IGNORE_LABEL,
        "evaluator_type": EVALUATOR_TYPE,
    }
    for part, name in NAMES.items():
        register(name, lambda p=part: _part(root, p, labelled=p != "unlabeled"), metadata)
    return classes


def _silent_share(trainer) -> float:
    """Share of iterations whose consistency loss was exactly 0 (no confident pixel)."""
    history = trainer.storage.history("loss_unsup_s1") if _has(trainer, "loss_unsup_s1") else None
    if history is None:
        return float("nan")
    values = [v for v, _ in history.values()]
    return sum(v == 0.0 for v in values) / max(len(values), 1)


def _has(trainer, key: str) -> bool:
    return key in trainer.storage.histories()


def train_one(
    seed: int, semi: bool, iters: int, eval_period: int, opts: Sequence[str], output: str
) -> Dict:
    """Train from scratch and evaluate on the validation part; returns the row's numbers."""
    run_dir = os.path.join(output, f"seed{seed}_{'semi' if semi else 'sup'}")
    cfg = setup_cfg(
        BASE_CONFIG,
        [
            *RANDOM_INIT_OPTS,
            "DATASETS.TRAIN_LABELED", f"('{NAMES['labeled']}',)",
            "DATASETS.TRAIN_UNLABELED", f"('{NAMES['unlabeled']}',)",
            "DATASETS.TEST", f"('{NAMES['val']}',)",
            "SOLVER.MAX_ITER", str(iters),
            "SOLVER.CHECKPOINT_PERIOD", str(10**9),
            "TEST.EVAL_PERIOD", str(eval_period),
            # Windows of the 128 training crop without overlap (6 per 320x240 photo): the
            # token grid the ViT was trained on (whole images scored 40.1 against 44.8 mIoU
            # for the same labelled-only model) at half the cost of 50% overlap.
            "TEST.SLIDING_WINDOW.STRIDE", "128",
            *opts,
            "MODEL.HIERVL.SSL.ENABLED", str(semi),
            "SEED", str(seed),
            "OUTPUT_DIR", run_dir,
        ],
    )  # fmt: skip
    seed_all_rng(seed)
    start = time.perf_counter()
    trainer = HierVLTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = getattr(trainer, "_last_eval_results", None) or HierVLTrainer.test(cfg, trainer.model)
    sem = results["sem_seg"]
    curve = {}
    if "sem_seg/mIoU" in trainer.storage.histories():
        curve = {it: v for v, it in trainer.storage.history("sem_seg/mIoU").values()}
    return {
        "mIoU": float(sem["mIoU"]),
        "curve": curve,
        "ious": {k: float(v) for k, v in sem.items() if k.startswith("IoU-")},
        "silent": _silent_share(trainer) if semi else float("nan"),
        "seconds": time.perf_counter() - start,
    }


def _mean_std(values: Sequence[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):6.2f} ± {std:4.2f}"


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="the photo folder (see above)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--eval-period", type=int, default=0, help="also evaluate every N")
    parser.add_argument(
        "--modes", nargs="+", choices=("semi", "sup"), default=["semi", "sup"],
        help="which runs (the labelled-only run does not depend on SSL.* overrides)",
    )  # fmt: skip
    parser.add_argument("--output", default="output/realdata_ssl")
    parser.add_argument("--tag", default="", help="a name for this setting in the table")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ... overrides")
    args = parser.parse_args(argv)
    opts = [o for o in args.opts if o != "--"]
    setup_logger(name="hiervl")
    setup_logger(name="detectron2", abbrev_name="d2")
    classes = register_folder(args.root)
    logger.info("classes %s; overrides %s", classes, opts)
    rows = []
    for i, seed in enumerate(args.seeds):
        row = {"seed": seed}
        for mode in args.modes:
            row[mode] = train_one(
                seed, mode == "semi", args.iters, args.eval_period, opts, args.output
            )
        rows.append(row)
        done = sum(r[m]["seconds"] for r in rows for m in args.modes)
        logger.info(
            "seed %d: %s; ETA %.1f min",
            seed, ", ".join(f"{m} {row[m]['mIoU']:.2f}" for m in args.modes),
            done / (i + 1) * (len(args.seeds) - i - 1) / 60,
        )  # fmt: skip
    os.makedirs(args.output, exist_ok=True)
    out = {"root": args.root, "iters": args.iters, "opts": opts, "tag": args.tag, "rows": rows}
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(out, f, indent=2)
    lines = [
        f"real photos ({os.path.basename(args.root.rstrip('/'))}), mIoU (%), "
        f"{args.iters} iterations, {args.tag or 'overrides: ' + (' '.join(opts) or 'none')}",
    ]
    nan = {"mIoU": float("nan"), "silent": float("nan")}
    both = all(m in args.modes for m in ("semi", "sup"))
    lines.append("  seed | semi-supervised | labelled only | semi - labelled | silent iters")
    for r in rows:
        semi, sup = r.get("semi", nan), r.get("sup", nan)
        lines.append(
            f"  {r['seed']:4d} | {semi['mIoU']:15.2f} | {sup['mIoU']:13.2f} | "
            f"{semi['mIoU'] - sup['mIoU']:+15.2f} | {semi['silent']:11.0%}"
        )
    means = {m: _mean_std([r[m]["mIoU"] for r in rows]) for m in args.modes}
    diff = _mean_std([r["semi"]["mIoU"] - r["sup"]["mIoU"] for r in rows]) if both else "-"
    lines.append(
        f"  mean | {means.get('semi', '-'):>15} | {means.get('sup', '-'):>13} | {diff:>15} |"
    )
    # Per-class IoU: with a dominant background class, a model that predicts it everywhere
    # scores the majority baseline's mIoU; the smaller classes show whether it segments.
    for key in rows[0][args.modes[0]]["ious"]:
        cells = []
        for mode in args.modes:
            values = [r[mode]["ious"][key] for r in rows]
            seeds = ", ".join(f"{v:.1f}" for v in values)
            cells.append(f"{mode} {_mean_std(values).strip()} [{seeds}]")
        lines.append(f"  {key}: " + " | ".join(cells))
    print("\n" + "\n".join(lines))
    return out


if __name__ == "__main__":
    main()
