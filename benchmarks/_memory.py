"""Resident memory of this process: current, peak, and resetting the peak (Linux).

The peak is the kernel's high-water mark ``VmHWM``; writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS (Linux >= 4.0). Where that is not
possible the peak since process start is used and :func:`reset_peak` says so.
"""

from __future__ import annotations

import resource


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss() -> int:
    """Current resident set size in bytes."""
    kib = _status_kib("VmRSS")
    if kib is None:
        import psutil

        return int(psutil.Process().memory_info().rss)
    return kib * 1024


def peak_rss() -> int:
    """Peak resident set size in bytes since start or since the last :func:`reset_peak`."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


def reset_peak() -> bool:
    """Reset the peak to the current RSS; ``False`` if the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
