"""Table 3 at CPU scale: the paper's component ablations on the quickstart's task.

Every row is the quickstart config (``configs/tiny/hiervl_quickstart.yaml`` by default)
with a few keys overridden, trained from scratch for each seed with ``train_net.py`` and
evaluated on the config's validation set; the row's mean ± std of mIoU and its difference
to the full model are printed as one table. Rows (``--rows`` picks a subset by name):

    full            the quickstart config as shipped (every component on)
    hsqg_off        static text queries, all classes (no relevance gate, no pruning)
    no_pruning      the gate multiplies the queries but prunes nothing (threshold 0)
    cmsam_off       no cross-modal alignment in the pixel decoder
    qvis_off        text queries only (no visual queries)
    one_level       L = 1 (no hierarchy of text queries)
    maskclip_off    no MaskCLIP guidance of the pseudo-labels
    prompt_off / mask_off / pt_off / qt_off   one VL loss term off
    vl_off          L_prompt, L_mask, L_pt and L_qt all off
    ssl_off         labelled images only (semi-supervision off)
    wd_embed        the recipe detail undone: weight decay on embeddings and norms
    anchor_sum      L_anchor's repulsion as eq. 4's sum
    labeled_union   HSQG.LABELED_GATE union
    prune_test      TEST.PRUNE_CLASSES True (inference only: the ``full`` row's final model of
                    the same seed, evaluated again with ``--eval-only``)

    python benchmarks/ablation_tiny.py --seeds 0 1 2 [--rows full ssl_off] [--jobs 2]
        [--iters 300] [--clip PATH/clip.pt] [--output output/ablation_tiny] [-- KEY VALUE ...]

Seed N is the quickstart's ``--seed N`` (SEED and the labelled split of seed N,
``hiervl.quickstart.seed_opts``); the CLIP is the quickstart's (pretrained or reused from
``--clip-dir``, ``hiervl.tools.pretrain_clip``) unless ``--clip`` names one. Runs go two
at a time (``--jobs``), one thread each; finished runs (their
``metrics.json``) are reused, so an interrupted table continues where it stopped. It is
a benchmark, outside CI: the whole table is 17 trainings x 3 seeds of the quickstart's
config at ``--iters`` iterations (300 by default, 68 min on the quiet 2-core machine; the
quickstart's own 800 would take about 4 hours) and 3 evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Dict, List, Optional, Sequence, Tuple

from hiervl.quickstart import seed_opts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "tiny", "hiervl_quickstart.yaml")

_H = "MODEL.HIERVL."
ROWS: Dict[str, List[str]] = {
    "full": [],
    "hsqg_off": [_H + "HSQG.ENABLED", "False"],
    "no_pruning": [_H + "HSQG.RELEVANCE_THRESHOLD", "0.0"],
    "cmsam_off": [_H + "CMSAM.ENABLED", "False"],
    "qvis_off": [_H + "DECODER.NUM_VISUAL_QUERIES", "0"],
    "one_level": [_H + "HSQG.NUM_LEVELS", "1"],
    "maskclip_off": [_H + "SSL.MASKCLIP_ENABLED", "False"],
    "prompt_off": [_H + "VL.PROMPT_ENABLED", "False"],
    "mask_off": [_H + "VL.MASK_ENABLED", "False"],
    "pt_off": [_H + "VL.PT_ENABLED", "False"],
    "qt_off": [_H + "LOSS.QT_WEIGHT", "0.0"],
    "vl_off": [
        _H + "VL.PROMPT_ENABLED", "False",
        _H + "VL.MASK_ENABLED", "False",
        _H + "VL.PT_ENABLED", "False",
        _H + "LOSS.QT_WEIGHT", "0.0",
    ],
    "ssl_off": [_H + "SSL.ENABLED", "False"],
    "wd_embed": ["SOLVER.WEIGHT_DECAY_EMBED", "0.01", "SOLVER.WEIGHT_DECAY_NORM", "0.01"],
    "anchor_sum": [_H + "VL.ANCHOR_REPULSION", "sum"],
    "labeled_union": [_H + "HSQG.LABELED_GATE", "union"],
    "prune_test": ["TEST.PRUNE_CLASSES", "True"],
}  # fmt: skip
# Rows that change inference only: no training of their own, the final model of the named
# row (same seed) is evaluated with the row's overrides.
EVAL_ONLY_ROWS: Dict[str, str] = {"prune_test": "full"}


def read_miou(run_dir: str) -> Optional[float]:
    """mIoU of a finished run (its ``metrics.json``), None when there is none yet."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    values = [v["sem_seg"] for v in results.values() if "sem_seg" in v]
    if len(values) != 1 or "mIoU" not in values[0]:
        raise ValueError(f"{path}: expected the results of one dataset, got {list(results)}")
    return float(values[0]["mIoU"])


def run_command(
    config: str, run_dir: str, overrides: Sequence[str], eval_weights: str = ""
) -> List[str]:
    """The ``train_net.py`` command line of one (row, seed) run; with ``eval_weights`` an
    ``--eval-only`` evaluation of that checkpoint instead of a training."""
    mode = ["--eval-only"] if eval_weights else []
    weights = ["MODEL.WEIGHTS", eval_weights] if eval_weights else []
    return [
        sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", config,
        *mode, *overrides, *weights, "OUTPUT_DIR", run_dir,
    ]  # fmt: skip


def _train(config: str, run_dir: str, overrides: Sequence[str], eval_weights: str = "") -> float:
    os.makedirs(run_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if eval_weights and not os.path.isfile(eval_weights):
        raise RuntimeError(f"run {run_dir} evaluates {eval_weights}, which does not exist")
    command = run_command(config, run_dir, overrides, eval_weights)
    with open(os.path.join(run_dir, "log.txt.ablation"), "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    miou = read_miou(run_dir)
    if proc.returncode != 0 or miou is None:
        raise RuntimeError(
            f"run {run_dir} failed (exit {proc.returncode}); see its log.txt.ablation"
        )
    return miou


def format_table(results: Dict[str, List[float]], seeds: Sequence[int], title: str) -> str:
    """One line per row: mean ± std, the seeds' values, the mean difference to ``full``."""
    width = max(len(name) for name in results)
    full = statistics.mean(results["full"]) if results.get("full") else None
    lines = [title, f"  {'row':<{width}} | mIoU mean ± std | seeds {list(seeds)} | vs full"]
    for name, values in results.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        mean = statistics.mean(values)
        delta = "" if full is None or name == "full" else f"{mean - full:+.2f}"
        cells = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"  {name:<{width}} | {mean:6.2f} ± {std:4.2f} | {cells} | {delta}")
    return "\n".join(lines)


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument("--clip", default=None, help="a CLIP checkpoint ('' = random init)")
    parser.add_argument(
        "--clip-dir", default=os.path.join("output", "quickstart", "clip"), help="CLIP cache"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument(
        "--iters",
        type=int,
        default=300,
        help="SOLVER.MAX_ITER of every run (the quickstart's 800: ~4 h; 0 = the config's)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at the same time")
    parser.add_argument("--output", default=os.path.join("output", "ablation_tiny"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ... for every run")
    args = parser.parse_args(argv)
    if args.clip and not os.path.isfile(args.clip):
        parser.error(f"--clip {args.clip}: no such file")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    args.opts = [o for o in args.opts if o != "--"]
    if len(args.opts) % 2:
        parser.error(f"overrides after -- must be KEY VALUE pairs, got {args.opts}")
    if args.iters < 0:
        parser.error(f"--iters must be >= 0, got {args.iters}")
    if args.iters:  # first, so that overrides after -- still win
        steps = str(args.iters)
        args.opts = ["SOLVER.MAX_ITER", steps, "SOLVER.CHECKPOINT_PERIOD", steps, *args.opts]
    return args


def _run_dir(args, row: str, seed: int) -> str:
    return os.path.abspath(os.path.join(args.output, row, f"seed{seed}"))


def _prepare(args):
    """The base config (datasets registered and generated once) and the CLIP checkpoint."""
    from detectron2.data import DatasetCatalog

    from hiervl.engine.launcher import setup_cfg
    from hiervl.tools.pretrain_clip import PretrainSettings, ensure_pretrained

    base_cfg = setup_cfg(args.config_file, args.opts)
    clip = args.clip
    if clip is None:
        clip, _ = ensure_pretrained(base_cfg, args.clip_dir, PretrainSettings())
    for name in (*base_cfg.DATASETS.TRAIN_LABELED, *base_cfg.DATASETS.TEST):
        DatasetCatalog.get(name)
    return base_cfg, clip


def main(argv=None) -> Dict[str, List[float]]:
    args = _parse(argv)
    runs: List[Tuple[str, int]] = [(row, seed) for row in args.rows for seed in args.seeds]
    results: Dict[str, Dict[int, float]] = {row: {} for row in args.rows}
    for row, seed in runs:
        done = read_miou(_run_dir(args, row, seed))
        if done is not None:
            results[row][seed] = done
    missing = [(row, seed) for row, seed in runs if seed not in results[row]]
    todo, evals = [], []
    if missing:
        base_cfg, clip = _prepare(args)
        for row, seed in missing:
            opts = [_H + "CLIP.PRETRAINED", clip, *seed_opts(base_cfg, seed), *args.opts]
            run = (row, seed, _run_dir(args, row, seed), opts + ROWS[row])
            if row in EVAL_ONLY_ROWS:
                source = _run_dir(args, EVAL_ONLY_ROWS[row], seed)
                evals.append(run + (os.path.join(source, "model_final.pth"),))
            else:
                todo.append(run + ("",))
    print(
        f"{len(runs)} runs, {len(runs) - len(todo) - len(evals)} reused, {len(todo)} to train, "
        f"{len(evals)} to evaluate",
        flush=True,
    )
    start = time.perf_counter()
    # Trainings first (two at a time), then the inference-only rows, which need their
    # source row's final model.
    for stage in (todo, evals):
        stage_start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(_train, args.config_file, *run[2:]): run[:2] for run in stage}
            for count, future in enumerate(as_completed(futures), 1):
                row, seed = futures[future]
                results[row][seed] = future.result()
                elapsed = time.perf_counter() - start
                eta = (time.perf_counter() - stage_start) / count * (len(stage) - count)
                print(
                    f"[{count}/{len(stage)}] {row} seed {seed}: mIoU {results[row][seed]:.2f}"
                    f" ({elapsed / 60:.1f} min, stage ETA {eta / 60:.1f} min)",
                    flush=True,
                )
    table = {row: [results[row][s] for s in args.seeds] for row in args.rows}
    title = f"ablations, mIoU (%) on the config's validation set, {args.config_file}"
    print("\n" + format_table(table, args.seeds, title))
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"seeds": args.seeds, "opts": args.opts, "rows": table}, f, indent=2)
    return table


if __name__ == "__main__":
    main()
