"""Shared by the benchmark scripts: machine facts, tables, JSON results."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from qlab.hardware import hardware, resolve_engine, resolve_precision

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The run's `hardware` block (qlab.hardware), with what precision=auto and backend=auto pick
    on this machine (a benchmark times several; its rows say which)."""
    return hardware(engine=resolve_engine("auto"), precision=resolve_precision("auto", "cpu"),
                    reduce_range=False) | {"date": time.strftime("%Y-%m-%d %H:%M")}


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """A fixed-width table on stdout."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def save(name: str, data: dict) -> Path:
    """benchmarks/results/NAME.json with the machine facts."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"hardware": machine(), **data}, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}")
    return path
