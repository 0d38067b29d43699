"""Train the tiny model with each training variant and evaluate it with each inference
variant, several seeds: the measurement of recipe switches that need no ablation table.

    python benchmarks/recipe_switches.py --config configs/tiny/hiervl_tiny_16.yaml \
        --iters 300 --seeds 0 1 \
        --train "paper gate=MODEL.HIERVL.HSQG.LABELED_GATE ground_truth" \
        --train "union gate=MODEL.HIERVL.HSQG.LABELED_GATE union" \
        --eval "keep pruned=TEST.PRUNE_CLASSES False" \
        --eval "drop pruned=TEST.PRUNE_CLASSES True" \
        [-- KEY VALUE ...]

A variant is ``name=KEY VALUE [KEY VALUE ...]``; overrides after ``--`` apply to every
run. Each (train variant, seed) is trained once and evaluated once per inference variant
on DATASETS.TEST; the table gives mIoU mean ± std over the seeds (and every seed's
value). Writes ``OUTPUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from typing import Dict, List, Sequence, Tuple

from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from hiervl.engine.launcher import setup_cfg
from hiervl.engine.trainer import HierVLTrainer

logger = logging.getLogger("hiervl.recipe_switches")


def parse_variant(text: str) -> Tuple[str, List[str]]:
    """``"name=KEY VALUE ..."`` -> (name, [KEY, VALUE, ...])."""
    name, sep, opts = text.partition("=")
    pairs = opts.split()
    if not sep or not name.strip() or len(pairs) % 2:
        raise ValueError(f"a variant is 'name=KEY VALUE [KEY VALUE ...]', got {text!r}")
    return name.strip(), pairs


def run(config: str, iters: int, seeds: Sequence[int], train, evals, opts, output) -> Dict:
    results: Dict[str, Dict[str, List[float]]] = {}
    for train_name, train_opts in train:
        for seed in seeds:
            run_dir = os.path.join(output, f"{train_name.replace(' ', '_')}_seed{seed}")
            common = [*opts, *train_opts, "SOLVER.MAX_ITER", str(iters), "SEED", str(seed)]
            cfg = setup_cfg(config, [*common, "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", run_dir])
            seed_all_rng(seed)
            trainer = HierVLTrainer(cfg)
            trainer.resume_or_load(resume=False)
            trainer.train()
            for eval_name, eval_opts in evals:
                # A model built from the evaluation config (inference switches are read at
                # construction), holding the trained weights.
                eval_cfg = setup_cfg(config, [*common, *eval_opts, "OUTPUT_DIR", run_dir])
                model = HierVLTrainer.build_model(eval_cfg)
                model.load_state_dict(trainer.model.state_dict())
                miou = float(HierVLTrainer.test(eval_cfg, model)["sem_seg"]["mIoU"])
                results.setdefault(train_name, {}).setdefault(eval_name, []).append(miou)
                logger.info("%s / %s / seed %d: mIoU %.2f", train_name, eval_name, seed, miou)
    return results


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train", action="append", default=[], help="name=KEY VALUE ...")
    parser.add_argument("--eval", action="append", default=[], help="name=KEY VALUE ...")
    parser.add_argument("--output", default="output/recipe_switches")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="-- KEY VALUE ... for every run")
    args = parser.parse_args(argv)
    opts = [o for o in args.opts if o != "--"]
    train = [parse_variant(t) for t in args.train] or [("default", [])]
    evals = [parse_variant(e) for e in args.eval] or [("default", [])]
    setup_logger(name="hiervl")
    setup_logger(name="detectron2", abbrev_name="d2")
    results = run(args.config, args.iters, args.seeds, train, evals, opts, args.output)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"config": args.config, "iters": args.iters, "opts": opts, "mIoU": results}, f)
    width = max(len(n) for n, _ in train)
    lines = [
        f"{args.config}, {args.iters} iterations, seeds {args.seeds}, mIoU (%) mean ± std "
        f"[per seed]; overrides: {' '.join(opts) or 'none'}",
        f"  {'train variant':<{width}} | " + " | ".join(name for name, _ in evals),
    ]
    for train_name, _ in train:
        cells = []
        for eval_name, _ in evals:
            values = results[train_name][eval_name]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            seeds = ", ".join(f"{v:.2f}" for v in values)
            cells.append(f"{statistics.mean(values):6.2f} ± {std:4.2f} [{seeds}]")
        lines.append(f"  {train_name:<{width}} | " + " | ".join(cells))
    print("\n" + "\n".join(lines))
    return results


if __name__ == "__main__":
    main()
