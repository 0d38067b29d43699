"""Time the compiled MSDeformAttn kernel against the PyTorch reference.

Default shapes are those of the pixel decoder on a 512x512 crop: levels at strides 32, 16, 8
(16², 32², 64²), batch 2, 8 heads of 32 channels (D = 256), 4 points, one query per pixel
of every level (Lq = S = 5376). Sampling locations look like a trained layer's: each query's
pixel centre plus Deformable-DETR's initial offset pattern and 1-pixel Gaussian noise.

Both implementations are timed alternately in the same run (so machine load hits both),
and the median of the repeats is reported with their ratio.

    python benchmarks/bench_msdeformattn.py                 # CPU, torch's thread count
    python benchmarks/bench_msdeformattn.py --device cuda   # GPU users
"""

import argparse
import logging
import math
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch

from hiervl.ops import MSDeformAttnFunction, compiled_available, kernel_status
from hiervl.ops import ms_deform_attn_reference as reference

logger = logging.getLogger("bench_msdeformattn")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--image-size", type=int, default=512, help="input crop side (pixels)")
    p.add_argument("--strides", type=int, nargs="+", default=[32, 16, 8])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10, help="timed runs per implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    return p.parse_args()


def make_inputs(args: argparse.Namespace, device: torch.device) -> Dict[str, torch.Tensor]:
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    sides = [args.image_size // s for s in args.strides]
    shapes = torch.tensor([[side, side] for side in sides], dtype=torch.long)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s, n_levels, n_heads, n_points = int(sizes.sum()), len(sides), args.heads, args.points
    head_dim = args.d_model // n_heads

    # One query per pixel, its reference point the pixel centre (normalised x, y).
    centres = []
    for side in sides:
        coords = (torch.arange(side, dtype=torch.float64) + 0.5) / side
        y, x = torch.meshgrid(coords, coords, indexing="ij")
        centres.append(torch.stack([x.flatten(), y.flatten()], -1))
    ref = torch.cat(centres)  # (S, 2)
    # Offsets in pixels of each level: Deformable-DETR's star pattern + N(0, 1) noise.
    angles = torch.arange(n_heads, dtype=torch.float64) * (2 * math.pi / n_heads)
    direction = torch.stack([angles.cos(), angles.sin()], -1)
    direction = direction / direction.abs().max(-1, keepdim=True).values
    distance = torch.arange(1, n_points + 1, dtype=torch.float64)
    pattern = direction[:, None, None, :] * distance[None, None, :, None]  # (nH, 1, nP, 2)
    noise = torch.randn(args.batch, s, n_heads, n_levels, n_points, 2, generator=gen)
    level_wh = shapes.flip(-1).to(torch.float64)[None, None, None, :, None, :]
    locations = ref[None, :, None, None, None, :] + (pattern + noise) / level_wh
    logits = torch.randn(args.batch, s, n_heads, n_levels * n_points, generator=gen)
    weights = logits.softmax(-1).view(args.batch, s, n_heads, n_levels, n_points)
    value = torch.randn(args.batch, s, n_heads, head_dim, generator=gen)
    return {
        "value": value.to(device, dtype),
        "spatial_shapes": shapes.to(device),
        "level_start_index": starts.to(device),
        "sampling_locations": locations.to(device, dtype),
        "attention_weights": weights.to(device, dtype),
    }


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall through to platform
    return platform.processor() or platform.machine()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_passes(op: Callable, inputs: Dict[str, torch.Tensor], grad_out: torch.Tensor):
    """(forward without grad, forward + backward) closures for one implementation."""
    args = [inputs[k] for k in inputs]
    trainable = [inputs[k].detach().requires_grad_() for k in ("value", "sampling_locations")]
    trainable.append(inputs["attention_weights"].detach().requires_grad_())

    def forward():
        with torch.no_grad():
            op(*args)

    def forward_backward():
        value, locations, weights = trainable
        out = op(value, args[1], args[2], locations, weights)
        torch.autograd.grad(out, trainable, grad_out)

    return forward, forward_backward


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible")
    logger.info(kernel_status())
    inputs = make_inputs(args, device)
    grad_out = torch.randn(
        args.batch, inputs["value"].shape[1], args.d_model, dtype=inputs["value"].dtype
    ).to(device)

    impls = {"reference": reference}
    if compiled_available(device):
        impls["compiled"] = MSDeformAttnFunction.apply
        with torch.no_grad():
            expected = reference(*inputs.values())
            diff = (MSDeformAttnFunction.apply(*inputs.values()) - expected).abs().max()
        logger.info("max |compiled - reference| = %.2e", diff.item())
    else:
        logger.warning("no compiled %s kernel: timing the reference only", device.type)

    passes = {name: run_passes(op, inputs, grad_out) for name, op in impls.items()}
    times: Dict[str, Dict[str, List[float]]] = {
        name: {"forward": [], "forward+backward": []} for name in impls
    }
    for i in range(args.warmup + args.repeats):
        for name, (fwd, fwd_bwd) in passes.items():  # alternate: load hits both alike
            t_fwd, t_fwd_bwd = timed(fwd, device), timed(fwd_bwd, device)
            if i >= args.warmup:
                times[name]["forward"].append(t_fwd)
                times[name]["forward+backward"].append(t_fwd_bwd)

    sides = [args.image_size // s for s in args.strides]
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(
        f"\nMSDeformAttn on {device.type} ({where}), torch {torch.__version__}, {args.dtype}\n"
        f"batch {args.batch}, levels {' '.join(f'{s}x{s}' for s in sides)}, "
        f"Lq = S = {inputs['value'].shape[1]}, heads {args.heads}, points {args.points}, "
        f"D {args.d_model}; median of {args.repeats} runs (ms)\n"
    )
    print("| pass             | reference | compiled | speed-up |")
    print("|------------------|-----------|----------|----------|")
    for pass_name in ("forward", "forward+backward"):
        ref_ms = 1e3 * statistics.median(times["reference"][pass_name])
        if "compiled" in times:
            comp_ms = 1e3 * statistics.median(times["compiled"][pass_name])
            print(
                f"| {pass_name:<16} | {ref_ms:9.1f} | {comp_ms:8.1f} | {ref_ms / comp_ms:7.1f}x |"
            )
        else:
            print(f"| {pass_name:<16} | {ref_ms:9.1f} |      n/a |      n/a |")


if __name__ == "__main__":
    main()
