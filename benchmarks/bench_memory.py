"""Peak memory of the full semi-supervised step at 512² against the batch size, with and
without activation checkpointing, in fp32 and under bf16 autocast; extrapolated to the
paper's 8 + 8 images.

The step is ``plain_step.train_step`` (the objective with every loss term, backward, AdamW)
on the ViT-B/16 model of ``configs/Base-HierVL.yaml`` (random init, K = 21). Each case runs
in a fresh process with glibc's mmap threshold at 64 KiB (freed tensors leave the resident
set). The process first allocates what a previous step leaves behind (every gradient and
the AdamW state, ``prime_optimizer``), then runs one step; "added" is the peak resident set
during that step minus the resident set before it. On a GPU the same step needs about
weights + gradients + AdamW state + added (``torch.cuda.max_memory_allocated``; the CUDA
context, ~0.5 GB, comes on top). Per (precision, checkpointing) the added memory is fitted
as a + b·B over the measured batch sizes and extrapolated to B = 8.

This machine is shared: every case process is killed when its resident set passes
``--rss-limit-gib``, and a case is not started when the linear trend of the smaller batches
predicts more than that limit or than the memory available now (it is reported as skipped,
with the prediction).

    nice -n 10 python benchmarks/bench_memory.py                       # the whole grid
    python benchmarks/bench_memory.py --time-rounds 2 --batches 1 --size 256   # time cost
    python benchmarks/bench_memory.py --batches 1 --precisions fp32 --size 128   # quick
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from bench_utils import case_env, proc_status_kib, reset_peak_rss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT_MODES = ("off", "all", "image_encoder", "pixel_decoder", "decoder")
GIB = 2**30
MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="images per stream")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--checkpointing", nargs="+", default=["off", "all"], choices=CHECKPOINT_MODES)
    p.add_argument("--size", type=int, default=512, help="crop side")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rss-limit-gib", type=float, default=12.0)
    p.add_argument("--extrapolate-to", type=int, default=8)
    p.add_argument(
        "--time-rounds",
        type=int,
        default=0,
        help="instead of memory: time the step with checkpointing off and on, alternating in "
        "one process (same weights), this many rounds after a warm-up round",
    )
    p.add_argument(
        "--from-log",
        nargs="+",
        metavar="FILE",
        help="print the tables from the case lines earlier runs wrote to stderr (no new runs)",
    )
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: "B:precision:checkpointing"
    return p.parse_args(argv)


def checkpoint_overrides(mode: str) -> Dict[str, bool]:
    from plain_step import CHECKPOINT_ALL

    if mode == "off":
        return {}
    if mode == "all":
        return dict(CHECKPOINT_ALL)
    return {f"MODEL.HIERVL.CHECKPOINTING.{mode.upper()}": True}


# ----------------------------------------------------------------------------- one case
def _guard(limit_kib: int) -> None:
    """Kill this process (exit 3, one JSON line) when its resident set passes the limit."""

    def watch():
        while True:
            rss = proc_status_kib("VmRSS") or 0
            if rss > limit_kib:
                print(json.dumps({"error": f"resident set passed {limit_kib / 2**20:.1f} GiB"}))
                sys.stdout.flush()
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def run_case(args: argparse.Namespace) -> Dict[str, object]:
    import gc

    import torch
    from plain_step import build_trainee, default_cfg, named_batch, prime_optimizer, state_bytes

    _guard(int(args.rss_limit_gib * 2**20))
    batch, precision, mode = args.case.split(":")
    batch = int(batch)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trainee = build_trainee(default_cfg(checkpoint_overrides(mode)), "cpu")
    labeled, unlabeled = named_batch(batch, batch, args.size, 21, "cpu")
    prime_optimizer(trainee)
    gc.collect()
    from plain_step import train_step

    before = proc_status_kib("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    losses = train_step(trainee, labeled, unlabeled, precision=precision)
    elapsed = time.perf_counter() - start
    peak = proc_status_kib("VmHWM")
    if not reset or before is None or peak is None:
        raise RuntimeError("peak resident set not measurable here (needs Linux /proc)")
    return {
        "batch": batch,
        "precision": precision,
        "checkpointing": mode,
        "step_s": elapsed,
        "rss_before_mib": before / 1024,
        "added_mib": (peak - before) / 1024,
        "state_mib": {k: v / MIB for k, v in state_bytes(trainee).items()},
        "loss_terms": len(losses),
        "finite": all(v == v for v in losses.values()),
    }


def time_checkpointing(args: argparse.Namespace) -> None:
    """Step times with every checkpoint switch off and on, alternating on one model (so a
    slow spell of the machine hits both); the first round is a warm-up."""
    import statistics

    import torch
    from plain_step import build_trainee, default_cfg, named_batch, timed, train_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trainee = build_trainee(default_cfg(), "cpu")
    batch = args.batches[0]
    labeled, unlabeled = named_batch(batch, batch, args.size, 21, "cpu")
    model = trainee.model
    precision = args.precisions[0]
    times = {"off": [], "all": []}
    for round_ in range(args.time_rounds + 1):
        for mode in times:
            on = mode == "all"
            model.backbone.set_grad_checkpointing(on)
            model.pixel_decoder.checkpointing = model.decoder.checkpointing = on
            seconds, _ = timed(
                lambda: train_step(trainee, labeled, unlabeled, precision=precision), "cpu"
            )
            print(
                f"round {round_} checkpointing {mode}: {seconds:.1f} s", file=sys.stderr, flush=True
            )
            if round_ > 0:
                times[mode].append(seconds)
    off, on = statistics.median(times["off"]), statistics.median(times["all"])
    print(
        f"\nstep time, {batch}+{batch} at {args.size}x{args.size}, {args.precisions[0]}, "
        f"{args.threads} thread(s), median of {args.time_rounds} alternating rounds\n"
    )
    print("| checkpointing | step (s) | rounds (s) |\n|---|---:|---|")
    for mode, value in (("off", off), ("all", on)):
        print(f"| {mode} | {value:.1f} | {' '.join(f'{t:.1f}' for t in times[mode])} |")
    print(f"\ncheckpointing costs {100 * (on / off - 1):+.0f}% step time")


# ----------------------------------------------------------------------------- driver
def mem_available_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def fit(points: List[Dict[str, object]]):
    """Least-squares (a, b) of added_mib = a + b·B, or None with fewer than two batches."""
    xs = [p["batch"] for p in points]
    ys = [p["added_mib"] for p in points]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def predicted_rss_gib(done: List[Dict[str, object]], batch: int) -> Optional[float]:
    """Resident set the trend of ``done`` (same precision and mode) predicts for ``batch``."""
    if not done:
        return None
    line = fit(done)
    base = done[-1]["rss_before_mib"]
    if line is None:  # one point: activations proportional to the batch
        added = done[-1]["added_mib"] * batch / done[-1]["batch"]
    else:
        added = line[0] + line[1] * batch
    return (base + added) / 1024


def run_subprocess(args: argparse.Namespace, case: str) -> Dict[str, object]:
    command = [sys.executable, os.path.abspath(__file__), "--case", case]
    for flag in ("size", "threads", "rss_limit_gib"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(
        command, cwd=REPO, env=case_env(memory=True), capture_output=True, text=True
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 3 and lines:
        return json.loads(lines[-1])
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def print_tables(args, results: Dict[tuple, Dict[str, object]]) -> None:
    print(f"\nfull semi-supervised step, {args.size}x{args.size}, K = 21, CPU, {args.threads} "
          "thread(s); memory in GiB\n")  # fmt: skip
    print("| images (l+u) | precision | checkpointing | step (s) | RSS before | added (peak) "
          "| weights+grads+AdamW | GPU estimate |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for (batch, precision, mode), r in results.items():
        label = f"| {batch}+{batch} | {precision} | {mode} |"
        if "error" in r or "skipped" in r:
            print(f"{label} - | - | {r.get('error') or r['skipped']} | - | - |")
            continue
        state = sum(r["state_mib"].values()) / 1024
        added = r["added_mib"] / 1024
        print(f"{label} {r['step_s']:.1f} | {r['rss_before_mib'] / 1024:.2f} | {added:.2f} "
              f"| {state:.2f} | {state + added:.2f} |")  # fmt: skip
    print(f"\nlinear trend added = a + b·B, B image pairs (least squares); extrapolated to "
          f"{args.extrapolate_to}+{args.extrapolate_to}\n")  # fmt: skip
    print(
        "| precision | checkpointing | batches measured | a (GiB) | b (GiB/pair) "
        f"| added at {args.extrapolate_to}+{args.extrapolate_to} | GPU estimate |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for precision in args.precisions:
        for mode in args.checkpointing:
            points = [r for (_, p, m), r in results.items()
                      if p == precision and m == mode and "added_mib" in r]  # fmt: skip
            if not points:
                continue
            line = fit(points)
            batches = ",".join(str(p["batch"]) for p in points)
            if line is None:  # one batch size: activations taken proportional to it
                line = (0.0, points[0]["added_mib"] / points[0]["batch"])
                batches += " (a = 0 assumed)"
            a, b = line[0] / 1024, line[1] / 1024
            added = a + b * args.extrapolate_to
            state = sum(points[0]["state_mib"].values()) / 1024
            print(f"| {precision} | {mode} | {batches} | {a:.2f} | {b:.2f} | {added:.1f} "
                  f"| {state + added:.1f} |")  # fmt: skip


def results_from_logs(args: argparse.Namespace) -> Dict[tuple, Dict[str, object]]:
    """The case results in the given stderr logs (the last line of each case wins)."""
    results: Dict[tuple, Dict[str, object]] = {}
    for path in args.from_log:
        with open(path) as f:
            for line in f:
                if line.startswith('{"case"'):
                    entry = json.loads(line)
                    results[tuple(entry.pop("case"))] = entry
    args.precisions = list(dict.fromkeys(p for _, p, _ in results))
    args.checkpointing = list(dict.fromkeys(m for _, _, m in results))
    return dict(sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])))


def main() -> None:
    args = parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    if args.from_log:
        print_tables(args, results_from_logs(args))
        return
    if args.time_rounds:
        time_checkpointing(args)
        return
    results: Dict[tuple, Dict[str, object]] = {}
    for precision in args.precisions:
        for mode in args.checkpointing:
            for batch in sorted(args.batches):
                key = (batch, precision, mode)
                done = [r for (_, p, m), r in results.items()
                        if p == precision and m == mode and "added_mib" in r]  # fmt: skip
                guess = predicted_rss_gib(done, batch)
                free = mem_available_gib()
                if guess is not None and guess > args.rss_limit_gib:
                    results[key] = {"skipped": f"predicted {guess:.1f} GiB > limit"}
                elif guess is not None and free is not None and guess > free - 1:
                    results[key] = {"skipped": f"predicted {guess:.1f} GiB, {free:.1f} free"}
                else:
                    print(f"case {batch}+{batch} {precision} checkpointing {mode} ...",
                          file=sys.stderr, flush=True)  # fmt: skip
                    results[key] = run_subprocess(args, f"{batch}:{precision}:{mode}")
                print(json.dumps({"case": list(key), **results[key]}), file=sys.stderr, flush=True)
    print_tables(args, results)


if __name__ == "__main__":
    main()
