"""QATCallback: turns the FP32 LightningModule's network into a fake-quant one before training."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.quantization import (
    FakeQuantizeBase,
    QConfig,
    disable_observer,
    enable_observer,
    prepare_qat,
)

from qlab.checkpoint import load_fp32_weights
from qlab.quant.mixed import make_float_islands, set_op_qconfigs


class QATCallback(L.Callback):
    """Fuse (is_qat=True), set the po2 fake-quant qconfig, prepare_qat; freeze on schedule.

    Activation observers watch training images only: a FakeQuantize observes whenever its
    observer is on, in eval mode too, so they are switched off for every validation and test
    pass and back on for training while the epoch is before freeze_observer_epoch.
    Without that, a run that ends before freeze_observer_epoch would take its INT8 ranges partly
    from validation and test images. Weight observers see only the weights, and stay on.

    Preparing in setup() means it happens before DDP wraps the model and before Lightning
    restores a checkpoint, so a resumed QAT run loads fake-quant state into a fake-quant model.
    A flow with another graph form (PT2E) overrides prepare, activation_fake_quants and
    freeze_bn.
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
        self.bn_fixed = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.prepared:
            return
        model = pl_module.model
        if self.fp32_weights is not None:
            load_fp32_weights(model, self.fp32_weights)  # prepare_quantization included
        elif hasattr(model, "prepare_quantization"):  # as load_fp32_weights, without weights
            model.prepare_quantization()
        # BN statistics of another layer order (AirNet's pool_first): frozen from the first step
        self.bn_fixed = bool(getattr(model, "bn_statistics_fixed", False))
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

    def activation_fake_quants(self, model: nn.Module) -> list[nn.Module]:
        """The fake-quants of the model's activations (its input included), not its weights'."""
        return [m for name, m in model.named_modules()
                if isinstance(m, FakeQuantizeBase) and not name.endswith("weight_fake_quant")]

    enable_observer = staticmethod(enable_observer)
    disable_observer = staticmethod(disable_observer)

    def set_observers(self, model: nn.Module, on: bool, activations_only: bool = False) -> None:
        switch = self.enable_observer if on else self.disable_observer
        for m in self.activation_fake_quants(model) if activations_only else [model]:
            m.apply(switch)

    def freeze_bn(self, model: nn.Module) -> None:
        model.apply(nniqat.freeze_bn_stats)

    def observing(self, epoch: int) -> bool:
        """Whether the observers watch the training images of this epoch."""
        return epoch < self.freeze_observer_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        self.set_observers(pl_module.model, self.observing(epoch))
        if epoch >= self.freeze_bn_epoch or self.bn_fixed:
            self.freeze_bn(pl_module.model)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.set_observers(pl_module.model, False, activations_only=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # inside fit: training (maybe mid-epoch) goes on
            self.set_observers(pl_module.model, self.observing(trainer.current_epoch),
                               activations_only=True)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.set_observers(pl_module.model, False, activations_only=True)


def fake_quant_scales(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The scale each FakeQuantize module used in its last forward, by module name."""
    from torch.ao.quantization import FakeQuantize

    return {name: m.scale.detach().clone() for name, m in model.named_modules()
            if isinstance(m, FakeQuantize)}
