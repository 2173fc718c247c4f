"""stage=integer: the integer-only model of an INT8 stage (model.json, weights.npz) and
verify.json, the reference executor against the stage's model_int8.pt on the whole test split."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.ao.quantization import convert

from qlab import artifacts
from qlab.errors import QlabError, first_line
from qlab.hardware import check_int8_exact, quantized_engine, resolve_config
from qlab.integer.export import to_integer, write_integer
from qlab.integer.reference import IntegerModel
from qlab.integer.verify import (
    layer_table,
    rerun_hint,
    stage_metrics,
    verify,
    zero_point_order,
)
from qlab.quant.mixed import float_regions
from qlab.quant.ptq import prepare_ptq, qconfig_from_cfg
from qlab.stages.common import build_datamodule, output_dir

log = logging.getLogger(__name__)


def rebuild_int8(stage_dir: Path, metrics: dict) -> nn.Module:
    """The converted eager INT8 model of a stage: its architecture, fused, prepared and converted
    on the current engine, then its saved state_dict (weights, biases, scales) loaded."""
    model = instantiate(OmegaConf.create(metrics["model"]), num_classes=len(metrics["classes"]))
    with warnings.catch_warnings():  # observers that never ran: their qparams are overwritten
        warnings.simplefilter("ignore")
        prepared = prepare_ptq(model, qconfig_from_cfg(OmegaConf.create(metrics["quant"]), qat=False),
                               metrics["quant"].get("float_layers") or ())
        int8 = convert(prepared, inplace=False)
    path = stage_dir / artifacts.STATE_DICT_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling a damaged file fails in many ways; all mean the same
        raise QlabError(f"{path} is not a readable PyTorch file ({first_line(exc)}): it is "
                        f"truncated or corrupt. {rerun_hint(stage_dir)}") from None
    if not isinstance(state, dict):
        raise QlabError(f"{path} holds a {type(state).__name__}, not a state_dict: the file is "
                        f"damaged. {rerun_hint(stage_dir)}")
    # the quantizes the stage dropped between float islands: those its state_dict has no scale for
    float_regions(int8, torch.zeros(1, len(metrics["mean"]), metrics["image_size"],
                                    metrics["image_size"]),
                  keep={k.rpartition(".")[0] for k in state if k.endswith(".scale")})
    try:
        int8.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise QlabError(f"{path} does not fit the INT8 model that metrics.json describes "
                        f"({first_line(exc)}): the two files are from different runs or "
                        f"damaged. {rerun_hint(stage_dir)}") from None
    return int8.eval()


def load_scripted(stage_dir: Path) -> torch.jit.ScriptModule:
    """The stage's exported model_int8.pt (TorchScript), or a clear error."""
    path = stage_dir / "model_int8.pt"
    if not path.is_file():
        raise QlabError(f"{path} does not exist: the stage did not finish its export. "
                        f"{rerun_hint(stage_dir)}")
    try:
        return artifacts.load_torchscript(path)[0]
    except (RuntimeError, ValueError, OSError) as exc:
        raise QlabError(f"{path} is not a readable TorchScript file ({first_line(exc)}): it is "
                        f"truncated or corrupt. {rerun_hint(stage_dir)}") from None


def run_integer(cfg: DictConfig) -> dict:
    """outputs/<name>/<from>/integer/: model.json, weights.npz, verify.json."""
    source = str(cfg["from"])
    stage_dir = Path(cfg.outputs_dir) / cfg.name / source
    metrics = stage_metrics(stage_dir)
    out = output_dir()
    cfg, hw = resolve_config(cfg, trains=False)
    with quantized_engine(cfg.quant.backend) as engine:
        record = metrics["int8"]
        if record.get("float_layers"):
            raise QlabError(f"The {source} model keeps {', '.join(record['float_layers'])} in float "
                            f"(quant.float_layers / quant.mixed): the integer model has integer ops "
                            f"only. Export a stage quantized without float islands.")
        check_int8_exact(record["weight_max"], engine, f"The {source} INT8 model")
        dm = build_datamodule(cfg)
        if list(dm.classes) != list(metrics["classes"]):
            raise QlabError(f"The data has classes {dm.classes}, the {source} model was trained on "
                            f"{metrics['classes']}: pass the same data= options as that run.")
        dm.setup()
        int8 = rebuild_int8(stage_dir, metrics)
        scripted = load_scripted(stage_dir)  # read before the long work: a damaged file stops here
        spec, arrays = to_integer(int8, mean=metrics["mean"], std=metrics["std"],
                                  image_size=dm.image_size, max_shift=metrics["quant"]["max_shift"],
                                  four_bit=record.get("weight_bits", {}).get("4", []))
        off_grid = [op["name"] for op in spec["ops"] if op.get("bias_on_grid") is False]
        if off_grid:
            log.warning("%d biases of %s are not on the accumulator grid (the model was exported "
                        "before biases were snapped): torch's model differs from the integer model "
                        "there. Re-run the %s stage to export a matching model_int8.pt.",
                        len(off_grid), source, source)
        write_integer(out, spec, arrays, extra={"source": {
            "run": cfg.name, "stage": source, "accuracy": metrics.get("accuracy"),
            "model": metrics["model"], "int8": record, "classes": metrics["classes"]}})
        order = cfg.integer.zero_point
        order = zero_point_order(engine) if order == "auto" else str(order)
        ref = IntegerModel.load(out, rounding=cfg.integer.rounding, gemm=cfg.integer.gemm,
                                zero_point=order)
        # ---- integer.emit=c: the model as portable C in out/c, built and checked against the
        # reference where a C compiler exists (qlab/integer/emit_c.py) ----
        c_block = None
        if cfg.integer.get("emit") is not None:
            from qlab.integer.emit_c import check_c
            c_block = check_c(out, ref, dm.test_dataloader(batch_size=cfg.integer.batch_size),
                              emit=cfg.integer.emit, limit=cfg.integer.limit_images or 200)
        # ---- end integer.emit ----
        loader = dm.test_dataloader(batch_size=cfg.integer.batch_size)
        result = verify(ref, scripted, int8, loader, mean=metrics["mean"], std=metrics["std"],
                        limit=cfg.integer.limit_images)
        layers = layer_table(ref)
        result |= {"rounding": ref.rounding, "gemm": ref.gemm, "engine": engine,
                   "zero_point": ref.zero_point,
                   "biases_off_grid": off_grid, "stage_accuracy": metrics.get("accuracy"),
                   "max_acc_bits": max((r["acc_bits"] for r in layers), default=0),
                   "layers": layers, "hardware": hw, "source": str(stage_dir)}
        if c_block is not None:  # integer.emit (above)
            result["c"] = c_block
        artifacts.write_json(out / "verify.json", result)
        log.info("integer %s: %d images, identical logits %.4f, top-1 agreement %.4f, accuracy "
                 "%.2f%% (torch %.2f%%), %.1f s", source, result["images"],
                 result["identical_logits_fraction"], result["top1_agreement"], result["accuracy"],
                 result["torch_accuracy"], result["seconds"])
        return result

