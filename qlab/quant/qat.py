"""QATCallback: turns the FP32 LightningModule's network into a fake-quant one before training."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization import QConfig, disable_observer, prepare_qat

from qlab.checkpoint import load_fp32_weights
from qlab.quant.mixed import make_float_islands, set_op_qconfigs


class QATCallback(L.Callback):
    """Fuse (is_qat=True), set the po2 fake-quant qconfig, prepare_qat; freeze on schedule.

    Preparing in setup() means it happens before DDP wraps the model and before Lightning
    restores a checkpoint, so a resumed QAT run loads fake-quant state into a fake-quant model.
    A flow with another graph form (PT2E) overrides prepare, freeze_observers and freeze_bn.
    """

    def __init__(self, *, qconfig: QConfig | None, fp32_weights: Path | None,
                 freeze_observer_epoch: int, freeze_bn_epoch: int,
                 float_layers: Sequence[str] = (),
                 op_qconfigs: Callable[[nn.Module], Mapping[str, QConfig]] | None = None) -> None:
        self.qconfig, self.fp32_weights = qconfig, fp32_weights
        self.op_qconfigs = op_qconfigs
        self.float_layers = list(float_layers)
        self.freeze_observer_epoch, self.freeze_bn_epoch = freeze_observer_epoch, freeze_bn_epoch
        self.prepared = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.prepared:
            return
        model = pl_module.model
        if self.fp32_weights is not None:
            load_fp32_weights(model, self.fp32_weights)
        model.train()
        pl_module.model = self.prepare(model)
        self.prepared = True

    def prepare(self, model: nn.Module) -> nn.Module:
        """The FP32 network (train mode) made fake-quantized, in place or as a new module."""
        model.fuse_model(is_qat=True)
        make_float_islands(model, self.float_layers)
        model.qconfig = self.qconfig
        set_op_qconfigs(model, self.op_qconfigs(model) if self.op_qconfigs else {})
        prepare_qat(model, inplace=True)
        return model

    def freeze_observers(self, model: nn.Module) -> None:
        model.apply(disable_observer)

    def freeze_bn(self, model: nn.Module) -> None:
        model.apply(nniqat.freeze_bn_stats)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch >= self.freeze_observer_epoch:
            self.freeze_observers(pl_module.model)
        if epoch >= self.freeze_bn_epoch:
            self.freeze_bn(pl_module.model)


def fake_quant_scales(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The scale each FakeQuantize module used in its last forward, by module name."""
    from torch.ao.quantization import FakeQuantize

    return {name: m.scale.detach().clone() for name, m in model.named_modules()
            if isinstance(m, FakeQuantize)}
