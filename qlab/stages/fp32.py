"""stage=fp32: train, test the best checkpoint, export model_fp32.pt."""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig

from qlab import artifacts
from qlab.bench import measure_latency
from qlab.evaluate import evaluate
from qlab.hardware import resolve_config
from qlab.models import Deployable, Normalize
from qlab.runtimes import OnnxRuntime, inductor
from qlab.stages.common import (
    base_metrics,
    bench_args,
    build_datamodule,
    build_lit,
    build_model,
    build_trainer,
    evaluate_runtimes,
    export,
    fit_and_test,
    output_dir,
    resume_path,
    selection,
)


def export_more(cfg: DictConfig, model, dm, out, meta: dict) -> dict:
    """model_fp32.pt2 and model_fp32.onnx (cfg.export), and the test accuracy of the runtimes
    that run them: inductor (torch.compile; with the .pt2 and bench.inductor) and ONNX Runtime
    (the .onnx)."""
    if not (cfg.export.pt2 or cfg.export.onnx):
        return {}
    deployable = Deployable(model, dm.mean, dm.std).eval()
    example = torch.zeros(1, len(dm.mean), dm.image_size, dm.image_size)
    artifacts.save_exported(out, "model_fp32", deployable, example, meta,
                            pt2=cfg.export.pt2, onnx=cfg.export.onnx)
    runs = {}
    if cfg.export.pt2 and cfg.bench.inductor:
        runs["inductor"] = inductor(deployable, dm.image_size, len(dm.mean))
    if cfg.export.onnx:
        runs["onnxruntime"] = OnnxRuntime(out / "model_fp32.onnx")
    results = evaluate_runtimes(runs, dm, cfg)
    return {name: {"accuracy": r["accuracy"], "loss": r["loss"]} for name, r in results.items()}


def init_from_data(model: torch.nn.Module, dm, images: int = 5000) -> None:
    """Data-dependent initialisation (AirNet's patch whitening) from un-augmented training
    images, seeded: never from validation or test images."""
    if not hasattr(model, "init_whitening"):
        return
    dm.prepare_data()
    dm.setup("fit")
    x, _ = dm.splits["train"]
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(dm.seed))[:images]
    model.init_whitening(Normalize(dm.mean, dm.std)(x[idx].float() / 255.0))


def float32_test(cfg: DictConfig, model: torch.nn.Module, dm, result: dict) -> dict:
    """The test accuracy in float32, which INT8 drops are measured against. Lightning tested
    under trainer.precision; under bf16 autocast that figure is kept as accuracy_autocast."""
    if str(cfg.trainer.precision) in ("32", "32-true"):
        return {}
    fp32 = evaluate(model, dm.test_dataloader(), num_classes=dm.num_classes, mean=dm.mean,
                    std=dm.std, label_smoothing=cfg.module.label_smoothing, tta=cfg.module.tta)
    return {"accuracy_autocast": result["accuracy"], "loss_autocast": result["loss"],
            "accuracy": fp32["accuracy"], "loss": fp32["loss"], "confmat": fp32["confmat"]}


def run_fp32(cfg: DictConfig) -> dict | None:
    """Train FP32, test the best checkpoint, export model_fp32.pt and write the stage's files."""
    out = output_dir()
    ckpt_path = resume_path(cfg, out)
    L.seed_everything(cfg.seed, workers=True)
    cfg, hw = resolve_config(cfg, trains=True)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm.num_classes)
    if ckpt_path is None:
        init_from_data(model, dm)
    lit = build_lit(cfg, model, dm)
    trainer = build_trainer(cfg)
    result = fit_and_test(trainer, lit, dm, ckpt_path)
    if not trainer.is_global_zero:
        return None
    model = lit.model.eval().cpu().to(memory_format=torch.contiguous_format)
    result |= float32_test(cfg, model, dm, result)
    size_mb = artifacts.save_state_dict(out / "model_fp32_state_dict.pt", model)
    scripted = export(model, dm)
    artifacts.save_torchscript(out / "model_fp32.pt", scripted, meta={"hardware": hw})
    latency = measure_latency(scripted, **bench_args(cfg, dm))
    runtimes = export_more(cfg, model, dm, out, meta={"hardware": hw})
    artifacts.save_curves(out / "curves.png", out / "csv" / "metrics.csv", "FP32")
    confmat = result.pop("confmat")
    artifacts.save_confusion(out / "confusion_matrix.png", confmat, dm.classes,
                             f"FP32 test ({result['accuracy']:.2f}%)")
    metrics = base_metrics(cfg, "fp32", dm, out) | result | selection(dm) | {
        "confusion_matrix": confmat.tolist(),
        "size_mb": size_mb,
        "latency": latency,
        "backend": "fp32",
        "precision": str(cfg.trainer.precision),
        "hardware": hw,
        "runtimes": runtimes,
    }
    artifacts.write_json(out / "metrics.json", metrics)
    return metrics
