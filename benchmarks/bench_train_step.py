"""Time and peak memory of one training iteration: semi-supervised (every loss) vs
supervised-only, for the tiny config and the paper's ViT-B/16 config.

An iteration is the trainer's ``run_step``: fetch the named two-stream batch (mapping and
augmentation included, ``DATALOADER.NUM_WORKERS 0``), forward every loss, backward, AdamW
step. "semi" is the config as written (labelled + unlabelled streams: UniMatch
consistency, entropy, MaskCLIP guidance, L_prompt, L_mask, L_pt); "sup" turns
MODEL.HIERVL.SSL and the VL terms off (labelled stream and the supervised criterion only).

Each (config, mode) runs in two fresh subprocesses: one for the times, with the
allocator's default settings (as training runs), and one for the memory, so that one
case's freed memory cannot hide the next one's peak. Memory on CPU is the process's peak
resident set during an iteration after the warm-up minus its resident set just before it
(the kernel's high-water mark VmHWM, reset through /proc/self/clear_refs), with glibc's
mmap threshold fixed at 64 KiB so freed tensors leave the resident set (a setting that
costs page faults, hence not used for the times); on CUDA it is
``torch.cuda.max_memory_allocated`` above the memory allocated before the iteration.
Both are the memory one iteration adds on top of the model, its gradients and the AdamW
state (allocated by the warm-up). Times are medians over ``--iters`` iterations after
``--warmup`` ones.

    python benchmarks/bench_train_step.py --threads 1   # CPU
    python benchmarks/bench_train_step.py --configs tiny --iters 5
    python benchmarks/bench_train_step.py --device cuda --full-crop 512 --batch 2

The ViT-B/16 model is randomly initialised (MODEL.HIERVL.CLIP.PRETRAINED ""), so nothing
is downloaded; the data is the built-in synthetic dataset (generated on first use under
$DETECTRON2_DATASETS or ./datasets), rescaled so its images fill the crop.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Dict, List

from bench_utils import case_env, proc_status_kib, timed_pass

from hiervl.data.datasets.synthetic import CLASSES as SYNTHETIC_CLASSES
from hiervl.data.datasets.synthetic import DEFAULTS as SYNTHETIC_DEFAULTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "tiny": os.path.join(REPO, "configs", "tiny", "hiervl_tiny_16.yaml"),
    "full": os.path.join(REPO, "configs", "Base-HierVL.yaml"),
}
SUPERVISED_ONLY = [
    "MODEL.HIERVL.SSL.ENABLED", "False",
    "MODEL.HIERVL.VL.PROMPT_ENABLED", "False",
    "MODEL.HIERVL.VL.MASK_ENABLED", "False",
    "MODEL.HIERVL.VL.PT_ENABLED", "False",
]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "full"], choices=sorted(CONFIGS))
    p.add_argument("--modes", nargs="+", default=["sup", "semi"], choices=["sup", "semi"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=1, help="images per stream (labelled = unlab.)")
    p.add_argument("--tiny-crop", type=int, default=128, help="crop side of the tiny config")
    p.add_argument("--full-crop", type=int, default=256, help="crop side of the ViT-B/16 one")
    p.add_argument(
        "--num-classes",
        type=int,
        default=0,
        help="vocabulary size K (0: the synthetic dataset's 6 classes; more adds names to "
        "TEST.VOCABULARY, e.g. 21 for VOC-sized text queries)",
    )
    p.add_argument("--iters", type=int, default=3, help="timed iterations per case")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    p.add_argument("--measure", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def case_opts(args: argparse.Namespace, config: str, mode: str) -> List[str]:
    """Config overrides of one case."""
    crop = args.tiny_crop if config == "tiny" else args.full_crop
    scale = max(1.0, crop / SYNTHETIC_DEFAULTS["image_size"])
    opts = [
        "MODEL.DEVICE", args.device,
        "SOLVER.IMS_PER_BATCH_LABELED", str(args.batch),
        "SOLVER.IMS_PER_BATCH_UNLABELED", str(args.batch),
        "SOLVER.MAX_ITER", str(args.warmup + args.iters),
        "INPUT.CROP.SIZE", f"({crop}, {crop})",
        "INPUT.SCALE_RANGE", f"[{scale}, {scale}]",
        "DATALOADER.NUM_WORKERS", "0",
        "DATASETS.TRAIN_LABELED", "('synthetic_train_labeled_16',)",
        "DATASETS.TRAIN_UNLABELED", "('synthetic_train_unlabeled_16',)",
        "DATASETS.TEST", "('synthetic_val',)",
        "MODEL.HIERVL.CLIP.PRETRAINED", "",
        "OUTPUT_DIR", os.path.join("/tmp", f"bench_train_step_{config}_{mode}"),
    ]  # fmt: skip
    if args.num_classes > len(SYNTHETIC_CLASSES):
        names = list(SYNTHETIC_CLASSES)
        names += [f"extra class {i}" for i in range(args.num_classes - len(names))]
        opts += ["TEST.VOCABULARY", repr(names)]
    return opts + (SUPERVISED_ONLY if mode == "sup" else [])


# ----------------------------------------------------------------------------- one case
def run_case(args: argparse.Namespace) -> Dict[str, object]:
    """Build the trainer of one case, run its iterations, return the measurements."""
    import torch
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    from hiervl.engine.launcher import setup_cfg
    from hiervl.engine.trainer import HierVLTrainer

    config, mode = args.case.split(":")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(CONFIGS[config], case_opts(args, config, mode))
    seed_all_rng(cfg.SEED)
    trainer = HierVLTrainer(cfg)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    cuda = args.device == "cuda"
    times, peaks, data_times = [], [], []
    loss_terms: List[str] = []
    memory = args.measure == "memory"
    with EventStorage(0) as storage:
        for it in range(args.warmup + (1 if memory else args.iters)):
            trainer.iter = trainer._trainer.iter = storage.iter = it
            elapsed, peak = timed_pass(trainer.run_step, cuda, memory=memory)
            if it < args.warmup:
                continue
            times.append(elapsed)
            data_times.append(storage.history("data_time").latest())
            if peak is not None:
                peaks.append(peak)
        loss_terms = sorted(k for k in storage.histories() if k.startswith("loss_"))
    return {
        "config": config,
        "mode": mode,
        "time_s": statistics.median(times),
        "data_s": statistics.median(data_times),
        "peak_mib": max(peaks) if peaks else float("nan"),
        "process_peak_mib": (
            torch.cuda.max_memory_allocated() / 2**20
            if cuda
            else (proc_status_kib("VmHWM") or 0) / 2**10
        ),
        "trainable_params": trainable,
        "num_classes": len(trainer.model.model.class_names),
        "loss_terms": loss_terms,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- driver
def run_subprocess(args: argparse.Namespace, config: str, mode: str) -> Dict[str, object]:
    """Times from a process with default allocator settings, memory from one with the
    mmap threshold of ``case_env``."""
    results = {}
    for measure in ("time", "memory"):
        command = [sys.executable, os.path.abspath(__file__), "--case", f"{config}:{mode}"]
        flags = ("device", "batch", "tiny_crop", "full_crop", "num_classes", "iters", "warmup")
        for flag in flags + ("threads", "measure"):
            value = measure if flag == "measure" else getattr(args, flag)
            command += [f"--{flag.replace('_', '-')}", str(value)]
        env = case_env(memory=measure == "memory")
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"case {config}:{mode} ({measure}) failed:\n{proc.stderr[-4000:]}")
        results[measure] = json.loads(proc.stdout.strip().splitlines()[-1])
    result = results["time"]
    result["peak_mib"] = results["memory"]["peak_mib"]
    result["process_peak_mib"] = results["memory"]["process_peak_mib"]
    return result


def _count_by_prefix(terms: List[str]) -> str:
    counts: Dict[str, int] = {}
    for term in terms:
        prefix = "_".join(term.split("_")[:2]) + "_*"
        counts[prefix] = counts.get(prefix, 0) + 1
    return ", ".join(f"{n} {prefix}" for prefix, n in counts.items())


def print_table(args: argparse.Namespace, results: Dict[tuple, Dict[str, object]]) -> None:
    import torch

    print(
        f"\ntrain step, device {args.device}, {args.batch}+{args.batch} images "
        f"(labelled+unlabelled), median of {args.iters} after {args.warmup} warm-up; "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"| config | crop | K | mode | loss terms | step (s) | data (s) | {memory} |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for (config, mode), r in results.items():
        crop = args.tiny_crop if config == "tiny" else args.full_crop
        print(
            f"| {config} | {crop} | {r['num_classes']} | {mode} | {len(r['loss_terms'])} | "
            f"{r['time_s']:.3f} | {r['data_s']:.3f} | {r['peak_mib']:.0f} |"
        )
    print("\n| config | time semi/sup | memory semi/sup |")
    print("|---|---:|---:|")
    for config in args.configs:
        sup, semi = results.get((config, "sup")), results.get((config, "semi"))
        if sup and semi:
            print(
                f"| {config} | {semi['time_s'] / sup['time_s']:.2f}× | "
                f"{semi['peak_mib'] / sup['peak_mib']:.2f}× |"
            )
    for (config, mode), r in results.items():
        print(
            f"\n{config}/{mode}: {r['trainable_params'] / 1e6:.1f} M trainable parameters, "
            f"{r['threads']} threads, process peak {r['process_peak_mib']:.0f} MiB; "
            f"terms: {_count_by_prefix(r['loss_terms'])}"
        )


def main() -> None:
    args = parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    results = {}
    for config in args.configs:
        for mode in args.modes:
            print(f"running {config}/{mode} ...", file=sys.stderr, flush=True)
            results[(config, mode)] = run_subprocess(args, config, mode)
    print_table(args, results)


if __name__ == "__main__":
    main()
