"""Post-training quantization math: qconfig from the config, FP32 weights, calibration, fusion,
and the eager PTQ pipeline (fuse -> prepare -> calibrate -> convert -> snap biases)."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.ao.nn.quantized as nnq
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.ao.quantization import convert, prepare
from torch.utils.data import DataLoader

from qlab.checkpoint import load_fp32_weights
from qlab.errors import QlabError
from qlab.hardware import quantized_for
from qlab.integer.export import snap_biases
from qlab.models import Normalize
from qlab.quant.mixed import make_float_islands, set_op_qconfigs, weight_bits_of
from qlab.quant.qconfig import build_qconfig

log = logging.getLogger(__name__)


def qconfig_from_cfg(quant: DictConfig, *, qat: bool, weight_bits: int = 8):
    """build_qconfig(**cfg.quant) without the keys that are not qconfig options; weights of
    `weight_bits` (quant.weight_bits says which ops get which)."""
    keys = ("kind", "backend", "max_shift", "rounding", "per_channel", "activation_dtype",
            "activation_symmetric", "reduce_range", "averaging_constant", "target",
            "even_zero_point")
    return build_qconfig(qat=qat, weight_bits=weight_bits,
                         **{k: quant[k] for k in keys if k in quant})


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


def prepare_ptq(model: nn.Module, qconfig, float_layers: Sequence[str] = (),
                op_qconfigs: Callable[[nn.Module], Mapping[str, object]] | None = None) -> nn.Module:
    """Fuse Conv-BN(-ReLU) in eval mode, keep `float_layers` in float (qlab.quant.mixed), give
    the ops `op_qconfigs(fused model)` names their own qconfig (4-bit weights), attach
    observers."""
    model.eval()
    model.fuse_model(is_qat=False)
    make_float_islands(model, float_layers)
    model.qconfig = qconfig
    set_op_qconfigs(model, op_qconfigs(model) if op_qconfigs else {})
    return prepare(model, inplace=True)


def convert_int8(prepared: nn.Module, example: Tensor) -> nn.Module:
    """The INT8 model of a calibrated (or QAT) eager model, on CPU; `prepared` is left as it is.
    Every bias goes on its int32 accumulator grid: what integer hardware adds, and what makes
    torch's model compute exactly the shift-requantized integer model (stage=integer)."""
    int8 = convert(copy.deepcopy(prepared).cpu().eval(), inplace=False)
    snap_biases(int8, example)
    return int8


def quantize_ptq(model: nn.Module, qconfig, loader, *, batches: int, mean, std, example: Tensor,
                 float_layers: Sequence[str] = (),
                 op_qconfigs: Callable[[nn.Module], Mapping[str, object]] | None = None,
                 on_step: Callable[[str], None] | None = None) -> nn.Module:
    """The eager PTQ pipeline: fuse and prepare `model` in place (prepare_ptq), calibrate on
    `batches` batches of uint8 images from `loader` (calibrate), convert with biases snapped
    (convert_int8). on_step(name), if given, is called after "fuse+prepare", "calibrate" and
    "convert" (for timing)."""
    step = on_step or (lambda name: None)
    prepared = prepare_ptq(model, qconfig, float_layers, op_qconfigs)
    step("fuse+prepare")
    calibrate(prepared, loader, batches=batches, mean=mean, std=std)
    step("calibrate")
    int8 = convert_int8(prepared, example)
    step("convert")
    return int8


def int8_record(weight_max: int, cfg: DictConfig) -> dict:
    """What an INT8 model was quantized for: stored in metrics.json and in the exported file."""
    return {"target": cfg.quant.target, "weight_max": weight_max,
            "quantized_for": quantized_for(weight_max), "engine": cfg.quant.backend,
            "reduce_range": bool(cfg.quant.reduce_range), "kind": cfg.quant.kind,
            "flow": cfg.quant.get("flow", "eager"),
            "float_layers": list(cfg.quant.get("float_layers") or [])}


def weight_bits_record(int8: nn.Module, spec) -> dict:
    """The `weight_bits` block of metrics.json for quant.weight_bits=`spec`: which ops of the
    converted model hold 4-bit weights, how many weights that is, and the bytes that packing
    them two per byte saves (size_mb counts them so)."""
    gemms = {n: m for n, m in int8.named_modules() if isinstance(m, nnq.Conv2d | nnq.Linear)}
    four = [n for n, b in weight_bits_of(spec, list(gemms)).items() if b == 4]
    count = 0
    for name in four:
        w = gemms[name].weight().int_repr()
        if int(w.min()) < -8 or int(w.max()) > 7:
            raise QlabError(f"{name}: 4-bit weights outside -8..7 after conversion.")
        count += w.numel()
    return {"4": four, "8": [n for n in gemms if n not in four], "weights_4bit": count,
            "packed_saving_bytes": (count + 1) // 2 if count else 0}
