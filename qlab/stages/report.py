"""Compare FP32 / PTQ / QAT: one table, latency re-measured side by side, one figure."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from qlab import artifacts
from qlab.bench import cpu_load, load_warning, measure_latency
from qlab.errors import QlabError
from qlab.hardware import quantized_engine, resolve_config
from qlab.runtimes import StageFiles, load_runtimes

log = logging.getLogger(__name__)
STAGES = ("fp32", "ptq", "qat")
HEADER = ("Model", "Size (MB)", "Compression", "Accuracy (%)", "Loss", "Accuracy drop (pt)",
          "Latency (ms)", "Speedup")


def _own_forms(m: dict) -> tuple[str, ...]:
    """The forms whose accuracy is the stage's own test accuracy (the model it evaluated)."""
    if m["stage"] == "fp32":  # float32: its test ran in float32, or was re-run so (bf16 training)
        float32 = str(m.get("precision", "32")).startswith("32") or "accuracy_autocast" in m
        return ("eager", "torchscript-frozen") if float32 else ()
    flow = (m.get("int8") or {}).get("flow", "eager")
    return {"eager": ("torchscript-frozen",), "ort": ("onnxruntime",)}.get(flow, ())


def form_accuracy(m: dict, form: str) -> float | None:
    """The test accuracy measured for one runtime of a stage; None where none was measured."""
    measured = (m.get("runtimes") or {}).get(form, {}).get("accuracy")
    if measured is not None:
        return measured
    return m["accuracy"] if form in _own_forms(m) else None


def remeasure_latency(run: Path, found: dict[str, dict], cfg: DictConfig) -> dict[str, dict]:
    """Every runtime of every stage's artifacts in this one process, same threads, same input,
    same runs: eager, frozen TorchScript, torch.export (.pt2), inductor (torch.compile) and ONNX
    Runtime, where the stage wrote the file. Each stage counts in its fastest form."""
    out = {}
    bench = {"runs": cfg.bench.runs, "warmup": cfg.bench.warmup, "threads": cfg.bench.threads}
    for stage, m in found.items():
        forms = {form: measure_latency(model, **bench, image_size=_image_size(m))
                 for form, model in load_runtimes(StageFiles(
                     run / stage, m, engine=cfg.quant.backend, compile=cfg.bench.inductor)).items()}
        if forms:
            best = min(forms, key=lambda f: forms[f]["median_ms"])
            out[stage] = forms[best] | {"form": best, "forms": forms}
    return out


def runtime_rows(found: dict[str, dict], latency: dict[str, dict]) -> list[dict]:
    """One row per (stage, runtime) measured: accuracy where measured, latency, speedup against
    the fastest FP32 runtime of this run."""
    base = latency.get("fp32", {}).get("median_ms")
    rows = []
    for stage, lat in latency.items():
        for form, t in sorted(lat["forms"].items(), key=lambda kv: kv[1]["median_ms"]):
            rows.append({"model": stage.upper(), "runtime": form,
                         "accuracy": form_accuracy(found[stage], form),
                         "latency_ms": t["median_ms"], "latency_p90_ms": t["p90_ms"],
                         "speedup": base / t["median_ms"] if base else None})
    return rows


def runtimes_table(rows: list[dict]) -> str:
    """The runtimes as a Markdown table."""
    f = _f
    lines = ["| Model | Runtime | Accuracy (%) | Latency (ms) | p90 (ms) | Speedup |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['runtime']} | {f(r['accuracy'], '.2f')} | "
              f"{f(r['latency_ms'], '.3f')} | {f(r['latency_p90_ms'], '.3f')} | "
              f"{f(r['speedup'], '.2f')}x |" for r in rows]
    return "\n".join(lines)


def build_rows(found: dict[str, dict], latency: dict[str, dict]) -> list[dict]:
    """One row per stage; a missing stage is a row that says so, never a made-up number."""
    base = found.get("fp32")
    rows = []
    for stage in [*STAGES, *(s for s in found if s not in STAGES)]:
        m = found.get(stage)
        if m is None:
            rows.append({"model": stage.upper(), "missing": True})
            continue
        lat = latency.get(stage, m.get("latency", {})).get("median_ms")
        row = {"model": stage.upper(), "missing": False, "size_mb": m["size_mb"],
               "precision": precision(m),
               "accuracy": m["accuracy"], "loss": m["loss"], "latency_ms": lat,
               "latency_p90_ms": latency.get(stage, {}).get("p90_ms"),
               "num_test_images": m["num_test_images"], "backend": m.get("backend")}
        if base is not None:
            row["compression"] = base["size_mb"] / m["size_mb"]
            row["accuracy_drop"] = base["accuracy"] - m["accuracy"]
            base_lat = latency.get("fp32", {}).get("median_ms")
            row["speedup"] = base_lat / lat if base_lat and lat else None
        rows.append(row)
    return rows


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _image_size(m: dict) -> int:
    """The stage's input size (runs from before metrics.json recorded it: 32)."""
    return int(m.get("image_size") or 32)


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table."""
    f = _f
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        if r["missing"]:
            lines.append(f"| {r['model']} | " + " | ".join(["missing"] * (len(HEADER) - 1)) + " |")
            continue
        lines.append("| " + " | ".join([
            r["model"], f(r["size_mb"], ".2f"), f(r.get("compression"), ".2f") + "x",
            f(r["accuracy"], ".2f"), f(r["loss"], ".4f"), f(r.get("accuracy_drop"), "+.2f"),
            f(r["latency_ms"], ".3f"), f(r.get("speedup"), ".2f") + "x"]) + " |")
    return "\n".join(lines)


def _place_labels(ax, points: list[tuple[float, float, str]]) -> None:
    """Write each point's name beside it, moving a name up or down (a few rows at most) until it
    overlaps no name placed before it, so that close variants stay readable."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    placed = []
    offsets = [(5, 3)] + [(5, 3 + sign * 11 * k) for k in range(1, 5) for sign in (-1, 1)]
    for x, y, text in sorted(points, key=lambda p: (-p[1], p[0])):
        for dx, dy in offsets:
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy),
                               fontsize=8, arrowprops=None if dy == 3 else
                               {"arrowstyle": "-", "lw": 0.4, "color": "0.5"})
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)  # the name, not its leader line
            if not any(box.overlaps(other) for other in placed):
                break
            if (dx, dy) != offsets[-1]:
                note.remove()
        placed.append(box)


def _plot_tradeoff(ax, rows: list[dict], key: str, what: str) -> list[tuple[float, float, str]]:
    """Accuracy against `key` (size or latency): each model a point, FP32 a line. Returns the
    points with their names, for _place_labels once the figure is laid out."""
    from matplotlib.ticker import LogFormatter

    points = [r for r in rows if not r["missing"] and (r.get(key) or 0) > 0]  # log axis
    for r in points:
        fp32 = r["model"] == "FP32"
        ax.plot(r[key], r["accuracy"], "*" if fp32 else "o", ms=11 if fp32 else 6,
                color="k" if fp32 else ("tab:orange" if r.get("precision") else "tab:blue"))
    fp32 = next((r for r in points if r["model"] == "FP32"), None)
    if fp32 is not None:
        ax.axhline(fp32["accuracy"], color="k", lw=0.8, ls="--", label="FP32")
        ax.legend(fontsize=8, loc="lower right")
    if not points:
        ax.text(0.5, 0.5, f"no {what}", ha="center", va="center")
    ax.set_xlabel(what)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy vs {what} (orange: mixed precision, report.md says which ops)")
    ax.grid(alpha=0.3)
    xs = [r[key] for r in points]
    if xs:  # a log axis: FP32 is ~4x the INT8 models, and the INT8 variants lie close together
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # 1, 10 not 10^0
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.set_xlim(min(xs) / 1.15, max(xs) * 1.8)  # room for the names on the right
    return [(r[key], r["accuracy"], r["model"]) for r in points]


def report_figure(run: Path, found: dict[str, dict], rows: list[dict]):
    """The report's figure: the training curves of every trained stage (FP32, each QAT
    variant), accuracy against size and against latency for every model (each chart half the
    width), and every model's confusion matrix."""
    plt = artifacts.plt
    trained = {stage: series for stage in found
               if (series := artifacts.read_epoch_metrics(run / stage / "csv" / "metrics.csv"))}
    ncols = max(4, 2 * len(trained))
    conf_rows = -(-len(found) // ncols)
    fig = plt.figure(figsize=(5.5 * ncols, 5 * (2 + conf_rows) + 2))
    grid = fig.add_gridspec(2 + conf_rows, ncols, height_ratios=[1, 1.4] + [1] * conf_rows)
    for i, (stage, series) in enumerate(trained.items()):
        artifacts.plot_curves(fig.add_subplot(grid[0, 2 * i]), fig.add_subplot(grid[0, 2 * i + 1]),
                              series, stage.upper())
    if not trained:
        ax = fig.add_subplot(grid[0, :])
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no training curves (no fp32/qat csv)", ha="center", va="center")
    half, tradeoffs = ncols // 2, []
    for cols, key, what in ((slice(0, half), "size_mb", "size (MB)"),
                            (slice(half, ncols), "latency_ms", "latency (ms, one image)")):
        ax = fig.add_subplot(grid[1, cols])
        tradeoffs.append((ax, _plot_tradeoff(ax, rows, key, what)))
    for i, (stage, m) in enumerate(found.items()):
        ax = fig.add_subplot(grid[2 + i // ncols, i % ncols])
        if m.get("confusion_matrix"):
            artifacts.plot_confusion(ax, torch.tensor(m["confusion_matrix"]), m["classes"],
                                     f"{stage.upper()} ({m['accuracy']:.2f}%)")
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{stage.upper()}: no confusion matrix", ha="center", va="center")
    fig.tight_layout()
    for ax, points in tradeoffs:  # where the names go depends on the final layout
        _place_labels(ax, points)
    return fig


def save_figure(path: Path, run: Path, found: dict[str, dict], rows: list[dict]) -> Path:
    """report.png (report_figure), written atomically."""
    return artifacts.save_fig(report_figure(run, found, rows), path)


def sensitivity_notes(run: Path, found: dict[str, dict], worst: int = 5) -> tuple[list[str], dict]:
    """The worst ops of each INT8 stage, where stage=sensitivity has measured them."""
    notes, table = [], {}
    for stage, m in found.items():
        if m["stage"] == "fp32":
            continue
        path = run / stage / "sensitivity" / "sensitivity.json"
        if not path.is_file():
            notes.append(f"- {stage}: not measured (`python quantize.py stage=sensitivity "
                         f"name={m['name']} from={stage}`).")
            continue
        sens = json.loads(path.read_text())
        base = sens["accuracy"]["float"]
        ops = sens["worst_first"][:worst]
        table[stage] = [op["name"] for op in ops]
        listed = "; ".join(
            f"{op['name']} ({op['accuracy_only_this_quantized'] - base:+.2f} pt when only it is "
            f"quantized, {op['float_gain']:+.2f} pt when only it stays float)" for op in ops)
        notes.append(f"- {stage} ({sens['subset']['images']} {sens['subset']['split']} images): "
                     f"{listed}.")
    return notes, table


def selection_notes(found: dict[str, dict]) -> list[str]:
    """Where each trained stage's checkpoint was picked and where PTQ calibrated: a figure
    selected on the test split (data.val_split=0, the reference protocol) says so."""
    notes = []
    for stage, m in found.items():
        if "selected_on" in m:
            where = (f"{m['num_val_images']} validation images carved from the training split"
                     if m["selected_on"] == "val" else
                     "the test split itself (data.val_split=0, the reference protocol): its test "
                     "accuracy is optimistic")
            notes.append(f"- {stage}: checkpoint selected on {where}.")
        elif m["stage"] in ("fp32", "qat"):
            notes.append(f"- {stage}: where its checkpoint was selected is not recorded (a run "
                         f"made before metrics.json had selected_on).")
        if m.get("calibrated_on"):
            notes.append(f"- {stage}: calibrated on {m.get('calib_images')} training images.")
        if m.get("accuracy_autocast") is not None:
            notes.append(f"- {stage}: accuracy in float32 (under bf16 autocast, as trained: "
                         f"{m['accuracy_autocast']:.2f}%); drops are against float32.")
    return notes


def tta_notes(found: dict[str, dict]) -> list[str]:
    """Whether the rows' test figures average test-time augmentation views (module.tta), and a
    warning when the stages differ (their accuracies are then not comparable)."""
    modes = {stage: m.get("tta", "none") for stage, m in found.items()}
    if set(modes.values()) == {"none"}:
        return ["- No test-time augmentation in any row."]
    views = {"flip": 2, "flip_translate": 6}
    notes = [f"- {stage}: test logits averaged over {views[mode]} views ({mode})"
             if mode in views else f"- {stage}: no test-time augmentation"
             for stage, mode in modes.items()]
    if len(set(modes.values())) > 1:
        notes.append("- The stages used different test-time augmentation: their accuracies and "
                     "drops are not comparable. Re-run them with the same module.tta.")
    return notes


def precision(m: dict) -> str | None:
    """What a stage's INT8 model keeps at other than 8 bits: 4-bit weights, float islands."""
    int8 = m.get("int8") or {}
    four = (int8.get("weight_bits") or {}).get("4") or []
    eight = (int8.get("weight_bits") or {}).get("8") or []
    islands = int8.get("float_layers") or []
    parts = []
    if four:
        parts.append("4-bit weights" if not eight else f"{len(four)} of {len(four) + len(eight)} "
                     f"conv/linear ops with 4-bit weights")
    if islands:
        parts.append(f"{len(islands)} float op(s)")
    return ", ".join(parts) or None


def precision_notes(found: dict[str, dict]) -> list[str]:
    """One line per stage that is not plain INT8: its 4-bit ops (size_mb counts their weights
    as 4 bits, packed two per byte; torch's file holds them in int8) and its float islands."""
    notes = []
    for stage, m in found.items():
        what = precision(m)
        if what is None:
            continue
        int8 = m["int8"]
        line = f"- {stage}: {what}"
        if (int8.get("weight_bits") or {}).get("4"):
            line += (f" ({', '.join(int8['weight_bits']['4'][:6])}"
                     f"{' ...' if len(int8['weight_bits']['4']) > 6 else ''}); size "
                     f"{m['size_mb']:.3f} MB with them packed, {m.get('file_mb', m['size_mb']):.3f}"
                     f" MB as torch stores them")
        if int8.get("float_layers"):
            line += f"; in float: {', '.join(int8['float_layers'])}"
        notes.append(line + ".")
    return notes


def integer_notes(run: Path, found: dict[str, dict]) -> tuple[list[str], dict]:
    """The integer model of each INT8 stage that stage=integer exported: agreement with torch,
    and its C build's flash, RAM and time where integer.emit=c built it."""
    notes, table = [], {}
    for stage in found:
        path = run / stage / "integer" / "verify.json"
        if not path.is_file():
            continue
        v = json.loads(path.read_text())
        n = v["images"]
        entry = {"images": n, "identical_logits_fraction": v["identical_logits_fraction"],
                 "accuracy": v["accuracy"], "reference_ms": 1e3 * v["seconds"] / max(n, 1),
                 "torch_ms": 1e3 * v["torch_seconds"] / max(n, 1)}
        line = (f"- {stage}: identical logits on {round(v['identical_logits_fraction'] * n)} of "
                f"{n} test images ({v['accuracy']:.2f} %); per image, batched: reference "
                f"{entry['reference_ms']:.2f} ms, torch INT8 {entry['torch_ms']:.2f} ms")
        c = v.get("c")
        if c and c.get("built"):
            entry["c"] = {k: c.get(k) for k in ("flash_bytes", "code_bytes", "weight_bytes",
                                                "ram_bytes", "ms_per_image",
                                                "identical_fraction", "images", "compiler")}
            flash = (f"flash {c['flash_bytes']:,} B ({c['weight_bytes']:,} weights + "
                     f"{c['code_bytes']:,} code)" if c.get("flash_bytes") else
                     f"weights {c['weight_bytes']:,} B")
            line += (f"; C ({c['compiler']} {c['cflags']}): {flash}, RAM {c['arena_bytes']:,} B, "
                     f"{c['ms_per_image']:.2f} ms per image, identical on "
                     f"{c['identical_fraction']:.4f} of {c['images']}")
        table[stage] = entry
        notes.append(line + ".")
    return notes, table


def run_report(cfg: DictConfig) -> dict:
    """Read outputs/<name>/{fp32,ptq,qat}/metrics.json; write report.md, report.json, report.png."""
    run = Path(cfg.outputs_dir) / cfg.name
    found = {}
    # fp32, ptq, qat first, then tagged variants (ptq-torch, qat-ceil, ...) in name order
    dirs = [run / s for s in STAGES] + sorted(
        d for d in run.glob("*") if d.is_dir() and d.name not in STAGES and d.name.startswith(STAGES))
    for d in dirs:
        if (d / "metrics.json").is_file():
            found[d.name] = json.loads((d / "metrics.json").read_text())
    if not found:
        raise QlabError(f"Nothing to report under {run}: run `python train.py stage=fp32 "
                        f"name={cfg.name}` (then quantize.py stage=ptq, train.py stage=qat) first.")
    cfg, hw = resolve_config(cfg, trains=False)
    load = cpu_load()
    if busy := load_warning(load):
        log.warning(busy)
    with quantized_engine(cfg.quant.backend):  # INT8 weights are repacked for it when loaded
        latency = remeasure_latency(run, found, cfg)
    rows = build_rows(found, latency)
    table = markdown_table(rows)
    by_runtime = runtime_rows(found, latency)
    sens_notes, worst = sensitivity_notes(run, found)
    int_notes, integer = integer_notes(run, found)
    mixed = precision_notes(found)
    missing = [s for s in STAGES if s not in found]
    if "fp32" not in found:
        log.warning("No FP32 run under %s: compression, accuracy drop and speedup are n/a.", run)
    size = _image_size(next(iter(found.values())))
    text = "\n".join([
        f"# qlab report: {cfg.name}", "",
        f"{next(iter(found.values()))['num_test_images']} test images; latency: one 3x{size}x{size} "
        f"image, median of {cfg.bench.runs} runs, every runtime in one process, "
        f"{torch.get_num_threads() if not cfg.bench.threads else cfg.bench.threads} threads, "
        f"INT8 TorchScript on the {cfg.quant.backend} engine; each model in its fastest runtime "
        f"(below), speedup against the fastest FP32 one "
        f"({latency.get('fp32', {}).get('form', 'n/a')}); CPU: {hw['cpu']} "
        f"({hw['cpu_capability']}, int8 pair sums saturate at int16: "
        f"{'yes' if hw.get('int8_saturates') else 'no'})"
        f"{', ISA limited by ' + str(hw['isa_limits']) if hw.get('isa_limits') else ''}.", "",
        *((f"**{busy}**", "") if busy else ()),
        table, "",
        *((f"Missing: {', '.join(missing)} (not run yet).", "") if missing else ()),
        "Selection and test-time augmentation:", "", *selection_notes(found), *tta_notes(found),
        "",
        *(("Mixed precision (all other INT8 models: 8-bit weights and activations):", "",
           *mixed, "") if mixed else ()),
        "## Runtimes", "",
        "Every runtime of every model's artifacts, fastest first; accuracy as the stage measured "
        "it through that runtime on the test split (n/a: not measured there; an FP32 model "
        "tested under bf16 autocast has its own accuracy only in the table above).", "",
        runtimes_table(by_runtime), "",
        *(("## The integer model", "",
           "Exported by stage=integer, checked against torch's INT8 model (its verify.json):",
           "", *int_notes, "") if int_notes else ()),
        *(("## Which ops cost the accuracy", "",
           "The worst ops of each INT8 stage (stage=sensitivity, its sensitivity.md has all):",
           "", *sens_notes, "") if sens_notes else ()),
        "![curves, accuracy vs size and latency, confusion matrices](report.png)", ""])
    artifacts.atomic_write(run / "report.md", lambda tmp: tmp.write_text(text))
    save_figure(run / "report.png", run, found, rows)
    report = {"name": cfg.name, "rows": rows, "runtimes": by_runtime, "missing": missing,
              "selected_on": {s: m.get("selected_on") for s, m in found.items()},
              "tta": {s: m.get("tta", "none") for s, m in found.items()},
              "sensitivity": worst, "integer": integer,
              "latency": latency, "cpu_load": load,
              "threads": cfg.bench.threads or torch.get_num_threads(), "hardware": hw,
              "made_on": {s: m.get("hardware") for s, m in found.items()}}
    artifacts.write_json(run / "report.json", report)
    print(table)
    return report
