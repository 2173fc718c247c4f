"""FP32 vs PTQ-INT8 vs QAT-INT8 ResNet-50 on CPU: latency (1 image) and throughput (batch 256),
in every runtime a user could pick: eager, frozen TorchScript (per INT8 engine), inductor
(torch.compile, freezing), ONNX Runtime; INT8 also down torchao's PT2E flow (inductor, ONNX
Runtime) and, as the outside baseline, ONNX Runtime's own quantize_static.

python benchmarks/inference.py [--runs 1000] [--batch-iters 3] [--stems cifar,imagenet]
                               [--no-export-runtimes]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch
from omegaconf import OmegaConf

from qlab.artifacts import export_program, freeze, save_onnx
from qlab.bench import measure_latency
from qlab.data import CIFAR_MEAN as MEAN
from qlab.data import CIFAR_STD as STD
from qlab.hardware import (
    check_int8_exact,
    int8_saturates,
    native_cpu_bf16,
    quantized_engine,
    quantized_weight_max,
    resolve_engine,
)
from qlab.models import build_resnet50
from qlab.quant.flows import get_flow
from qlab.quant.onnx_qdq import int32_biases
from qlab.quant.ptq import calibrate, convert_int8, quantize_ptq
from qlab.quant.qat import QATCallback
from qlab.quant.qconfig import build_qconfig
from qlab.runtimes import OnnxRuntime, inductor

from common import print_table, save

warnings.filterwarnings("ignore")
NOT_ENGINES = ("-", "onnxruntime")  # rows not run by a torch.backends.quantized engine


def throughput(fn, batch: int, iters: int) -> float:
    """Images/s of fn on a [batch, 3, 32, 32] input, after one warm-up call."""
    x = torch.rand(batch, 3, 32, 32)
    with torch.inference_mode():
        fn(x)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
    return batch * iters / (time.perf_counter() - t0)


QUANT = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "quant" / "po2.yaml")


def calibration_batches() -> list:
    """Four batches of 32 random uint8 images (the same for every flow)."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g), None)
            for _ in range(4)]


def onnx_session(model: torch.nn.Module, int8: bool = False) -> OnnxRuntime:
    """The model exported (torch.export, dynamic batch) to ONNX and run by ONNX Runtime; an INT8
    (PT2E) one with int32 biases, as stage=ptq writes it."""
    example = torch.zeros(2, 3, 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        save_onnx(export_program(model, example), example, path)
        proto = onnx.load(str(path))
    if int8:
        proto, _ = int32_biases(proto)
    return OnnxRuntime.from_bytes(proto.SerializeToString())


def flow_int8(flow_name: str, fp32: torch.nn.Module) -> torch.nn.Module:
    """PTQ INT8 of `fp32` through a flow (pt2e: torchao's po2 PT2E graph; ort: ONNX Runtime's
    quantize_static), calibrated on the same batches as the eager flow."""
    flow = get_flow(flow_name)
    example = torch.zeros(1, 3, 32, 32)
    prepared = flow.prepare_ptq(copy.deepcopy(fp32).eval(), QUANT, example)
    calibrate(prepared, calibration_batches(), batches=4, mean=MEAN, std=STD)
    return flow.convert(prepared, example)


def int8_models(stem: str, engine: str, fp32: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """PTQ (calibrated on random images) and QAT (one fake-quant step) INT8 copies for `engine`
    (the engine set by the caller)."""
    example = torch.zeros(1, 3, 32, 32)
    ptq = quantize_ptq(copy.deepcopy(fp32), build_qconfig(backend=engine), calibration_batches(),
                       batches=4, mean=MEAN, std=STD, example=example)
    qat_model = copy.deepcopy(fp32)
    QATCallback(qconfig=build_qconfig(backend=engine, qat=True), fp32_weights=None,
                freeze_observer_epoch=9, freeze_bn_epoch=9).setup(None, type("M", (), {
                    "model": qat_model})(), "fit")
    qat_model(torch.randn(32, 3, 32, 32))  # one observed step sets the fake-quant scales
    models = {"ptq": ptq, "qat": convert_int8(qat_model, example)}
    for name, int8 in models.items():  # refuse to time a model whose outputs would be wrong here
        check_int8_exact(quantized_weight_max(int8), engine, f"{stem} {name} on {engine}")
    return models


def script_frozen(model: torch.nn.Module) -> torch.jit.ScriptModule:
    return freeze(torch.jit.script(model.eval()))


def race_runtimes(stem: str, contenders: dict[str, tuple], args) -> dict:
    """One-image latency of every contender (label -> (model, INT8 engine or None)), interleaved
    over `rounds` rounds so that drift in the machine's speed hits every one alike; the median
    of the rounds ranks them. FP32 and INT8 are ranked apart."""
    times: dict[str, list[float]] = {label: [] for label in contenders}
    for _ in range(args.rounds):
        for label, (model, engine) in contenders.items():
            with quantized_engine(engine) if engine is not None else contextlib.nullcontext():
                times[label].append(measure_latency(model, runs=args.runs, warmup=args.warmup)["median_ms"])
    medians = {label: statistics.median(t) for label, t in times.items()}
    fastest = {kind: min((lb for lb in medians if lb.startswith(kind)), key=medians.get)
               for kind in ("fp32", "ptq")}
    print(f"\n  {stem}: one-image latency, median of {args.rounds} interleaved rounds:\n    "
          + "\n    ".join(f"{lb:32s} {m:7.3f} ms" for lb, m in sorted(medians.items(),
                                                                         key=lambda kv: kv[1]))
          + f"\n  fastest here: FP32 {fastest['fp32']}, INT8 {fastest['ptq']}; "
          f"quant.backend=auto picks {resolve_engine('auto')}", flush=True)
    return {"stem": stem, "rounds": times, "median_ms": medians, "fastest": fastest,
            "auto": resolve_engine("auto")}


def bench_stem(stem: str, args, rows: list, results: list, race: list) -> None:
    torch.manual_seed(0)
    fp32 = build_resnet50(stem=stem).eval()
    lat = {"runs": args.runs, "warmup": args.warmup}

    contenders: dict[str, tuple] = {}

    def record(model_name, form, engine, fn, ref=None):
        if model_name in ("fp32", "ptq"):
            contenders[f"{model_name} {form} {engine}"] = (
                fn, engine if engine not in NOT_ENGINES and "pt2e" not in form else None)
        latency = measure_latency(fn, **lat)
        ips = throughput(fn, args.batch, args.batch_iters)
        same = diff = None
        if ref is not None:
            x = torch.rand(8, 3, 32, 32)
            with torch.inference_mode():
                out, expected = fn(x), ref(x)
            same, diff = bool(torch.equal(out, expected)), float((out - expected).abs().max())
        r = {"stem": stem, "model": model_name, "form": form, "engine": engine,
             "int8_saturates": None if engine in NOT_ENGINES else int8_saturates(engine),
             "median_ms": latency["median_ms"], "p90_ms": latency["p90_ms"],
             "batch_images_per_s": ips, "equals_eager": same, "max_abs_diff_vs_eager": diff}
        results.append(r)
        print(f"  {stem:8s} {model_name:5s} {engine:7s} {form:18s} "
              f"{latency['median_ms']:7.3f} ms  {ips:8.1f} img/s", flush=True)

    def bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fp32(x)

    record("fp32", "eager", "-", fp32)
    record("fp32", "torchscript-frozen", "-", script_frozen(copy.deepcopy(fp32)))
    if native_cpu_bf16() or args.bf16:  # emulated bf16 is about 10x slower: not a contender
        record("fp32", "eager-bf16-autocast", "-", bf16)
    if args.export_runtimes:
        record("fp32", "inductor", "-", inductor(copy.deepcopy(fp32), 32), ref=fp32)
        record("fp32", "onnxruntime", "-", onnx_session(fp32), ref=fp32)
        pt2e = flow_int8("pt2e", fp32)  # the reference q/dq graph: "eager" of this flow
        record("ptq", "pt2e-inductor", "onednn", inductor(pt2e, 32), ref=pt2e)
        record("ptq", "pt2e-onnxruntime", "onnxruntime", onnx_session(pt2e, int8=True), ref=pt2e)
        record("ptq", "ort-quantize_static", "onnxruntime", flow_int8("ort", fp32))
    for engine in args.engines:
        with quantized_engine(engine):
            models = int8_models(stem, engine, fp32)
            for name, int8 in models.items():
                if name == "qat" and not args.qat_all_forms and engine != args.engines[0]:
                    continue
                record(name, "eager", engine, int8)
                frozen = script_frozen(copy.deepcopy(int8))
                record(name, "torchscript-frozen", engine, frozen, ref=int8)
    if args.rounds > 1:
        race.append(race_runtimes(stem, contenders, args))
    best_fp32 = min(r["median_ms"] for r in results if r["stem"] == stem and r["model"] == "fp32")
    for r in results:
        if r["stem"] == stem:
            r["speedup_vs_best_fp32"] = best_fp32 / r["median_ms"]
            rows.append([r["stem"], r["model"], r["engine"], r["form"], r["median_ms"], r["p90_ms"],
                         r["batch_images_per_s"], f"{r['speedup_vs_best_fp32']:.2f}x",
                         "" if r["equals_eager"] is None else r["equals_eager"]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=1000, help="latency runs per model (1 image)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batch-iters", type=int, default=3)
    p.add_argument("--stems", default="cifar,imagenet")
    p.add_argument("--engines", default="x86,fbgemm,onednn")
    p.add_argument("--qat-all-forms", action="store_true", help="QAT on every engine, not just the first")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds racing every FP32 and PTQ runtime (one image); 1: no race")
    p.add_argument("--no-export-runtimes", dest="export_runtimes", action="store_false",
                   help="skip inductor, ONNX Runtime, PT2E and quantize_static rows")
    p.add_argument("--bf16", action="store_true",
                   help="also time bf16 autocast on a CPU that only emulates it (about 10x slower)")
    args = p.parse_args()
    args.engines = [e for e in args.engines.split(",") if e in torch.backends.quantized.supported_engines]
    rows, results, race = [], [], []
    for stem in args.stems.split(","):
        bench_stem(stem, args, rows, results, race)
    print_table(f"Inference, {torch.get_num_threads()} threads (latency: median/p90 over {args.runs} "
                f"runs of one 3x32x32 image; throughput: batch {args.batch})",
                ["stem", "model", "engine", "form", "median ms", "p90 ms", "img/s", "speedup",
                 "= eager"], rows)
    save("inference", {"args": vars(args), "results": results, "race": race})


if __name__ == "__main__":
    main()
