"""Helpers shared by the benchmark scripts: peak resident memory of this process on Linux,
and the environment for case subprocesses."""

import os
from typing import Dict, Optional

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


def case_env() -> Dict[str, str]:
    """Environment of a case subprocess (see MMAP_THRESHOLD)."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    return env
