"""Inference latency of one HierVL window: eager PyTorch, onnxruntime, torch.compile.

The full CLIP ViT-B/16 model (``configs/Base-HierVL.yaml``, randomly initialised: nothing
is downloaded; Pascal VOC's 21 classes), batch 1, one ``--size``² window (512 by default)
on the CPU, the same synthetic scene for every runtime:

- **eager (compiled op)**: ``HierVLModel.predict_scores`` with the compiled MSDeformAttn
  CPU kernel (``hiervl._C``; the row says so when the kernel is not built);
- **eager (reference op)**: the same under ``hiervl.ops.reference_kernel()`` (grid_sample);
- **onnxruntime**: the file ``hiervl.tools.export`` writes (``--onnx FILE``, or exported
  here first), CPU execution provider, ``--ort-opt`` graph optimisation;
- **torch.compile**: inductor on the export-mode window (``StaticWindow``, fixed sizes,
  reference op: the compiled kernel is no traceable op); the row says why when it fails.

Times are medians of ``--iters`` runs after ``--warmup``, all runtimes interleaved in one
process (A B C D A B C D ...), so a slow spell of a shared machine hits them alike; the
memory is measured per runtime in a process of its own (peak resident set a forward adds,
and what the loaded model holds). ``--profile`` adds onnxruntime's profiler: time per
operator type and the slowest nodes of one run. Also printed: max |Δscore| and argmax
agreement of each runtime against eager PyTorch (compiled op).

    python benchmarks/bench_inference.py                       # 512², all runtimes
    python benchmarks/bench_inference.py --onnx hiervl.onnx --profile
    python benchmarks/bench_inference.py --size 256 --iters 3  # quicker
    python benchmarks/bench_inference.py --config-file configs/tiny/hiervl_tiny_16.yaml \
        --size 128                                              # the tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

from bench_utils import case_env, proc_status_kib, timed_pass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
CONFIG = os.path.join(REPO, "configs", "Base-HierVL.yaml")
OPTS = ["MODEL.HIERVL.CLIP.PRETRAINED", "", "MODEL.DEVICE", "cpu"]
RUNTIMES = ("eager-compiled-op", "eager-reference-op", "onnxruntime", "torch.compile")
ORT_LEVELS = ("all", "extended", "basic", "disable")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", default=CONFIG, help="model config (default: ViT-B/16)")
    p.add_argument("--size", type=int, default=512, help="window side (pixels)")
    p.add_argument("--num-classes", type=int, default=21, help="vocabulary size K")
    p.add_argument("--iters", type=int, default=5, help="timed runs per runtime")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="threads of every runtime (0: cores)")
    p.add_argument("--onnx", help="an exported file of this model (default: export here)")
    p.add_argument("--ort-opt", default="all", choices=ORT_LEVELS, help="ORT graph optimisation")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--profile", action="store_true", help="onnxruntime profile of one run")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: "times" or a runtime
    return p.parse_args(argv)


def vocabulary(num_classes: int) -> List[str]:
    from hiervl.data.datasets.voc import CLASSES

    names = list(CLASSES)[:num_classes]
    return names + [f"extra class {i}" for i in range(num_classes - len(names))]


def threads(args) -> int:
    return args.threads or len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------ one runtime
class _Runtimes:
    """The input, the model (built on first use) and a callable per runtime."""

    def __init__(self, args: argparse.Namespace):
        import numpy as np
        import torch

        from hiervl.data.datasets.synthetic import render_sample
        from hiervl.engine.launcher import setup_cfg

        torch.set_num_threads(threads(args))
        opts = OPTS + ["TEST.VOCABULARY", repr(vocabulary(args.num_classes))]
        self.cfg = setup_cfg(args.config_file, opts)
        scene = render_sample(0, "val", 0, args.size)[0].transpose(2, 0, 1)
        image = torch.from_numpy(np.ascontiguousarray(scene)).float()[None]
        mean = torch.tensor(self.cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
        self.images = (image - mean) / std
        self.args = args
        self.notes: Dict[str, str] = {}
        self._model = None

    @property
    def model(self):
        """The HierVLModel, seeded as ``hiervl.tools.export`` builds it (same weights)."""
        if self._model is None:
            import torch
            from detectron2.utils.env import seed_all_rng

            from hiervl.engine.trainer import HierVLTrainer

            seed_all_rng(0)
            self._model = HierVLTrainer.build_model(self.cfg).eval().model
            self.text = tuple(t.detach() for t in self._model.class_embeddings())
            torch.set_num_threads(threads(self.args))
        return self._model

    def build(self, name: str):
        """A zero-argument callable returning (1,K,H,W) numpy scores, or None (+ a note)."""
        import torch

        from hiervl.ops import compiled_available, reference_kernel

        if name == "eager-compiled-op":
            if not compiled_available("cpu"):
                self.notes[name] = "hiervl._C not built: this row ran the reference"

            model = self.model

            def run():
                with torch.no_grad():
                    return model.predict_scores(self.images, self.text).numpy()

            return run
        if name == "eager-reference-op":
            model = self.model

            def run():
                with torch.no_grad(), reference_kernel():
                    return model.predict_scores(self.images, self.text).numpy()

            return run
        if name == "onnxruntime":
            return self._onnxruntime()
        if name == "torch.compile":
            return self._compiled()
        raise ValueError(name)

    def _onnxruntime(self):
        import onnxruntime as ort

        level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.args.ort_opt]
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = threads(self.args)
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            self.args.onnx, sess_options=options, providers=["CPUExecutionProvider"]
        )
        feed = {"images": self.images.numpy()}
        self.session = session
        return lambda: session.run(None, feed)[0]

    def _compiled(self):
        import torch

        from hiervl.modeling.static_window import StaticWindow
        from hiervl.ops import reference_kernel

        if self.args.no_compile:
            self.notes["torch.compile"] = "skipped (--no-compile)"
            return None
        size = self.args.size
        window = StaticWindow(model=self.model, height=size, width=size)
        try:
            compiled = torch.compile(window, dynamic=False)
            with torch.no_grad(), reference_kernel():
                compiled(self.images)  # compile now, not in the first timed run
        except Exception as e:  # any failure of the compiler stack is the finding
            self.notes["torch.compile"] = f"failed on torch {torch.__version__}: " + (
                f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            )
            return None

        def run():
            with torch.no_grad(), reference_kernel():
                return compiled(self.images).numpy()

        return run


def run_times(args: argparse.Namespace) -> Dict[str, object]:
    """Every runtime in this process, interleaved; medians after the warm-up; agreement of
    each with eager (compiled op)."""
    import numpy as np

    from hiervl.tools.onnx_export import score_agreement

    rt = _Runtimes(args)
    runs = {name: rt.build(name) for name in RUNTIMES}
    runs = {k: v for k, v in runs.items() if v is not None}
    times: Dict[str, List[float]] = {k: [] for k in runs}
    outputs: Dict[str, np.ndarray] = {}
    for i in range(args.warmup + args.iters):
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    reference = outputs["eager-compiled-op"]
    result = {"notes": rt.notes, "threads": threads(args), "runtimes": {}}
    for name in runs:
        delta, agree = score_agreement(reference, outputs[name])
        result["runtimes"][name] = {
            "median_ms": 1000 * statistics.median(times[name]),
            "runs_ms": [1000 * t for t in times[name]],
            "max_delta": delta,
            "agreement": agree,
        }
    if args.profile and "onnxruntime" in runs:
        result["profile"] = profile_onnxruntime(args, rt.images.numpy())
    return result


def run_memory(args: argparse.Namespace, name: str) -> Dict[str, object]:
    """MiB the runtime holds once loaded and run once (resident set above this process
    with the libraries and the input only; the eager model is not built for onnxruntime)
    and the peak a forward adds (max over warm-up + 1 runs)."""
    rt = _Runtimes(args)
    before = proc_status_kib("VmRSS")
    fn = rt.build(name)
    if fn is None:
        return {"note": rt.notes.get(name, "")}
    fn()
    loaded = (proc_status_kib("VmRSS") - before) / 1024
    peaks = [timed_pass(fn, cuda=False)[1] for _ in range(args.warmup + 1)]
    return {"forward_mib": max(p for p in peaks if p is not None), "loaded_mib": loaded}


def profile_onnxruntime(args: argparse.Namespace, images) -> Dict[str, object]:
    """One profiled run: total ms per operator type and the ten slowest nodes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads(args)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = ort.InferenceSession(
        args.onnx, sess_options=options, providers=["CPUExecutionProvider"]
    )
    session.run(None, {"images": images})
    session.run(None, {"images": images})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    runs = [e for e in events if e.get("name") == "model_run"]
    last_start = runs[-1]["ts"] if runs else 0
    by_type: Dict[str, float] = {}
    nodes = []
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if e["ts"] < last_start:
            continue  # the first run includes one-off allocations
        op = e.get("args", {}).get("op_name", "?")
        by_type[op] = by_type.get(op, 0.0) + e["dur"] / 1000
        nodes.append((e["dur"] / 1000, op, e["name"][: -len("_kernel_time")]))
    nodes.sort(reverse=True)
    return {"by_type_ms": by_type, "top_nodes": nodes[:10]}


def run_case(args: argparse.Namespace) -> Dict[str, object]:
    if args.case == "times":
        return run_times(args)
    return run_memory(args, args.case)


# ----------------------------------------------------------------------------- driver
def export_file(args: argparse.Namespace, folder: str) -> str:
    """Export the benchmark's model with ``hiervl.tools.export`` (same seed and config)."""
    path = os.path.join(folder, f"hiervl_{args.size}.onnx")
    command = [sys.executable, "-m", "hiervl.tools.export", "--config-file", args.config_file]
    command += OPTS + ["TEST.VOCABULARY", repr(vocabulary(args.num_classes))]
    command += ["--size", str(args.size), str(args.size), "--output", path, "--check-images", "0"]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"export failed:\n{proc.stderr[-4000:]}")
    print(f"  exported {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def run_subprocess(args: argparse.Namespace, case: str) -> Dict[str, object]:
    command = [sys.executable, os.path.abspath(__file__), "--case", case, "--onnx", args.onnx]
    for flag in ("config_file", "size", "num_classes", "iters", "warmup", "threads", "ort_opt"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for flag in ("no_compile", "profile"):
        if getattr(args, flag):
            command.append(f"--{flag.replace('_', '-')}")
    env = case_env(memory=case != "times")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_tables(args, times: Dict[str, object], memory: Dict[str, Dict[str, object]]) -> None:
    import onnxruntime
    import torch

    print(
        f"\nbatch 1, {args.size}x{args.size}, K = {args.num_classes}, CPU "
        f"({platform.processor() or platform.machine()}), {times['threads']} threads, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__} "
        f"(graph optimisation: {args.ort_opt})"
    )
    print("\n| runtime | median ms/image | runs (ms) | loaded (MiB) "
          "| forward peak (MiB) | max abs dscore | argmax agreement |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|")
    rows = times["runtimes"]
    base = rows["eager-compiled-op"]["median_ms"]
    for name in RUNTIMES:
        mem = memory.get(name, {})
        if name not in rows:
            print(f"| {name} | - | {times['notes'].get(name, '')} | - | - | - | - |")
            continue
        r = rows[name]
        runs = " ".join(f"{v:.0f}" for v in r["runs_ms"])
        print(
            f"| {name} | {r['median_ms']:.0f} ({base / r['median_ms']:.2f}x) | {runs} "
            f"| {mem.get('loaded_mib', float('nan')):.0f} "
            f"| {mem.get('forward_mib', float('nan')):.0f} | {r['max_delta']:.1e} "
            f"| {100 * r['agreement']:.3f}% |"
        )
    print(
        "(Nx = speed relative to eager with the compiled op, > 1 is faster; loaded = resident "
        "memory the runtime adds once built and run once; forward peak = what a further "
        "forward adds on top)"
    )
    for name, note in times["notes"].items():
        print(f"note: {name}: {note}")
    if "onnxruntime" in rows:
        ratio = rows["onnxruntime"]["median_ms"] / base
        verdict = "met" if ratio <= 1.0 else "NOT met"
        print(f"\nonnxruntime / eager (compiled op) = {ratio:.2f} (target <= 1.00: {verdict})")
    profile = times.get("profile")
    if profile:
        total = sum(profile["by_type_ms"].values())
        print(f"\nonnxruntime profile (one run, {total:.0f} ms of kernel time):")
        print("| operator | ms | share |\n|---|---:|---:|")
        for op, ms in sorted(profile["by_type_ms"].items(), key=lambda kv: -kv[1])[:12]:
            print(f"| {op} | {ms:.0f} | {100 * ms / total:.1f}% |")
        print("slowest nodes:")
        for ms, op, node in profile["top_nodes"]:
            print(f"  {ms:8.1f} ms  {op:<18} {node}")


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    start = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="bench_inference_")
    if not args.onnx:
        print("exporting the model ...", file=sys.stderr, flush=True)
        args.onnx = export_file(args, folder)
    print("timing every runtime (interleaved) ...", file=sys.stderr, flush=True)
    times = run_subprocess(args, "times")
    memory = {}
    for name in RUNTIMES:
        if name in times["runtimes"]:
            print(f"memory of {name} ...", file=sys.stderr, flush=True)
            memory[name] = run_subprocess(args, name)
    print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print_tables(args, times, memory)


if __name__ == "__main__":
    main()
