"""Shared helpers: run the real entry points in a subprocess, write tiny datasets to tmp_path."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlab.hardware import quantized_engine

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: the real ResNet-50 with the cheap imagenet stem, a few synthetic images, CPU.
TINY = [
    "data=synthetic", "data.num_train=96", "data.num_test=64", "data.batch_size=32",
    "data.eval_batch_size=64", "model.stem=imagenet", "trainer.max_epochs=1",
    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "bench.runs=5",
    "bench.warmup=1", "optimizer.lr=0.05", "scheduler=cosine",
    "export.pt2=false", "export.onnx=false",  # FP32 .pt2/.onnx: tests/test_pt2e.py
]

# An AVX2-only CPU, reproduced on a newer x86 CPU by the kernels' own ISA switches.
AVX2_ONLY = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "ATEN_CPU_CAPABILITY": "avx2"}
X86 = platform.machine().lower() in ("x86_64", "amd64")


def run_cli(script: str, *overrides: str, outputs: Path, check: bool = True,
            timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """python SCRIPT overrides... with outputs under `outputs`; returns the finished process.

    Timeouts are sized for a 2-core AVX2-only CPU, the slowest kind these tests run on."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="0", **(env or {}))
    env.pop("LOCAL_RANK", None)
    flags = [o for o in overrides if o.startswith("-")]
    # later overrides win, like on a command line, but Hydra refuses a key given twice
    merged = {o.split("=", 1)[0]: o for o in overrides if not o.startswith("-")}
    cmd = [sys.executable, str(ROOT / script), *flags, f"outputs_dir={outputs}", *merged.values()]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(autouse=True)
def _cpu_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture
def use_engine():
    """use_engine(name): the quantized engine for the rest of the test, set through
    qlab.hardware.quantized_engine (auto and unknown names as there), restored when it ends."""
    with contextlib.ExitStack() as stack:
        yield lambda engine: stack.enter_context(quantized_engine(engine))


@pytest.fixture(autouse=True)
def _engine_left_as_found():
    """Every test sets the quantized engine through quantized_engine (or use_engine), which puts
    it back: one that leaves it changed fails here, and the next test still gets the old one."""
    engine = torch.backends.quantized.engine
    with quantized_engine(engine):
        yield
        left = torch.backends.quantized.engine
    assert left == engine, (f"the test left torch.backends.quantized.engine={left!r} (it was "
                            f"{engine!r}): set it with the use_engine fixture or "
                            f"qlab.hardware.quantized_engine")
