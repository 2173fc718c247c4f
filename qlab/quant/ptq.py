"""Post-training quantization and the INT8 outputs that PTQ and QAT share."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.ao.quantization import convert, prepare
from torch.utils.data import DataLoader

from qlab import artifacts
from qlab.bench import measure_latency
from qlab.checkpoint import load_fp32_weights
from qlab.data import ImageDataModule
from qlab.errors import QlabError
from qlab.evaluate import evaluate
from qlab.hardware import check_int8_exact, quantized_for, quantized_weight_max, resolve_config
from qlab.integer.export import snap_biases
from qlab.models import Normalize
from qlab.quant.qconfig import build_qconfig, set_backend
from qlab.quant.scales import scale_table, write_scale_table

log = logging.getLogger(__name__)


def qconfig_from_cfg(quant: DictConfig, *, qat: bool):
    """build_qconfig(**cfg.quant) without the keys that are not qconfig options."""
    keys = ("kind", "backend", "max_shift", "rounding", "per_channel", "activation_dtype",
            "activation_symmetric", "reduce_range", "averaging_constant", "target")
    return build_qconfig(qat=qat, **{k: quant[k] for k in keys if k in quant})


def require_cpu(device: str) -> None:
    """Quantized kernels (fbgemm/x86/qnnpack/onednn) exist for CPU only."""
    if str(device) != "cpu":
        raise QlabError(f"INT8 models run on CPU only (asked for {device!r}); set quant.device=cpu. "
                        f"Train and fine-tune (QAT) on the GPU, then evaluate the INT8 copy on CPU.")


def fp32_weights_path(cfg: DictConfig) -> tuple[Path, dict]:
    """fp32_ckpt=PATH, or the weights and metrics of outputs/<name>/fp32."""
    if cfg.get("fp32_ckpt"):
        return Path(cfg.fp32_ckpt), {}
    run = Path(cfg.outputs_dir) / cfg.name / "fp32"
    weights = run / "model_fp32_state_dict.pt"
    if not weights.is_file():
        raise QlabError(
            f"No FP32 run named {cfg.name!r}: {weights} does not exist. Make one with "
            f"`python train.py stage=fp32 name={cfg.name}` (with the same data=/model= options), "
            f"or point at weights with fp32_ckpt=PATH (a Lightning .ckpt or a state_dict)."
        )
    metrics_path = run / "metrics.json"
    return weights, json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}


def fp32_model_config(cfg: DictConfig, fp32_metrics: dict) -> DictConfig:
    """The architecture the FP32 run was trained with (its metrics.json), else cfg.model."""
    model_cfg = fp32_metrics.get("model")
    if model_cfg and OmegaConf.to_container(cfg.model) != model_cfg:
        log.info("Using the FP32 run's model config %s (not %s)", model_cfg,
                 OmegaConf.to_container(cfg.model))
    return OmegaConf.create(model_cfg) if model_cfg else cfg.model


def load_fp32(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, Path, DictConfig]:
    """Build the FP32 model the run used and load its weights."""
    from hydra.utils import instantiate

    path, metrics = fp32_weights_path(cfg)
    model_cfg = fp32_model_config(cfg, metrics)
    model = instantiate(model_cfg, num_classes=num_classes)
    return load_fp32_weights(model, path), path, model_cfg


@torch.inference_mode()
def calibrate(model: nn.Module, loader: DataLoader, *, batches: int, mean, std) -> int:
    """Run `batches` un-augmented training batches through the observers; returns images seen."""
    if batches < 1:
        raise QlabError(f"quant.calib_batches={batches}: calibration needs at least one batch "
                        f"(the reference recipe used 32).")
    normalize, seen = Normalize(mean, std), 0
    for i, (x, _) in enumerate(loader):
        if i == batches:
            break
        model(normalize(x.float().div_(255.0)))
        seen += x.shape[0]
    if seen == 0:
        raise QlabError("Calibration saw no images: the training split is empty.")
    return seen


def prepare_ptq(model: nn.Module, qconfig) -> nn.Module:
    """Fuse Conv-BN(-ReLU) in eval mode, attach observers."""
    model.eval()
    model.fuse_model(is_qat=False)
    model.qconfig = qconfig
    return prepare(model, inplace=True)


def int8_record(int8: nn.Module, cfg: DictConfig) -> dict:
    """What an INT8 model was quantized for: stored in metrics.json and in the exported file."""
    weight_max = quantized_weight_max(int8)
    return {"target": cfg.quant.target, "weight_max": weight_max,
            "quantized_for": quantized_for(weight_max), "engine": cfg.quant.backend,
            "reduce_range": bool(cfg.quant.reduce_range), "kind": cfg.quant.kind}


def finish_int8(cfg: DictConfig, *, stage: str, prepared: nn.Module, dm: ImageDataModule,
                out: Path, extra: dict) -> dict:
    """Convert a prepared/QAT model on CPU, evaluate it and write every INT8 output of a stage."""
    require_cpu(cfg.quant.get("device", "cpu"))
    prepared = copy.deepcopy(prepared).cpu().eval()
    summary = write_scale_table(out, scale_table(prepared), max_shift=cfg.quant.max_shift)
    int8 = convert(prepared, inplace=False)
    # biases on the int32 accumulator grid: what integer hardware adds, and what makes torch's
    # model compute exactly the shift-requantized integer model (stage=integer)
    snapped = snap_biases(int8, torch.zeros(1, len(dm.mean), dm.image_size, dm.image_size))
    record = int8_record(int8, cfg) | {"biases_snapped": snapped}
    check_int8_exact(record["weight_max"], record["engine"], f"The {stage} INT8 model")
    result = evaluate(int8, dm.test_dataloader(), num_classes=dm.num_classes, mean=dm.mean,
                      std=dm.std, label_smoothing=cfg.module.label_smoothing)
    size_mb = artifacts.save_state_dict(out / "model_int8_state_dict.pt", int8)
    from qlab.stages import export  # one export path for FP32 and INT8

    scripted = export(int8, dm)
    artifacts.save_torchscript(out / "model_int8.pt", scripted, meta=record | {
        "hardware": extra.get("hardware", {})})
    latency = measure_latency(scripted, runs=cfg.bench.runs,
                              warmup=cfg.bench.warmup, threads=cfg.bench.threads,
                              image_size=dm.image_size)
    title = f"{stage.upper()} INT8 test ({result['accuracy']:.2f}%)"
    confmat = result.pop("confmat")
    artifacts.save_confusion(out / "confusion_matrix.png", confmat, dm.classes, title)
    from qlab.stages import base_metrics

    metrics = base_metrics(cfg, stage, dm, out) | extra | {
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "size_mb": size_mb,
        "latency": latency,
        "backend": cfg.quant.backend,
        "quant": OmegaConf.to_container(cfg.quant, resolve=True),
        "int8": record,
        "scales": summary,
        "confusion_matrix": confmat.tolist(),
    }
    artifacts.write_json(out / "metrics.json", metrics)
    return metrics


def run_ptq(cfg: DictConfig) -> dict:
    """fp32 weights -> fuse -> observers -> calibrate -> convert -> evaluate -> outputs/<name>/ptq."""
    from qlab.stages import build_datamodule, output_dir

    out = output_dir()
    torch.manual_seed(cfg.seed)
    hw = resolve_config(cfg, trains=False)
    set_backend(cfg.quant.backend)
    dm = build_datamodule(cfg)
    model, weights, model_cfg = load_fp32(cfg, dm.num_classes)
    dm.setup()
    prepared = prepare_ptq(model, qconfig_from_cfg(cfg.quant, qat=False))
    seen = calibrate(prepared, dm.calib_dataloader(), batches=cfg.quant.calib_batches,
                     mean=dm.mean, std=dm.std)
    extra = {"fp32_weights": str(weights), "calib_images": seen, "hardware": hw,
             "model": OmegaConf.to_container(model_cfg, resolve=True)}
    return finish_int8(cfg, stage="ptq", prepared=prepared, dm=dm, out=out, extra=extra)
