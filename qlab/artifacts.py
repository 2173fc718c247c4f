"""Files a stage leaves behind, each written to a temp file and renamed into place."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from qlab.errors import QlabError
from qlab.models import Deployable


def _pyplot():
    """matplotlib.pyplot on the Agg backend, imported on first use: only the functions that plot
    load matplotlib, so `import qlab.artifacts` stays light."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def __getattr__(name: str):
    if name == "plt":  # artifacts.plt, for callers that draw their own figures
        return _pyplot()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) then rename tmp to path, so a crash never leaves half a file at path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the file's own name, in a private folder beside it: torch.save, torch.jit.save and
    # torch.export.save name the records inside their archives after the file, so a temporary
    # name would make the same model's file size (size_mb) differ from run to run
    folder = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp = folder / path.name
    try:
        folder.mkdir(exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # this process's own folder
    return path


def write_json(path: Path, data: dict) -> Path:
    """JSON with sorted keys and NaN written as null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    text = json.dumps(clean(data), indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


STATE_DICT_FILE = "model_int8_state_dict.pt"  # an INT8 stage's state_dict (its size is size_mb)


def save_state_dict(path: Path, model: torch.nn.Module) -> float:
    """Save model.state_dict(); returns the file size in MB (1 MB = 1e6 bytes)."""
    atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    return Path(path).stat().st_size / 1e6


META_FILE = "qlab.json"  # inside every exported TorchScript file: what it was made for, and where


def save_torchscript(path: Path, module: torch.jit.ScriptModule, meta: dict | None = None) -> Path:
    """torch.jit.save, atomically, with `meta` as the extra file qlab.json."""
    extra = {META_FILE: json.dumps(meta or {}, sort_keys=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return atomic_write(path, lambda tmp: torch.jit.save(module, str(tmp), _extra_files=extra))


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, dict]:
    """torch.jit.load on CPU and the file's qlab.json ({} for a file without one)."""
    extra = {META_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[META_FILE] or "{}")


def torchscript_of(model: torch.nn.Module, mean, std) -> torch.jit.ScriptModule:
    """Frozen TorchScript of Deployable(model): float [0,1] NCHW in, logits out, on CPU.

    Frozen (weights folded in as constants): same outputs as the eager model, and the fastest
    form measured by benchmarks/inference.py (INT8 eager 3.3-4.3 ms vs frozen 1.7-2.9 ms)."""
    with warnings.catch_warnings():  # TorchScript is deprecated upstream but is what loads anywhere
        warnings.simplefilter("ignore", FutureWarning)
        return freeze(torch.jit.script(Deployable(model.eval().cpu(), mean, std)))


def freeze(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """torch.jit.freeze (weights inlined as constants) of an eval-mode script module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.freeze(module.eval())


def read_epoch_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning CSVLogger rows -> {metric: [(epoch, value), ...]} for the epoch-level metrics."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not Path(csv_path).is_file():
        return series
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            for key, value in row.items():
                if key in ("epoch", "step") or not value:
                    continue
                series.setdefault(key, []).append((int(float(row["epoch"])), float(value)))
    return series


def _step_of(row: dict) -> int | None:
    """A metrics.csv row's step; None for a row cut short (a run killed while writing it)."""
    try:
        return int(float(row.get("step") or ""))
    except (TypeError, ValueError):
        return None


def keep_rows_before(csv_path: Path, step: int) -> None:
    """Keep the metrics.csv rows logged before optimizer step `step`: a run continued from a
    checkpoint taken at that step appends its own rows after them (callbacks.CSVLogger). Rows
    logged after the checkpoint, test rows (the continued run tests again) and a last row cut
    short are dropped."""
    if not Path(csv_path).is_file():
        return
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader
                if not any(r.get(k) for k in fields if k.startswith("test/"))
                and None not in r and (row_step := _step_of(r)) is not None and row_step < step]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(Path(csv_path), write)


def plot_curves(ax_loss, ax_acc, series: dict[str, list[tuple[int, float]]], title: str) -> None:
    """Train vs val loss and accuracy per epoch on two axes."""
    for ax, what in ((ax_loss, "loss"), (ax_acc, "acc")):
        for split, style in (("train", "-o"), ("val", "-s")):
            points = series.get(f"{split}/{what}", [])
            if points:
                epochs, values = zip(*points)
                ax.plot([e + 1 for e in epochs], values, style, label=split, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if what == "acc" else "loss")
        ax.set_title(f"{title}: {'accuracy' if what == 'acc' else 'loss'}")
        ax.grid(alpha=0.3)
        ax.legend()


def save_curves(path: Path, csv_path: Path, title: str) -> Path:
    """curves.png: train vs val loss (left) and accuracy (right) per epoch."""
    fig, (a, b) = _pyplot().subplots(1, 2, figsize=(11, 4))
    plot_curves(a, b, read_epoch_metrics(csv_path), title)
    fig.tight_layout()
    return save_fig(fig, path)


def plot_confusion(ax, confmat: Tensor, classes: Sequence[str], title: str) -> None:
    """Row-normalized confusion matrix with counts in the cells."""
    cm = confmat.cpu().double()
    rates = cm / cm.sum(dim=1, keepdim=True).clamp(min=1)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    n = len(classes)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if rates[i, j] > 0.5 else "black")


def save_confusion(path: Path, confmat: Tensor, classes: Sequence[str], title: str) -> Path:
    """confusion_matrix.png for one model."""
    fig, ax = _pyplot().subplots(figsize=(6.5, 5.5))
    plot_confusion(ax, confmat, classes, title)
    fig.tight_layout()
    return save_fig(fig, path)


def save_fig(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG, atomically, and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        _pyplot().close(fig)


MAX_BATCH = 4096


def export_program(model: torch.nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension (traced at batch 2: 1 would specialize)."""
    example = example[:1].expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def save_onnx(program: torch.export.ExportedProgram, example: Tensor, path: Path) -> None:
    """The program as ONNX (torch.onnx.export, dynamo exporter; input "image", output "logits")."""
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):  # one line per rewrite otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # external_data=False: one self-contained file (the exporter otherwise moves large
        # weights to PATH.data, named after the temporary file); ONNX's limit is 2 GB
        torch.onnx.export(program, (example,), str(path), dynamo=True, verbose=False,
                          input_names=["image"], output_names=["logits"], external_data=False)


def _quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype):
    return torch.clamp(torch.round(x.to(torch.float32) * (1.0 / scale)) + zero_point,
                       quant_min, quant_max).to(dtype)


def _dequantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype, *, out_dtype=None):
    return (x.to(out_dtype or torch.float32) - zero_point) * scale


def _dequantize_per_channel(x, scales, zero_points, axis, quant_min, quant_max, dtype, *,
                            out_dtype=None):
    shape = [1] * x.dim()
    shape[axis] = -1
    out = x.to(torch.float32)
    if zero_points is not None:
        out = out - zero_points.view(shape).to(torch.float32)
    return (out * scales.view(shape).to(torch.float32)).to(out_dtype or torch.float32)


def portable_program(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with the quantized_decomposed quantize/dequantize ops (which only torchao
    registers) written as the aten ops they compute (the same formulas: round half to even,
    clamp, integer storage kept), so plain `import torch` loads and runs it with identical
    results. A program without them is returned as is."""
    used = {str(n.target).split(".")[1] for n in program.graph.nodes
            if str(n.target).startswith("quantized_decomposed.")}
    if not used:
        return program
    qd = torch.ops.quantized_decomposed
    table = {qd.quantize_per_tensor.default: _quantize_per_tensor,
             qd.dequantize_per_tensor.default: _dequantize_per_tensor,
             qd.dequantize_per_channel.default: _dequantize_per_channel}
    known = {op.name().split("::")[1] for op in table}
    if used - known:
        raise QlabError(f"The exported program uses quantized_decomposed ops {sorted(used - known)} "
                        f"that have no plain-torch form here; only {sorted(known)} do.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return program.run_decompositions(table)


def save_program(path: Path, program: torch.export.ExportedProgram, meta: dict) -> Path:
    """torch.export.save, `meta` as the extra file qlab.json, written atomically."""
    extra = {META_FILE: json.dumps(meta, sort_keys=True)}
    with warnings.catch_warnings():  # "No complete tensor found in the group": CPU weights
        warnings.simplefilter("ignore", UserWarning)
        return atomic_write(path, lambda tmp: torch.export.save(program, str(tmp),
                                                                extra_files=extra))


def save_exported(out: Path, stem: str, deployable: torch.nn.Module, example: Tensor,
                  meta: dict, *, pt2: bool = True, onnx: bool = True
                  ) -> torch.export.ExportedProgram:
    """out/STEM.pt2 (torch.export.save of the portable program: plain torch loads it) and
    out/STEM.onnx (the dynamo ONNX exporter, QDQ for a quantized program) of a float [0,1]
    NCHW -> logits module, each written atomically. Returns the program as exported."""
    example = torch.rand(2, *example.shape[1:])
    program = export_program(deployable, example)
    if pt2:
        save_program(Path(out) / f"{stem}.pt2", portable_program(program), meta)
    if onnx:
        atomic_write(Path(out) / f"{stem}.onnx", lambda tmp: save_onnx(program, example, tmp))
    return program
