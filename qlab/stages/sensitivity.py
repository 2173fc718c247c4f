"""stage=sensitivity: which quantized op of an INT8 stage costs the accuracy (see
qlab.quant.sensitivity), written to outputs/<name>/<from>/sensitivity/."""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qlab import artifacts
from qlab.checkpoint import load_fp32_weights
from qlab.errors import QlabError
from qlab.hardware import quantized_engine, resolve_config
from qlab.integer.verify import stage_metrics
from qlab.models import Normalize
from qlab.quant.mixed import make_float_islands
from qlab.quant.ptq import calibrate
from qlab.quant.sensitivity import (
    GraphSimulation,
    Simulation,
    find_ops,
    output_stats,
    sweeps,
)
from qlab.stages.common import build_datamodule, output_dir
from qlab.stages.integer import rebuild_int8

log = logging.getLogger(__name__)


def normalized_batches(images: torch.Tensor, labels: torch.Tensor, *, mean, std,
                       batch_size: int) -> list:
    """(normalized float images, labels) batches of uint8 images, in order."""
    normalize = Normalize(mean, std)
    return [(normalize(images[i:i + batch_size].float() / 255.0), labels[i:i + batch_size])
            for i in range(0, len(labels), batch_size)]


def subset(dm, split: str, images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of `images` images of a split (all of them when fewer)."""
    x, y = dm.splits[split]
    if len(y) == 0:
        raise QlabError(f"sensitivity.split={split}: this data has no {split} images "
                        f"({'set data.val_split > 0' if split == 'val' else 'check data.root'}).")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:images]
    return x[idx], y[idx]


def scale_rows(stage_dir: Path) -> dict[tuple[str, str], dict]:
    """The stage's own scales.csv (its observers' choices): (layer, tensor) -> row."""
    path = stage_dir / "scales.csv"
    if not path.is_file():
        return {}
    with path.open() as f:
        return {(r["layer"], r["tensor"]): r for r in csv.DictReader(f)}


def _rounding(row: dict | None) -> str | None:
    """Which way the observer's scales went to a power of two: down (the largest values clip),
    up, or mixed (per-channel)."""
    if not row:
        return None
    down, n = int(row["rounded_down"]), int(row["channels"])
    return "down" if down == n else "up" if down == 0 else f"down in {down} of {n}"


SIMULATION = {
    "eager": "fused FP32 model with the converted model's dequantized weights and biases and "
             "its output scales/zero points as fake-quantize after each op",
    "pt2e": "the convert_pt2e graph with each quantize/dequantize pair a switchable "
            "fake-quantize and each dequantized weight and snapped bias switchable to the "
            "prepared (BN-folded) float one",
}


def _pt2e_simulation(stage_dir: Path, metrics: dict, model, dm, images: torch.Tensor):
    """The PT2E stage made again (prepare, calibrate on the stage's batches, convert), checked
    against its saved q/dq program on `images` (uint8), and its GraphSimulation."""
    from qlab.quant.flows.pt2e import Pt2eFlow
    from qlab.runtimes import load_pt2e

    quant = OmegaConf.create(metrics["quant"])
    flow = Pt2eFlow()
    normalize = Normalize(dm.mean, dm.std)
    x01 = images.float() / 255.0
    prepared = flow.prepare_ptq(model, quant, normalize(x01[:1]))
    calibrate(prepared, dm.calib_dataloader(), batches=quant.calib_batches, mean=dm.mean,
              std=dm.std)
    int8 = flow.convert(prepared, normalize(x01[:1]))
    reproduced = None
    saved = stage_dir / "model_int8_pt2e.pt2"
    if saved.is_file():
        with torch.inference_mode():
            reproduced = bool(torch.equal(load_pt2e(saved)(x01), int8(normalize(x01))))
        if not reproduced:
            log.warning("The PT2E model made again differs from %s: the sensitivity figures are "
                        "of the model made now (same options, same calibration batches).", saved)
    return int8, GraphSimulation(int8, prepared), reproduced


@torch.inference_mode()
def _converted_and_agreement(int8, sim, batches) -> dict:
    """The converted model's accuracy and its top-1 agreement with the simulation (all ops
    quantized), in one pass over the images."""
    correct = agree = total = 0
    for x, y in batches:
        predicted = int8(x).argmax(1)
        correct += int((predicted == y).sum())
        agree += int((predicted == sim(x).argmax(1)).sum())
        total += len(y)
    return {"converted": 100.0 * correct / max(total, 1), "agreement": agree / max(total, 1)}


def worst_first(ops: list[dict], fp32: float) -> list[dict]:
    """Ops ordered by the accuracy lost with only that op quantized, then by the accuracy won
    back with only that op in float, then by the lowest output SQNR."""
    def key(op):
        sqnr = op["output_sqnr_db"]
        return (-(fp32 - op["accuracy_only_this_quantized"]), -op["float_gain"],
                sqnr if sqnr is not None and math.isfinite(sqnr) else math.inf)
    return sorted(ops, key=key)


def _fmt(v, fmt: str = ".1f") -> str:
    """A table cell: '-' for None, inf, else v formatted (integers as they are)."""
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return str(v) if isinstance(v, int) else format(v, fmt)


def markdown(result: dict) -> str:
    acc = result["accuracy"]
    head = [f"# Sensitivity of {result['name']}/{result['from']} ({result['flow']} flow)", "",
            f"Accuracy on {result['subset']['images']} {result['subset']['split']} images "
            f"(seeded subset): FP32 fused {acc['float']:.2f} %, all ops quantized "
            f"{acc['quantized']:.2f} % (simulated; the converted model: {acc['converted']:.2f} %, "
            f"top-1 agreement {acc['agreement']:.4f}). SQNR and clipping on "
            f"{result['calibration_images']} un-augmented training images.", "",
            "Worst first. `alone`: accuracy with only this op quantized (drop from FP32); "
            "`float`: with only this op left in float (gain over all-INT8); `clipped`: share of "
            "the FP32 output outside the op's INT8 range; exponents are log2 of the scales.", "",
            "| # | op | kind | alone | drop | float | gain | out SQNR dB | w SQNR dB | clipped | "
            "out exp | w exp | rounded |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for i, op in enumerate(result["worst_first"], 1):
        w = op["weight_exponents"]
        rows.append(
            f"| {i} | {op['name']} | {op['kind']} | {op['accuracy_only_this_quantized']:.2f} | "
            f"{acc['float'] - op['accuracy_only_this_quantized']:+.2f} | "
            f"{op['accuracy_only_this_float']:.2f} | {op['float_gain']:+.2f} | "
            f"{_fmt(op['output_sqnr_db'])} | {_fmt(op['weight_sqnr_db'])} | "
            f"{_fmt(op['clipped_fraction'], fmt='.2e')} | {_fmt(op['output_scale_exponent'])} | "
            f"{'-' if w is None else (w[0] if w[0] == w[1] else f'{w[0]}..{w[1]}')} | "
            f"{op['output_rounding'] or '-'} / {op['weight_rounding'] or '-'} |")
    return "\n".join(head + rows) + "\n"


def plot(path: Path, result: dict) -> Path:
    """Per-op accuracies (both sweeps) and SQNRs, in execution order."""
    plt = artifacts.plt
    ops = result["ops"]
    x = range(len(ops))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.28 * len(ops) + 3), 7), sharex=True)
    acc = result["accuracy"]
    ax1.plot(x, [o["accuracy_only_this_quantized"] for o in ops], "o-", ms=3,
             label="only this op quantized")
    ax1.plot(x, [o["accuracy_only_this_float"] for o in ops], "s-", ms=3,
             label="only this op in float")
    ax1.axhline(acc["float"], color="k", lw=0.8, ls="--", label=f"FP32 {acc['float']:.2f}%")
    ax1.axhline(acc["quantized"], color="r", lw=0.8, ls=":",
                label=f"all INT8 {acc['quantized']:.2f}%")
    ax1.set_ylabel("accuracy (%)")
    ax1.legend(fontsize=7)
    ax1.set_title(f"{result['name']}/{result['from']}: per-op sensitivity "
                  f"({result['subset']['images']} {result['subset']['split']} images)")

    def finite(v):
        return v if v is not None and math.isfinite(v) else float("nan")
    ax2.bar([i - 0.2 for i in x], [finite(o["output_sqnr_db"]) for o in ops], 0.4,
            label="output SQNR")
    ax2.bar([i + 0.2 for i in x], [finite(o["weight_sqnr_db"]) for o in ops], 0.4,
            label="weight SQNR")
    ax2.set_ylabel("SQNR (dB)")
    ax2.legend(fontsize=7)
    ax2.set_xticks(list(x))
    ax2.set_xticklabels([o["name"] for o in ops], rotation=90, fontsize=6)
    fig.tight_layout()
    return artifacts.save_fig(fig, path)


def run_sensitivity(cfg: DictConfig) -> dict:
    """outputs/<name>/<from>/sensitivity/: sensitivity.json, sensitivity.md, sensitivity.png."""
    t0 = time.perf_counter()
    source = str(cfg["from"])
    stage_dir = Path(cfg.outputs_dir) / cfg.name / source
    metrics = stage_metrics(stage_dir, reader="stage=sensitivity", flows=("eager", "pt2e"))
    flow_name = metrics["int8"].get("flow", "eager")
    if flow_name == "pt2e" and metrics["stage"] != "ptq":
        raise QlabError(f"{stage_dir} is a PT2E {metrics['stage']} stage: its fine-tuned float "
                        f"weights are not kept, and sensitivity compares against them. Measure "
                        f"the PT2E PTQ stage, or the eager flow's QAT.")
    sens = cfg.sensitivity
    if sens.split not in ("test", "val"):
        raise QlabError(f"sensitivity.split={sens.split}: use test or val.")
    if sens.images < 1 or sens.calib_images < 1:
        raise QlabError("sensitivity.images and sensitivity.calib_images must be >= 1.")
    out = output_dir()
    cfg, hw = resolve_config(cfg, trains=False)
    with quantized_engine(cfg.quant.backend) as engine:
        dm = build_datamodule(cfg)
        if list(dm.classes) != list(metrics["classes"]):
            raise QlabError(f"The data has classes {dm.classes}, the {source} model was trained on "
                            f"{metrics['classes']}: pass the same data= options as that run.")
        dm.setup()
        fp32_weights = Path(metrics.get("fp32_weights") or "")
        if not fp32_weights.is_file():
            raise QlabError(f"The FP32 weights {source} was made from ({fp32_weights}) are gone: "
                            f"sensitivity compares against them.")
        model = instantiate(OmegaConf.create(metrics["model"]), num_classes=len(metrics["classes"]))
        load_fp32_weights(model, fp32_weights).eval()
        mean, std = metrics["mean"], metrics["std"]
        calib_x, calib_y = subset(dm, "train", sens.calib_images, cfg.seed)
        calib = [x for x, _ in normalized_batches(calib_x, calib_y, mean=mean, std=std,
                                                  batch_size=sens.batch_size)]
        test = normalized_batches(*subset(dm, sens.split, sens.images, cfg.seed), mean=mean,
                                  std=std, batch_size=sens.batch_size)
        if flow_name == "eager":
            int8 = rebuild_int8(stage_dir, metrics)
            fused = model
            fused.fuse_model(is_qat=False)
            make_float_islands(fused, metrics["int8"].get("float_layers") or ())  # names as in int8
            ops = find_ops(int8, fused, calib[0][:1])
            output_stats(ops, fused, int8, calib)
            sim = Simulation(fused, ops)
            reproduced = None
        else:
            int8, sim, reproduced = _pt2e_simulation(stage_dir, metrics, model, dm, calib_x[:64])
            sim.output_stats(calib)
            ops = sim.ops
        acc = sweeps(sim, test, progress=lambda s: log.info("sensitivity %s", s))
        acc |= _converted_and_agreement(int8, sim, test)
        rows = scale_rows(stage_dir)
        records = []
        for op in ops:
            layer = "quant" if op.kind == "input" else op.name
            records.append({"name": op.name, "kind": op.kind} | op.stats | {
                "float_gain": op.stats["accuracy_only_this_float"] - acc["quantized"],
                "output_scale": op.scale, "zero_point": op.zero_point,
                "output_rounding": _rounding(rows.get((layer, "activation"))),
                "weight_rounding": _rounding(rows.get((op.name, "weight"))),
            })
        worst = worst_first(records, acc["float"])
        result = {"name": cfg.name, "from": source, "flow": flow_name,
                  "engine": engine, "accuracy": acc, "pt2e_reproduced": reproduced,
                  "subset": {"split": sens.split, "images": sum(len(y) for _, y in test),
                             "seed": cfg.seed},
                  "calibration_images": len(calib_y), "simulation": SIMULATION[flow_name],
                  "ops": records, "worst_first": worst,
                  "worst": [op["name"] for op in worst[: sens.worst]],
                  "seconds": time.perf_counter() - t0, "hardware": hw}
        artifacts.write_json(out / "sensitivity.json", result)
        artifacts.atomic_write(out / "sensitivity.md", lambda tmp: tmp.write_text(markdown(result)))
        plot(out / "sensitivity.png", result)
        log.info("sensitivity of %s: %d ops, worst %s; simulated %.2f%% vs converted %.2f%%, %.0f s",
                 source, len(ops), ", ".join(result["worst"]), acc["quantized"], acc["converted"],
                 result["seconds"])
        return result
