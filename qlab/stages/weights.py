"""The FP32 model a quantizing stage starts from: the weights of outputs/<name>/fp32 (or
fp32_ckpt=PATH) and the architecture that run was trained with."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qlab.checkpoint import load_fp32_weights
from qlab.errors import QlabError

log = logging.getLogger(__name__)


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


def fp32_model(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, Path, DictConfig]:
    """The FP32 run's architecture, freshly initialised, with the path of its weights."""
    path, metrics = fp32_weights_path(cfg)
    model_cfg = fp32_model_config(cfg, metrics)
    return instantiate(model_cfg, num_classes=num_classes), path, model_cfg


def load_fp32(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, Path, DictConfig]:
    """Build the FP32 model the run used and load its weights."""
    model, path, model_cfg = fp32_model(cfg, num_classes)
    return load_fp32_weights(model, path), path, model_cfg
