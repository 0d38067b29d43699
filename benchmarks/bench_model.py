"""HierVL against its Mask2Former-equivalent ablation: parameters, GFLOPs, time, memory.

Two models, both the full CLIP ViT-B/16 config (``configs/Base-HierVL.yaml``, randomly
initialised: nothing is downloaded), measured side by side in one run:

- **hiervl**: the paper's model (HSQG, CMSAM, text + visual queries);
- **m2f-equivalent**: HSQG off, CMSAM off, visual queries only
  (``DECODER.TEXT_QUERIES False``), L_qt off: Mask2Former's pixel decoder and query set
  on the same backbone, classes scored by the same text-embedding classifier. Without
  HSQG the frozen CLIP copy E_I^0 does not run.

Per model, batch 1 at ``--size`` (512 by default):

- parameters, trainable and frozen;
- GFLOPs of the inference forward (fvcore; one multiply-add counts as one FLOP, as in
  Mask2Former's tables; the MSDeformAttn op is counted through its PyTorch reference,
  ``grid_sampler`` as 4 multiply-adds per sampled value; attention as its projections and
  two matmuls; element-wise ops are not counted, fvcore's default);
- forward: inference (eval, whole image, no sliding window, ``torch.no_grad``);
- forward+backward: the supervised training loss (Mask2Former criterion with deep
  supervision, plus L_rel / L_qt where the model has them) and its backward;
- peak memory each pass adds (resident set on CPU, ``max_memory_allocated`` on CUDA);
- the queries the decoder actually ran in each pass (text queries exist only for the
  classes some image keeps, see ``live_text_queries``).

Every model runs in two processes of its own: one for the times (and GFLOPs) with the
allocator's defaults, as training runs, and one for the memory with glibc's mmap
threshold at 64 KiB so that freed tensors leave the resident set (on CPU that setting
costs page faults, which would distort the times). Times are medians of ``--iters``
after ``--warmup``; the memory is the larger of ``--warmup`` + 1 passes' peaks after the
warm-up.
The vocabulary is Pascal VOC's 21 classes unless ``--num-classes`` says otherwise.

    python benchmarks/bench_model.py                       # CPU, 512x512
    python benchmarks/bench_model.py --size 256 --iters 2  # quicker
    python benchmarks/bench_model.py --device cuda
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List

from bench_utils import case_env, timed_pass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "Base-HierVL.yaml")
COMMON = [
    "MODEL.HIERVL.CLIP.PRETRAINED", "",
    "MODEL.HIERVL.SSL.ENABLED", "False",
    "MODEL.HIERVL.VL.PROMPT_ENABLED", "False",
    "MODEL.HIERVL.VL.MASK_ENABLED", "False",
    "MODEL.HIERVL.VL.PT_ENABLED", "False",
    "TEST.SLIDING_WINDOW.ENABLED", "False",
]  # fmt: skip
MODELS = {
    "hiervl": [],
    "m2f-equivalent": [
        "MODEL.HIERVL.HSQG.ENABLED", "False",
        "MODEL.HIERVL.CMSAM.ENABLED", "False",
        "MODEL.HIERVL.DECODER.TEXT_QUERIES", "False",
        "MODEL.HIERVL.LOSS.QT_WEIGHT", "0.0",
    ],
}  # fmt: skip
TARGET_OVERHEAD = 0.15  # issue 3: HierVL's additions <= 15% over the ablation (fwd+bwd)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", type=int, default=512, help="input side (pixels)")
    p.add_argument("--num-classes", type=int, default=21, help="vocabulary size K")
    p.add_argument("--iters", type=int, default=5, help="timed runs of each pass")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--no-flops", action="store_true", help="skip the fvcore count")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: "times" or a model name
    return p.parse_args(argv)


def vocabulary(num_classes: int) -> List[str]:
    from hiervl.data.datasets.voc import CLASSES

    names = list(CLASSES)[:num_classes]
    return names + [f"extra class {i}" for i in range(num_classes - len(names))]


# ----------------------------------------------------------------------------- one model
def _sample(size: int, num_classes: int, seed: int = 0) -> Dict[str, object]:
    """A labelled 512-style input: random pixels, a label map of four class blocks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.zeros(size, size, dtype=torch.long)
    half = size // 2
    for i, k in enumerate(torch.randperm(num_classes, generator=g)[:4].tolist()):
        labels[(i // 2) * half : (i // 2 + 1) * half, (i % 2) * half : (i % 2 + 1) * half] = k
    return {"image": image, "sem_seg": labels, "height": size, "width": size}


def _flop_handles():
    """fvcore handles for the ops its defaults skip but that matter here."""
    from fvcore.nn.jit_handles import get_shape

    def grid_sampler(inputs, outputs):
        out = get_shape(outputs[0])  # (N, C, Hout, Wout)
        count = 4  # bilinear: four weighted taps per sampled value
        for d in out:
            count *= d
        return count

    def sdpa(inputs, outputs):
        q, k = get_shape(inputs[0]), get_shape(inputs[1])  # (..., Nq, d), (..., Nk, d)
        batch = 1
        for d in q[:-2]:
            batch *= d
        return 2 * batch * q[-2] * k[-2] * q[-1]  # Q K^T and (softmax) V

    def native_mha(inputs, outputs):
        # nn.MultiheadAttention's fused path (open_clip's towers in eval), batch first:
        # query (N, L, E), key (N, S, E); in-projection 3E x E, out-projection E x E.
        q, k = get_shape(inputs[0]), get_shape(inputs[1])
        n, length, width = q
        source = k[1]
        projections = n * length * 4 * width * width
        return projections + 2 * n * length * source * width

    return {
        "aten::grid_sampler": grid_sampler,
        "aten::scaled_dot_product_attention": sdpa,
        "aten::_native_multi_head_attention": native_mha,
    }


def count_gflops(meta, sample) -> Dict[str, object]:
    """fvcore GFLOPs of the inference forward; the op runs its reference for tracing."""
    import torch
    from fvcore.nn import FlopCountAnalysis

    from hiervl.ops import _ext

    class Inference(torch.nn.Module):
        def __init__(self, meta):
            super().__init__()
            self.meta = meta

        def forward(self, image):
            item = {"image": image, "height": sample["height"], "width": sample["width"]}
            return self.meta([item])[0]["sem_seg"]

    original = _ext.compiled_available
    _ext.compiled_available = lambda device: False
    try:
        analysis = FlopCountAnalysis(Inference(meta).eval(), (sample["image"],))
        analysis.set_op_handle(**_flop_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        with torch.no_grad():
            total = analysis.total()
        skipped = dict(analysis.unsupported_ops())
    finally:
        _ext.compiled_available = original
    return {"gflops": total / 1e9, "skipped_ops": skipped}


class _Case:
    """One model of the comparison, built from its config, with its two passes."""

    def __init__(self, name: str, args: argparse.Namespace):
        from detectron2.utils.env import seed_all_rng

        from hiervl.engine.launcher import setup_cfg
        from hiervl.engine.trainer import HierVLTrainer

        opts = COMMON + MODELS[name] + ["MODEL.DEVICE", args.device]
        opts += ["TEST.VOCABULARY", repr(vocabulary(args.num_classes))]
        seed_all_rng(0)
        self.name = name
        self.meta = HierVLTrainer.build_model(setup_cfg(CONFIG, opts))
        self.sample = _sample(args.size, args.num_classes)
        self.loss_terms: List[str] = []
        self.queries: Dict[str, set] = {"forward": set(), "train": set()}
        self._pass = "forward"
        self.meta.model.decoder.register_forward_hook(self._record_queries)

    def _record_queries(self, module, inputs, output) -> None:
        self.queries[self._pass].add(int(output["pred_logits"].shape[1]))

    def forward(self) -> None:
        """Inference: eval, whole image, no grad."""
        import torch

        self._pass = "forward"
        self.meta.eval()
        with torch.no_grad():
            self.meta([{k: self.sample[k] for k in ("image", "height", "width")}])

    def forward_backward(self) -> None:
        """The supervised training loss and its backward."""
        self._pass = "train"
        self.meta.train()
        self.meta.zero_grad(set_to_none=True)
        losses = self.meta([self.sample])
        self.loss_terms = sorted(k for k, v in losses.items() if float(v) != 0)
        sum(losses.values()).backward()

    def description(self) -> Dict[str, object]:
        decoder = self.meta.model.decoder
        text = len(self.meta.model.class_names) * decoder.num_text_levels
        return {
            "trainable_params": sum(p.numel() for p in self.meta.parameters() if p.requires_grad),
            "frozen_params": sum(p.numel() for p in self.meta.parameters() if not p.requires_grad),
            "loss_terms": self.loss_terms,
            "queries": {k: sorted(v) for k, v in self.queries.items()},
            "max_queries": decoder.num_visual_queries + text * int(decoder.text_queries_enabled),
        }


def run_times(args: argparse.Namespace) -> Dict[str, Dict[str, object]]:
    """Every model in this process, their passes interleaved (A B A B ...), so that a
    slow spell of the machine hits both models alike; medians after the warm-up."""
    import torch

    cases = [_Case(name, args) for name in MODELS]
    cuda = args.device == "cuda"
    results: Dict[str, Dict[str, object]] = {c.name: {} for c in cases}
    for key, pass_name in (("forward_s", "forward"), ("train_s", "forward_backward")):
        times: Dict[str, List[float]] = {c.name: [] for c in cases}
        for i in range(args.warmup + args.iters):
            for case in cases:
                elapsed, _ = timed_pass(getattr(case, pass_name), cuda, memory=False)
                if i >= args.warmup:
                    times[case.name].append(elapsed)
        for name, values in times.items():
            results[name][key] = statistics.median(values)
            results[name][key.replace("_s", "_runs")] = values
    for case in cases:
        results[case.name].update(case.description(), threads=torch.get_num_threads())
        if not args.no_flops:
            results[case.name].update(count_gflops(case.meta.eval(), case.sample))
    return results


def run_memory(args: argparse.Namespace, name: str) -> Dict[str, object]:
    """Peak memory each pass of one model adds (this process has only that model)."""
    case = _Case(name, args)
    cuda = args.device == "cuda"
    result = {}
    for key, fn in (("forward_mib", case.forward), ("train_mib", case.forward_backward)):
        peaks = [timed_pass(fn, cuda)[1] for _ in range(args.warmup + 1)][args.warmup :]
        result[key] = max((p for p in peaks if p is not None), default=float("nan"))
    return result


def run_case(args: argparse.Namespace) -> Dict[str, object]:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.case == "times":
        return run_times(args)
    return run_memory(args, args.case)


# ----------------------------------------------------------------------------- driver
def run_subprocess(args: argparse.Namespace, case: str) -> Dict[str, object]:
    """``times``: both models in one process with the allocator's defaults (as training
    runs); a model name: its memory, in a process with the mmap threshold of
    ``case_env`` (which costs page faults on CPU and would distort times)."""
    command = [sys.executable, os.path.abspath(__file__), "--case", case]
    for flag in ("device", "size", "num_classes", "iters", "warmup", "threads"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.no_flops or case != "times":
        command.append("--no-flops")
    env = case_env(memory=case != "times")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _seconds(values: List[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values) + " s"


def print_tables(args: argparse.Namespace, results: Dict[str, Dict[str, object]]) -> None:
    import torch

    print(
        f"\nbatch 1, {args.size}x{args.size}, K = {args.num_classes}, device {args.device}, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{results['hiervl']['threads']} threads"
    )
    print("\n| model | queries fwd / train (max) | trainable (M) | frozen (M) | GFLOPs "
          "| forward (s) | fwd mem (MiB) | fwd+bwd (s) | fwd+bwd mem (MiB) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        gflops = f"{r['gflops']:.1f}" if "gflops" in r else "-"
        seen = " / ".join(",".join(map(str, r["queries"][p])) for p in ("forward", "train"))
        print(
            f"| {name} | {seen} ({r['max_queries']}) | {r['trainable_params'] / 1e6:.1f} "
            f"| {r['frozen_params'] / 1e6:.1f} | {gflops} | {r['forward_s']:.2f} "
            f"| {r['forward_mib']:.0f} | {r['train_s']:.2f} | {r['train_mib']:.0f} |"
        )
    h, m = results["hiervl"], results["m2f-equivalent"]
    print("\n| quantity | hiervl / m2f-equivalent |")
    print("|---|---:|")
    rows = [("forward time", "forward_s"), ("forward+backward time", "train_s"),
            ("forward memory", "forward_mib"), ("forward+backward memory", "train_mib"),
            ("GFLOPs", "gflops")]  # fmt: skip
    for label, key in rows:
        if key in h and key in m and m[key]:
            print(f"| {label} | {h[key] / m[key]:.3f}x |")
    for label, key in (("forward", "forward_runs"), ("forward+backward", "train_runs")):
        ratios = [a / b for a, b in zip(h[key], m[key])]
        print(
            f"{label}, run by run (interleaved): hiervl {_seconds(h[key])}, "
            f"m2f-equivalent {_seconds(m[key])}; ratios {min(ratios):.3f}-{max(ratios):.3f}"
        )
    overhead = h["train_s"] / m["train_s"] - 1
    verdict = "met" if overhead <= TARGET_OVERHEAD else "NOT met"
    print(
        f"\nHierVL's additions cost {100 * overhead:+.1f}% forward+backward time over the "
        f"ablation (target <= {100 * TARGET_OVERHEAD:.0f}%: {verdict})."
    )
    for name, r in results.items():
        print(f"{name}: loss terms {', '.join(r['loss_terms'][:4])}... ({len(r['loss_terms'])})")
        if r.get("skipped_ops"):
            print(f"{name}: ops fvcore did not count: {r['skipped_ops']}")


def main() -> None:
    args = parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    start = time.perf_counter()
    print(f"timing {' and '.join(MODELS)} (interleaved) ...", file=sys.stderr, flush=True)
    results = run_subprocess(args, "times")
    for model in MODELS:
        print(f"memory of {model} ...", file=sys.stderr, flush=True)
        results[model].update(run_subprocess(args, model))
    print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print_tables(args, results)


if __name__ == "__main__":
    main()
