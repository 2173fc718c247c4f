"""Lightning plug-ins: lookahead weight averaging and freezing parameters (training callbacks for
short recipes), and a CSV logger that a resumed run appends to."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers.csv_logs import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from torch import nn

from qlab.errors import QlabError


def _averaged(model: nn.Module) -> dict[str, torch.Tensor]:
    """What lookahead averages: the float parameters and the BN running statistics (never the
    fake-quant scales or counters, which must stay powers of two / integers)."""
    state = dict(model.named_parameters())
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            prefix = f"{name}." if name else ""
            state[prefix + "running_mean"] = module.running_mean
            state[prefix + "running_var"] = module.running_var
    return {k: v for k, v in state.items() if v.is_floating_point()}


class Lookahead(L.Callback):
    """airbench's lookahead: every `every` optimizer steps the weights are pulled to a slow
    average, ema <- ema + (1 - d) (w - ema), w <- ema, with d = decay**every * (t / T)**3 (t the
    step, T the run's steps): no averaging early on, more and more towards the end; after the
    last step the weights become the average itself."""

    def __init__(self, *, every: int = 5, decay: float = 0.95) -> None:
        if every < 1:
            raise QlabError(f"callbacks.lookahead.every={every} must be >= 1 (optimizer steps).")
        if not 0.0 <= decay < 1.0:
            raise QlabError(f"callbacks.lookahead.decay={decay} must be in [0, 1).")
        self.every, self.decay = every, decay
        self.ema: dict[str, torch.Tensor] | None = None
        self._restored: dict[str, torch.Tensor] | None = None

    def _update(self, model: nn.Module, d: float) -> None:
        state = _averaged(model)
        if self.ema is None:
            source = self._restored or {}
            self.ema = {k: source.get(k, v).detach().clone().to(v.device) for k, v in state.items()}
            self._restored = None
        with torch.no_grad():
            for k, v in state.items():
                self.ema[k].lerp_(v.detach(), 1.0 - d)
                v.copy_(self.ema[k])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step, total = trainer.global_step, int(trainer.estimated_stepping_batches)
        if step >= total:
            self._update(pl_module.model, 1.0)  # the last step: the weights become the average
        elif step % self.every == 0:
            self._update(pl_module.model, self.decay ** self.every * (step / total) ** 3)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": {k: v.cpu() for k, v in (self.ema or {}).items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("ema") or None


class FreezeParameters(L.Callback):
    """Stop training the named parameters (of the LightningModule, e.g. model.whiten.bias) from
    epoch `epoch` on: airbench trains its whitening bias for the first 3 epochs only."""

    def __init__(self, *, names: Sequence[str], epoch: int) -> None:
        if epoch < 0:
            raise QlabError(f"callbacks.freeze.epoch={epoch} must be >= 0.")
        self.names, self.epoch = list(names), epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch < self.epoch:
            return
        params = dict(pl_module.named_parameters())
        unknown = [n for n in self.names if n not in params]
        if unknown:
            raise QlabError(f"callbacks.freeze.names: {unknown} are not parameters of this model "
                            f"(some are: {list(params)[:4]}).")
        for name in self.names:
            params[name].requires_grad_(False)


class _AppendingWriter(ExperimentWriter):
    """Lightning's metrics.csv writer, except that a file already in its folder is kept and
    appended to (Lightning's deletes it: a run continued with resume=true lost every epoch
    logged before the checkpoint, and its curves with them)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])  # new keys rewrite the header


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger (csv/metrics.csv, hparams.yaml) appending to the metrics.csv of the
    run it continues; the stage first drops the rows logged after the checkpoint
    (stages.common.resume_path)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
