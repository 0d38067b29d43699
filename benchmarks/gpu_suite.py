"""Everything a GPU machine should check, in one command: build the CUDA op, test it, time
it, train and infer with the full model, and write one markdown report.

    python benchmarks/gpu_suite.py --out "$OUT"            # on a GPU machine (<= 8 min)
    python benchmarks/gpu_suite.py --out /tmp/suite        # anywhere else: tiny sizes

Stages, each in its own process with a time limit (``--timeouts`` changes them); a stage
that fails or runs out of time is reported with its last output and the next one runs:

1. build: ``setup.py build_ext --inplace`` with FORCE_CUDA=1, CUDA_HOME (from nvcc on PATH
   when unset) and TORCH_CUDA_ARCH_LIST of the visible GPU;
2. op_tests: pytest on ``tests/ops`` (the CUDA kernel against the reference in
   fp32/fp16/bf16, fp64 gradcheck, autocast, odd shapes, empty inputs and levels);
3. op_timing: compiled kernel against the reference at the pixel decoder's shapes;
4. train: the full semi-supervised step (``plain_step.py``: every loss term, backward,
   AdamW) of HierVL and of its Mask2Former-equivalent, with and without activation
   checkpointing, bf16 autocast, plus fp32 and two micro-batches for the memory question;
5. inference: sliding-window (512, 50% overlap) images/s.

Without a GPU the build and the CUDA tests are skipped with the reason, and the rest runs
at tiny sizes on the CPU (``tests/test_gpu_suite.py`` runs it that way in CI).
The stages need only the standard library, torch, open_clip and this repository: no
detectron2, no fvcore (``--block-imports`` proves it by making them unimportable).
The report is ``OUT/gpu_suite.md`` (and the raw rows in ``OUT/gpu_suite.json``); the exit
status is 1 when a stage failed or timed out.
"""

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES_SCRIPT = os.path.join(REPO, "benchmarks", "gpu_suite_stages.py")
STAGES = ("build", "op_tests", "op_timing", "train", "inference")
# Seconds per stage on an H100/H200-class GPU: at most 8 min in all; a stage past its limit
# is stopped. The build gets the most slack (nvcc's one .cu file takes ~1 min on 16 cores).
TIMEOUTS = {"build": 180, "op_tests": 60, "op_timing": 30, "train": 180, "inference": 30}
CPU_TIMEOUTS = {"build": 10, "op_tests": 120, "op_timing": 60, "train": 300, "inference": 120}


class StageResult(NamedTuple):
    name: str
    status: str  # "ok", "skipped", "failed", "timed out"
    seconds: float
    note: str
    rows: List[Dict[str, object]]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_suite.md / gpu_suite.json")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument(
        "--timeouts",
        nargs="*",
        default=[],
        metavar="STAGE=SECONDS",
        help="override stage time limits, e.g. train=300",
    )
    p.add_argument(
        "--block-imports",
        default="",
        help="comma-separated modules made unimportable in every stage (e.g. detectron2,fvcore)",
    )
    return p.parse_args(argv)


def cuda_visible() -> bool:
    """Whether torch sees a GPU (asked in a child process, so this one stays torch-free)."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", probe], timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def stage_env(block: str) -> Dict[str, str]:
    """This environment with the repository first on PYTHONPATH and the blocked modules."""
    env = dict(os.environ)
    paths = [REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    if block:
        env["HIERVL_SUITE_BLOCK_IMPORTS"] = block
    return env


def run_stage(name: str, command: List[str], timeout: float, env: Dict[str, str]) -> StageResult:
    """Run one stage process; collect its JSON lines ({"row": ...}, {"skip": reason}).

    On a timeout the whole process group is killed and what it printed so far is kept.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills the compilers too
    )
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    rows, skip, text = [], None, []
    for line in output.splitlines():
        try:
            message = json.loads(line) if line.startswith("{") else None
        except json.JSONDecodeError:
            message = None
        if isinstance(message, dict) and "row" in message:
            rows.append(message["row"])
        elif isinstance(message, dict) and "skip" in message:
            skip = message["skip"]
        else:
            text.append(line)
    tail = " / ".join(line.strip() for line in text[-3:] if line.strip())
    if timed_out:
        note = f"stopped after {timeout:.0f} s; {tail}"
        return StageResult(name, "timed out", seconds, note, rows)
    if proc.returncode != 0:
        return StageResult(name, "failed", seconds, f"exit {proc.returncode}: {tail}", rows)
    if skip is not None:
        return StageResult(name, "skipped", seconds, skip, rows)
    return StageResult(name, "ok", seconds, tail if name in ("build", "op_tests") else "", rows)


def _table(rows: List[Dict[str, object]]) -> List[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return lines


def report(results: List[StageResult], device: str, total: float) -> str:
    """The markdown report: a header, the stage summary, then each stage's table."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# HierVL GPU suite",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, device {device}, "
        f"Python {platform.python_version()}, commit {commit or 'unknown'}, "
        f"total {total:.0f} s",
        "",
        "| stage | status | time (s) | note |",
        "|---|---|---:|---|",
    ]
    for r in results:
        note = r.note.replace("|", "\\|")
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {note} |")
    for r in results:
        if r.rows:
            lines += ["", f"## {r.name}", ""] + _table(r.rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    device = args.device
    if device == "auto":
        device = "cuda" if cuda_visible() else "cpu"
    timeouts = dict(TIMEOUTS if device == "cuda" else CPU_TIMEOUTS)
    for item in args.timeouts:
        stage, _, seconds = item.partition("=")
        if stage not in STAGES or not seconds:
            raise SystemExit(f"--timeouts: expected STAGE=SECONDS with a stage of {STAGES}")
        timeouts[stage] = float(seconds)
    env = stage_env(args.block_imports)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in args.stages:
        print(f"[gpu_suite] {name} (limit {timeouts[name]:.0f} s) ...", flush=True)
        command = [sys.executable, STAGES_SCRIPT, name, "--device", device]
        result = run_stage(name, command, timeouts[name], env)
        print(f"[gpu_suite] {name}: {result.status} in {result.seconds:.1f} s {result.note}")
        results.append(result)
    text = report(results, device, time.perf_counter() - start)
    with open(os.path.join(args.out, "gpu_suite.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
        json.dump([r._asdict() for r in results], f, indent=1)
    print(text)
    sys.exit(1 if any(r.status in ("failed", "timed out") for r in results) else 0)


if __name__ == "__main__":
    main()
