"""Single-image CPU latency, measured the same way for every model."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor


def measure_latency(
    model: Callable[[Tensor], Tensor],
    *,
    runs: int = 1000,
    warmup: int = 50,
    threads: int | None = None,
    image_size: int = 32,
) -> dict[str, float]:
    """Median and p90 wall time (ms) of model(one 3xHxW image) on CPU, after warm-up runs."""
    if runs < 1:
        raise ValueError(f"bench.runs={runs} must be at least 1.")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    x = torch.rand(1, 3, image_size, image_size)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(runs):
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "runs": runs,
        "threads": used,
    }


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat (Linux), else None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_load(seconds: float = 1.0) -> dict:
    """How busy the CPU is before timing, while this process sleeps: `busy_cores`, the cores'
    worth of work other processes did over `seconds` (/proc/stat; the 1-minute load average
    elsewhere, which also counts work that just ended). On a busy CPU the latency figures say
    more about the other work than about the models."""
    cores = os.cpu_count() or 1
    before = _cpu_times()
    if before is not None:
        time.sleep(seconds)
        after = _cpu_times()
        if after is not None and after[1] > before[1]:
            share = (after[0] - before[0]) / (after[1] - before[1])
            return {"busy_cores": round(share * cores, 2), "cores": cores,
                    "measured": f"/proc/stat over {seconds:g} s"}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"busy_cores": load, "cores": cores, "measured": "1-minute load average"}


def load_warning(load: dict) -> str | None:
    """A sentence for the report when other work kept half a core or more busy as timing began,
    else None."""
    if load.get("busy_cores") is None or load["busy_cores"] < 0.5:
        return None
    return (f"The CPU was busy when timing began ({load['busy_cores']:.1f} of {load['cores']} "
            f"cores in use by other work, {load['measured']}): the latency and speedup figures "
            f"are not comparable with other runs; run stage=report again on an otherwise idle "
            f"CPU.")
