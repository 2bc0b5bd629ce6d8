"""Timing helpers shared by the benchmarks, and the unit of speed of ARCHITECTURE.md."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import scipy.fft


def times(action: Callable[[], object], repeats: int = 5) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``action``."""
    measured = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        measured.append(time.perf_counter() - start)
    return measured


def rfft2_unit() -> float:
    """Best of a few single-core ``scipy.fft.rfft2`` of a 4096 x 4096 float32 array, s."""
    image = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    return min(times(lambda: scipy.fft.rfft2(image, workers=1), repeats=3))


def reset_peak_memory() -> None:
    """Start a new peak-RSS measurement for this process (Linux ``clear_refs``, mode 5)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_memory_mib() -> float:
    """Peak resident memory of this process since start or the last :func:`reset_peak_memory`, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("VmHWM is missing from /proc/self/status")
