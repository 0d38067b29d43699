"""The quickstart over several seeds: semi-supervised vs labelled-only mIoU, per seed and
on the mean, with its spread (the acceptance of issue 12: semi-supervised ahead in every
seed, by >= 5 mIoU on the mean).

Each seed is one ``python -m hiervl.quickstart --seed N`` (its own labelled split, SEED N);
the CLIP pretraining is shared (cached in ``<output>/clip``), so only the first seed pays
for it. Runs already finished in ``<output>/seed<N>/metrics.json`` are reused unless
``--fresh``.

    python benchmarks/quickstart_seeds.py [--seeds 0 1 2 3 4] [--output output/quickstart_seeds]
        [--fresh] [-- quickstart options, e.g. --iters 400 SOLVER.BASE_LR 0.001]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--output", default=os.path.join(REPO, "output", "quickstart_seeds"))
    p.add_argument("--fresh", action="store_true", help="rerun seeds that already have results")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="after --: quickstart arguments")
    args = p.parse_args(argv)
    if args.rest[:1] == ["--"]:
        args.rest = args.rest[1:]
    return args


def run_seed(args, seed: int) -> dict:
    out = os.path.join(args.output, f"seed{seed}")
    path = os.path.join(out, "metrics.json")
    if os.path.isfile(path) and not args.fresh:
        with open(path) as f:
            return {**json.load(f), "reused": True}
    clip_dir = os.path.join(args.output, "clip")
    command = [sys.executable, "-m", "hiervl.quickstart", "--seed", str(seed),
               "--output-dir", out, "--clip-dir", clip_dir, *args.rest]  # fmt: skip
    print(f"[quickstart_seeds] seed {seed}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    log_path = os.path.join(args.output, f"seed{seed}.log")
    os.makedirs(args.output, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} failed (exit {proc.returncode}); see {log_path}")
    with open(path) as f:
        result = json.load(f)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv=None):
    args = parse_args(argv)
    results = {seed: run_seed(args, seed) for seed in args.seeds}
    first = next(iter(results.values()))
    print(
        f"\nquickstart over {len(results)} seeds: mIoU (%) on {first['val_dataset']}, "
        f"{first['iterations']} iterations, {first['labeled_dataset']} (+ split seeds); "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    machine = first.get("machine")
    if machine:  # runs of older versions did not record it
        print(f"machine: torch {machine['torch']}, CPU kernels {machine['cpu_capability']}")
    print()
    print("| seed | semi-supervised | labelled only | gain | majority | min (all) | CLIP |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    gains, semis, sups = [], [], []
    for seed, r in results.items():
        semi, sup = r["semi_supervised"]["mIoU"], r["labeled_only"]["mIoU"]
        gains.append(semi - sup)
        semis.append(semi)
        sups.append(sup)
        clip = r["clip"]
        clip = ("given" if not clip["pretrained_here"] else "reused" if clip["reused"]
                else f"trained {clip['seconds'] / 60:.1f} min")  # fmt: skip
        minutes = f"{r['seconds'] / 60:.1f}" + (" (earlier run)" if r.get("reused") else "")
        print(
            f"| {seed} | {semi:.2f} | {sup:.2f} | {semi - sup:+.2f} | "
            f"{r['majority_class']['mIoU']:.2f} | {minutes} | {clip} |"
        )

    def spread(values):
        return statistics.stdev(values) if len(values) > 1 else 0.0

    print(
        f"| mean ± std | {statistics.mean(semis):.2f} ± {spread(semis):.2f} | "
        f"{statistics.mean(sups):.2f} ± {spread(sups):.2f} | "
        f"{statistics.mean(gains):+.2f} ± {spread(gains):.2f} | | | |"
    )
    ahead = sum(g > 0 for g in gains)
    print(
        f"\nsemi-supervised ahead in {ahead} of {len(gains)} seeds; gain min {min(gains):+.2f}, "
        f"max {max(gains):+.2f}, mean {statistics.mean(gains):+.2f}"
    )
    return results


if __name__ == "__main__":
    main()
