"""Single-image CPU latency, measured the same way for every model."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

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


def cpu_load() -> dict:
    """The CPU's 1-minute load average and core count, read before timing: on a busy CPU the
    latency figures say more about the other work than about the models."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"load_1min": load, "cores": os.cpu_count()}


def load_warning(load: dict) -> str | None:
    """A sentence for the report when the CPU was busy (load average of 1 or more) as timing
    began, else None."""
    if load.get("load_1min") is None or load["load_1min"] < 1.0:
        return None
    return (f"The CPU was busy when timing began (1-minute load average {load['load_1min']:.1f} "
            f"on {load['cores']} cores): the latency and speedup figures are not comparable "
            f"with other runs; run stage=report again on an otherwise idle CPU.")
