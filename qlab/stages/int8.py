"""stage=ptq and stage=qat: make the INT8 model through the configured flow, evaluate, export."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qlab import artifacts
from qlab.bench import measure_latency
from qlab.data import ImageDataModule
from qlab.errors import QlabError
from qlab.evaluate import evaluate
from qlab.hardware import check_int8_exact, quantized_engine, quantized_for, resolve_config
from qlab.quant.flows import Flow, get_flow
from qlab.quant.mixed import boundaries_record, float_islands, plain_8bit, weight_bits_record
from qlab.quant.ptq import calibrate
from qlab.quant.scales import write_scale_table
from qlab.stages.common import (
    base_metrics,
    bench_args,
    build_datamodule,
    build_lit,
    build_trainer,
    evaluate_runtimes,
    fit_and_test,
    output_dir,
    resume_path,
    selection,
)
from qlab.stages.mixed import check_mixed, choose_float_layers, choose_weight_bits, with_choice
from qlab.stages.weights import fp32_model, load_fp32

log = logging.getLogger(__name__)


def example_input(dm: ImageDataModule) -> torch.Tensor:
    """One normalized-space image of the data's shape (flows trace or probe with it)."""
    return torch.zeros(1, len(dm.mean), dm.image_size, dm.image_size)


def require_cpu(device: str) -> None:
    """Quantized kernels (fbgemm/x86/qnnpack/onednn) exist for CPU only."""
    if str(device) != "cpu":
        raise QlabError(f"INT8 models run on CPU only (asked for {device!r}); set quant.device=cpu. "
                        f"Train and fine-tune (QAT) on the GPU, then evaluate the INT8 copy on CPU.")


def int8_record(weight_max: int, quant: DictConfig) -> dict:
    """What an INT8 model was quantized for: stored in metrics.json and in the exported file."""
    return {"target": quant.target, "weight_max": weight_max,
            "quantized_for": quantized_for(weight_max), "engine": quant.backend,
            "reduce_range": bool(quant.reduce_range), "kind": quant.kind,
            "flow": quant.get("flow", "eager"),
            "float_layers": list(quant.get("float_layers") or [])}


def finish_int8(cfg: DictConfig, quant: DictConfig, flow: Flow, *, stage: str,
                prepared: nn.Module, dm: ImageDataModule, out: Path, extra: dict) -> dict:
    """Convert a prepared/QAT model on CPU, evaluate it and write every INT8 output of a stage.
    `quant` is the quantization it was prepared with: quant, or with_choice's copy of it."""
    require_cpu(quant.get("device", "cpu"))
    prepared = prepared.cpu()
    prepared.eval()  # not chained: an exported (PT2E) module's eval() returns None
    summary = write_scale_table(out, flow.scale_table(prepared), max_shift=quant.max_shift)
    int8 = flow.convert(prepared, example_input(dm))
    record = int8_record(flow.weight_max(int8), quant) | (
        {"engine": flow.kernels} if flow.kernels else {}) | ({"kind": flow.kind} if flow.kind else {})
    check_int8_exact(record["weight_max"], record["engine"], f"The {stage} INT8 model")
    result = evaluate(int8, dm.test_dataloader(), num_classes=dm.num_classes, mean=dm.mean,
                      std=dm.std, label_smoothing=cfg.module.label_smoothing, tta=cfg.module.tta)
    if not plain_8bit(quant.get("weight_bits", 8)):
        record["weight_bits"] = weight_bits_record(int8, quant.weight_bits)
    if float_islands(int8):  # eager islands: where 8-bit rounding is left around them
        record["float_boundaries"] = boundaries_record(int8)
    file_mb = artifacts.save_state_dict(out / artifacts.STATE_DICT_FILE, int8)
    # 4-bit weights count as half a byte each (the integer model packs them two per byte)
    size_mb = file_mb - record.get("weight_bits", {}).get("packed_saving_bytes", 0) / 1e6
    exported = flow.export(int8, dm.mean, dm.std, out,
                           meta=record | {"hardware": extra.get("hardware", {})},
                           example=example_input(dm))
    record |= exported.info
    latency = measure_latency(exported.deployable, **bench_args(cfg, dm))
    # the same test split through every other runtime of the artifacts (fed [0,1] images),
    # and through the deployed form when it is not the converted model itself
    others = exported.runtimes | (
        {flow.deployed_form: exported.deployable} if flow.deployed_form else {})
    runtimes = evaluate_runtimes(others, dm, cfg)
    title = f"{stage.upper()} INT8 test ({result['accuracy']:.2f}%)"
    confmat = result.pop("confmat")
    artifacts.save_confusion(out / "confusion_matrix.png", confmat, dm.classes, title)
    metrics = base_metrics(cfg, stage, dm, out) | extra | {
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "size_mb": size_mb,
        "file_mb": file_mb,
        "latency": latency,
        "backend": quant.backend,
        "quant": OmegaConf.to_container(quant, resolve=True),
        "int8": record,
        "scales": summary,
        "confusion_matrix": confmat.tolist(),
        "runtimes": {name: {"accuracy": r["accuracy"], "loss": r["loss"],
                            "agrees_with_torch": r["accuracy"] == result["accuracy"]}
                     for name, r in runtimes.items()},
    }
    artifacts.write_json(out / "metrics.json", metrics)
    return metrics


def run_ptq(cfg: DictConfig) -> dict:
    """fp32 weights -> prepare -> calibrate -> convert -> evaluate -> outputs/<name>/ptq."""
    out = output_dir()
    torch.manual_seed(cfg.seed)
    cfg, hw = resolve_config(cfg, trains=False)
    with quantized_engine(cfg.quant.backend):  # the INT8 kernels of every step below
        flow = get_flow(cfg.quant.flow)
        check_mixed(cfg.quant, flow)  # a bad option is refused before any data is read
        dm = build_datamodule(cfg)
        model, weights, model_cfg = load_fp32(cfg, dm.num_classes)
        dm.setup()
        extra = {}
        if cfg.quant.mixed.max_drop is not None:  # float islands chosen on validation images
            prepared, extra["mixed"] = choose_float_layers(cfg, flow, model, dm, example_input(dm))
            quant = with_choice(cfg.quant, float_layers=extra["mixed"]["float_layers"])
            seen = extra["mixed"]["calib_images"]
        elif cfg.quant.mixed.get("size_mb") is not None:  # 4-bit ops chosen on validation images
            prepared, extra["mixed_bits"] = choose_weight_bits(cfg, flow, model, dm,
                                                               example_input(dm))
            quant = with_choice(cfg.quant, weight_bits=dict.fromkeys(
                extra["mixed_bits"]["weight_bits_4"], 4))
            seen = extra["mixed_bits"]["calib_images"]
        else:
            quant = cfg.quant
            prepared = flow.prepare_ptq(model.eval(), quant, example_input(dm))
            seen = calibrate(prepared, dm.calib_dataloader(), batches=cfg.quant.calib_batches,
                             mean=dm.mean, std=dm.std)
        extra |= {"fp32_weights": str(weights), "calib_images": seen, "calibrated_on": "train",
                  "hardware": hw,
                  "model": OmegaConf.to_container(model_cfg, resolve=True)}
        return finish_int8(cfg, quant, flow, stage="ptq", prepared=prepared, dm=dm, out=out,
                           extra=extra)


def run_qat(cfg: DictConfig) -> dict | None:
    """Fine-tune the FP32 weights with po2 fake-quant, then convert a CPU copy to INT8."""
    out = output_dir()
    ckpt_path = resume_path(cfg, out)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.optimizer.lr != cfg.quant.qat.lr:  # conf/stage/qat.yaml sets one from the other
        # an FP32 command reused for QAT (one D="..." for every stage) carries the FP32 lr, which
        # would wreck the trained weights within an epoch: QAT's lr is quant.qat.lr, always
        log.warning("stage=qat fine-tunes at quant.qat.lr=%s; optimizer.lr=%s from the command "
                    "line is the FP32 stage's and is not used (set quant.qat.lr=... to change it)",
                    cfg.quant.qat.lr, cfg.optimizer.lr)
        cfg.optimizer.lr = cfg.quant.qat.lr
    cfg, hw = resolve_config(cfg, trains=True)
    with quantized_engine(cfg.quant.backend):  # the INT8 kernels of every step below
        flow = get_flow(cfg.quant.flow)
        check_mixed(cfg.quant, flow)
        if cfg.quant.mixed.max_drop is not None:
            raise QlabError("quant.mixed.max_drop chooses float islands by PTQ; for QAT, pass the "
                            "ops it chose: quant.float_layers=[...] (the PTQ run's metrics.json, "
                            "mixed.float_layers).")
        if cfg.quant.mixed.get("size_mb") is not None:
            raise QlabError("quant.mixed.size_mb chooses 4-bit ops by PTQ; for QAT, pass the ops "
                            "it chose: quant.weight_bits={op: 4, ...} (the PTQ run's "
                            "metrics.json, int8.weight_bits.4).")
        dm = build_datamodule(cfg)
        model, weights, model_cfg = fp32_model(cfg, dm.num_classes)  # the callback loads the weights
        callback = flow.qat_callback(cfg.quant, weights, example_input(dm))
        lit = build_lit(cfg, model, dm)
        trainer = build_trainer(cfg, [callback])
        result = fit_and_test(trainer, lit, dm, ckpt_path)
        if not trainer.is_global_zero:
            return None
        artifacts.save_curves(out / "curves.png", out / "csv" / "metrics.csv", "QAT (fake-quant)")
        result.pop("confmat")
        extra = {f"fake_quant_{k}": result.pop(k) for k in ("accuracy", "loss")} | result | selection(dm) | {
            "fp32_weights": str(weights),
            "model": OmegaConf.to_container(model_cfg, resolve=True),
            "precision": str(cfg.trainer.precision),
            "lr": cfg.optimizer.lr,
            "hardware": hw,
        }
        return finish_int8(cfg, cfg.quant, flow, stage="qat", prepared=lit.model, dm=dm,
                           out=out, extra=extra)
