"""The stages of ``gpu_suite.py``, one per process: ``python gpu_suite_stages.py STAGE``.

Each prints JSON lines: ``{"row": {...}}`` for every result row as soon as it is measured
(so a stage stopped halfway keeps its rows), or ``{"skip": reason}``; anything else it
prints is log. On CUDA the sizes are the paper's recipe (8 + 8 images at 512²); on the CPU
they are tiny (a small CLIP and decoder, 64² crops), to check that every stage runs.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

for _name in filter(None, os.environ.get("HIERVL_SUITE_BLOCK_IMPORTS", "").split(",")):
    sys.modules[_name] = None  # `import _name` now raises ImportError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CPU smoke sizes (as configs/tiny): every part of the model, at toy widths.
TINY = {
    "MODEL.HIERVL.CLIP.MODEL_NAME": "custom",
    "MODEL.HIERVL.CLIP.OUT_INDICES": [1, 2, 3, 4],
    "MODEL.HIERVL.CLIP.PYRAMID_CHANNELS": [32, 32, 32, 32],
    "MODEL.HIERVL.CLIP.PROMPT_LENGTH": 4,
    "MODEL.HIERVL.PIXEL_DECODER.CONV_DIM": 32,
    "MODEL.HIERVL.PIXEL_DECODER.MASK_DIM": 32,
    "MODEL.HIERVL.PIXEL_DECODER.NUM_ENCODER_LAYERS": 2,
    "MODEL.HIERVL.PIXEL_DECODER.NUM_HEADS": 4,
    "MODEL.HIERVL.PIXEL_DECODER.FFN_DIM": 64,
    "MODEL.HIERVL.CMSAM.NUM_HEADS": 4,
    "MODEL.HIERVL.CMSAM.FFN_DIM": 64,
    "MODEL.HIERVL.DECODER.HIDDEN_DIM": 32,
    "MODEL.HIERVL.DECODER.NUM_HEADS": 4,
    "MODEL.HIERVL.DECODER.FFN_DIM": 64,
    "MODEL.HIERVL.DECODER.NUM_LAYERS": 2,
    "MODEL.HIERVL.DECODER.NUM_VISUAL_QUERIES": 8,
    "MODEL.HIERVL.LOSS.TRAIN_NUM_POINTS": 256,
}


class Sizes:
    """Batch and image sizes of a stage run on ``device``."""

    def __init__(self, device: str):
        gpu = device == "cuda"
        self.overrides = {} if gpu else TINY
        self.crop = 512 if gpu else 64
        self.batch = 8 if gpu else 1  # images per stream (labelled = unlabelled)
        self.warmup, self.iters = (1, 3) if gpu else (0, 1)
        self.image = (512, 1024) if gpu else (64, 128)  # inference: 3 windows of the crop
        self.infer_iters = 5 if gpu else 1
        self.op = {"image_size": 512, "batch": 8, "repeats": 10, "warmup": 2} if gpu else {
            "image_size": 64, "batch": 1, "repeats": 1, "warmup": 1}  # fmt: skip
        # (model, precision, checkpointing, images per stream, micro-batches), most
        # important first; the CPU run keeps one of each kind.
        self.train_cases = [
            ("hiervl", "bf16", "off", self.batch, 1),
            ("hiervl", "bf16", "all", self.batch, 1),
            ("m2f-equivalent", "bf16", "off", self.batch, 1),
        ]
        if gpu:
            self.train_cases += [
                ("m2f-equivalent", "bf16", "all", 8, 1),
                ("hiervl", "fp32", "off", 8, 1),
                ("hiervl", "fp32", "all", 8, 1),
                ("hiervl", "bf16", "off", 8, 2),
            ]
        else:
            self.train_cases.append(("hiervl", "fp32", "off", 2, 2))


def emit(**message) -> None:
    print(json.dumps(message), flush=True)


# ----------------------------------------------------------------------------- stages
def stage_build(device: str, sizes: Sizes) -> None:
    """Compile hiervl._C with the CUDA kernel in place, for this GPU's architecture."""
    if device != "cuda":
        emit(skip="no CUDA GPU visible: the CUDA kernel is built and run on a GPU machine")
        return
    import torch

    env = dict(os.environ, FORCE_CUDA="1", MAX_JOBS=str(os.cpu_count() or 4))
    if not env.get("CUDA_HOME"):
        nvcc = shutil.which("nvcc")
        env["CUDA_HOME"] = os.path.dirname(os.path.dirname(nvcc)) if nvcc else "/usr/local/cuda"
    major, minor = torch.cuda.get_device_capability()
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    print(f"CUDA_HOME={env['CUDA_HOME']} TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}")
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=REPO, env=env, check=True
    )
    check = "from hiervl.ops import compiled_available as c, kernel_status as s; print(s()); "
    check += "raise SystemExit(0 if c('cuda') else 'built, but hiervl._C has no CUDA kernel')"
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True)


def stage_op_tests(device: str, sizes: Sizes) -> None:
    """pytest on tests/ops; one row per outcome count."""
    try:
        import pytest  # noqa: F401 - only its presence is checked here
    except ImportError:
        emit(skip="pytest is not installed here (carry its wheel, see benchmarks/README.md)")
        return
    files = ["tests/ops"] if device == "cuda" else ["tests/ops/test_ms_deform_attn_cuda.py"]
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *files]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-3000:])
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    outcomes = re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)
    counts = {kind: int(n) for n, kind in outcomes}
    emit(row={"files": " ".join(files), **counts, "summary": summary.strip("= ")})
    if proc.returncode not in (0, 5):
        raise SystemExit(f"tests failed: {summary}")
    if device != "cuda" and not counts.get("passed"):
        emit(skip=f"no CUDA GPU visible: the CUDA tests skip ({summary.strip('= ')})")


def stage_op_timing(device: str, sizes: Sizes) -> None:
    """Compiled MSDeformAttn against the reference at the pixel decoder's shapes (fp32)."""
    import torch
    from bench_msdeformattn import make_inputs, run_passes, timed

    from hiervl.ops import MSDeformAttnFunction, compiled_available, kernel_status
    from hiervl.ops import ms_deform_attn_reference as reference

    print(kernel_status())
    if not compiled_available(device):
        raise SystemExit(f"no compiled {device} kernel: {kernel_status()}")
    args = argparse.Namespace(strides=[32, 16, 8], d_model=256, heads=8, points=4,
                              dtype="float32", **sizes.op)  # fmt: skip
    dev = torch.device(device)
    inputs = make_inputs(args, dev)
    grad_out = torch.randn(args.batch, inputs["value"].shape[1], args.d_model, device=dev)
    with torch.no_grad():
        diff = (MSDeformAttnFunction.apply(*inputs.values()) - reference(*inputs.values())).abs()
    impls = {"reference": reference, "compiled": MSDeformAttnFunction.apply}
    passes = {name: run_passes(op, inputs, grad_out) for name, op in impls.items()}
    times = {(n, p): [] for n in impls for p in ("forward", "forward+backward")}
    for i in range(args.warmup + args.repeats):
        for name, (fwd, fwd_bwd) in passes.items():  # alternate, so load hits both alike
            t_fwd, t_both = timed(fwd, dev), timed(fwd_bwd, dev)
            if i >= args.warmup:
                times[(name, "forward")].append(t_fwd)
                times[(name, "forward+backward")].append(t_both)
    for pass_name in ("forward", "forward+backward"):
        ref = 1e3 * statistics.median(times[("reference", pass_name)])
        comp = 1e3 * statistics.median(times[("compiled", pass_name)])
        emit(row={"pass": pass_name, "batch": args.batch, "crop": args.image_size,
                  "Lq = S": inputs["value"].shape[1], "reference (ms)": f"{ref:.2f}",
                  "compiled (ms)": f"{comp:.2f}", "speed-up": f"{ref / comp:.1f}x",
                  "max abs diff": f"{diff.max().item():.1e}"})  # fmt: skip


def _train_case(device, sizes, model, precision, ckpt, batch, micro) -> dict:
    """Build one model, run its steps, return its row."""
    import torch
    from plain_step import (
        CHECKPOINT_ALL,
        M2F_EQUIVALENT,
        build_trainee,
        default_cfg,
        named_batch,
        timed,
        train_step,
    )

    overrides = dict(sizes.overrides)
    overrides.update(M2F_EQUIVALENT if model == "m2f-equivalent" else {})
    overrides.update(CHECKPOINT_ALL if ckpt == "all" else {})
    torch.manual_seed(0)
    trainee = build_trainee(default_cfg(overrides), device)
    labeled, unlabeled = named_batch(batch, batch, sizes.crop, 21, device)

    def step(it):
        return train_step(trainee, labeled, unlabeled, precision=precision,
                          micro_batches=micro, iteration=it, max_iter=100)  # fmt: skip

    for it in range(sizes.warmup):
        step(it)
    runs = [
        timed(lambda it=it: step(it), device)
        for it in range(sizes.warmup, sizes.warmup + sizes.iters)
    ]
    seconds = statistics.median(t for t, _ in runs)
    losses = runs[-1][1]
    cuda = device == "cuda"
    return {"model": model, "images (l+u)": f"{batch}+{batch}", "crop": sizes.crop,
            "precision": precision, "checkpointing": ckpt, "micro-batches": micro,
            "s/iter": f"{seconds:.3f}", "images/s": f"{2 * batch / seconds:.1f}",
            "peak GiB": f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "-",
            "loss terms": len(losses),
            "all finite": all(v == v and abs(v) != float("inf") for v in losses.values()),
            "total loss": f"{sum(losses.values()):.3f}"}  # fmt: skip


def stage_train(device: str, sizes: Sizes) -> None:
    """The full semi-supervised step: s/iteration, images/s, peak GPU memory (the whole
    case: weights, gradients, AdamW state and activations)."""
    import gc

    import torch

    for case in sizes.train_cases:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        emit(row=_train_case(device, sizes, *case))
        gc.collect()


def stage_inference(device: str, sizes: Sizes) -> None:
    """Sliding-window inference (crop = the training crop, 50% overlap), images/s."""
    import torch
    from plain_step import build_trainee, default_cfg, sliding_window_scores, timed

    torch.manual_seed(0)
    model = build_trainee(default_cfg(sizes.overrides), device).model.eval()
    images = torch.randn(1, 3, *sizes.image, device=device)
    for precision in ("fp32", "bf16"):

        def infer(precision=precision):
            return sliding_window_scores(model, images, sizes.crop, precision)

        infer()  # warm-up
        seconds = statistics.median(timed(infer, device)[0] for _ in range(sizes.infer_iters))
        emit(row={"image": f"{sizes.image[0]}x{sizes.image[1]}", "window": sizes.crop,
                  "stride": sizes.crop // 2, "precision": precision,
                  "s/image": f"{seconds:.3f}", "images/s": f"{1 / seconds:.2f}"})  # fmt: skip


STAGES = {
    "build": stage_build,
    "op_tests": stage_op_tests,
    "op_timing": stage_op_timing,
    "train": stage_train,
    "inference": stage_inference,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    if args.device == "cpu" and args.stage != "build":
        import torch

        torch.set_num_threads(1)  # a smoke run: checks that the stages run, not speed
    STAGES[args.stage](args.device, Sizes(args.device))


if __name__ == "__main__":
    main()
