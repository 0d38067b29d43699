"""Helpers shared by the benchmark scripts: peak resident memory of this process on Linux,
and the environment for case subprocesses."""

import os
import time
from typing import Callable, Dict, Optional, Tuple

# glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in case processes: large blocks come straight from
# and go straight back to the OS, so memory freed by one measured pass does not stay
# resident and hide the next pass's peak.
MMAP_THRESHOLD = 64 * 1024


def proc_status_kib(field: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), None if unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def case_env(memory: bool) -> Dict[str, str]:
    """Environment of a case subprocess: this one's, plus MMAP_THRESHOLD for a process that
    measures memory (not for one that measures time: the threshold costs page faults)."""
    env = dict(os.environ)
    if memory:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    return env


def timed_pass(
    fn: Callable[[], object], cuda: bool, memory: bool = True
) -> Tuple[float, Optional[float]]:
    """Run ``fn`` once: (seconds, MiB of peak memory it added), the memory None when the
    peak cannot be measured or ``memory`` is False. CUDA: ``max_memory_allocated`` above
    the memory allocated before; CPU: the process's peak resident set above its resident
    set before."""
    import torch

    before, reset = None, False
    if cuda:
        torch.cuda.synchronize()
        if memory:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
    elif memory:
        before, reset = proc_status_kib("VmRSS"), reset_peak_rss()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if not memory:
        return elapsed, None
    if cuda:
        return elapsed, (torch.cuda.max_memory_allocated() - before) / 2**20
    if reset and before is not None:
        return elapsed, (proc_status_kib("VmHWM") - before) / 2**10
    return elapsed, None
