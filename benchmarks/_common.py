"""Helpers shared by the benchmarks: progress lines, medians, orders, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
_START = time.perf_counter()
T = TypeVar("T")


def log(message: str) -> None:
    """One progress line on stderr, stamped with the seconds since the suite started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float | None:
    """The median, or ``None`` for no values."""
    return statistics.median(values) if values else None


def rotated(items: Sequence[T], shift: int) -> list[T]:
    """``items`` rotated left by ``shift``, so that repeats alternate which variant runs first.

    >>> rotated(["a", "b", "c"], 1)
    ['b', 'c', 'a']
    """
    if not items:
        return []
    shift %= len(items)
    return [*items[shift:], *items[:shift]]


def cpu_busy_elsewhere(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy during ``seconds`` (this process sleeps, so: other work)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except OSError:
        return float("nan")
    return (busy1 - busy0) / max(total1 - total0, 1)


#: Longest wait (seconds) for other processes to leave the CPUs before each measurement;
#: 0 disables waiting. Set from ``run.py --quiet-wait``.
quiet_wait = {"seconds": 0.0, "busy": 0.15}


def wait_for_quiet() -> None:
    """Before a measurement: wait (up to ``quiet_wait["seconds"]``) for idle CPUs."""
    limit = quiet_wait["seconds"]
    if limit <= 0:
        return
    deadline = time.monotonic() + limit
    busy = cpu_busy_elsewhere()
    if busy <= quiet_wait["busy"]:
        return
    log(f"waiting for other processes: CPUs {busy:.0%} busy")
    while busy > quiet_wait["busy"] and time.monotonic() < deadline:
        busy = cpu_busy_elsewhere(1.0)
    log(f"going on with CPUs {busy:.0%} busy elsewhere")


def machine_info() -> dict[str, Any]:
    """CPU, memory, library versions and thread count of this machine."""
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "cpu_busy_elsewhere_at_start": round(cpu_busy_elsewhere(), 2),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    try:
        import psutil

        info["memory_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import lightning

        info["lightning"] = lightning.__version__
    except ImportError:
        info["lightning"] = None
    return info


def available_memory_bytes() -> int:
    """Memory the kernel says can be allocated without swapping (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0
