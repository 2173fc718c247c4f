"""The LightningModule: one shared step for train/val/test, mixup and label smoothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from qlab.augment import mixup
from qlab.errors import QlabError
from qlab.evaluate import check_tta, tta_logits
from qlab.models import Normalize


class LitClassifier(L.LightningModule):
    """Cross-entropy classifier over uint8 batches that it augments on its own device."""

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: nn.Module | None = None,
        label_smoothing: float = 0.05,
        mixup_alpha: float = 0.2,
        mixup_prob: float = 0.5,
        scheduler_interval: str = "epoch",
        channels_last: bool = False,
        norm_bias_lr_scale: float = 1.0,
        tta: str = "none",
    ) -> None:
        super().__init__()
        lr = getattr(optimizer, "keywords", {}).get("lr")
        if lr is not None and not lr > 0:
            raise QlabError(f"optimizer.lr={lr} must be positive (the reference used 0.3 at batch 256).")
        if not 0.0 <= mixup_prob <= 1.0:
            raise QlabError(f"module.mixup_prob={mixup_prob} must be a probability in [0, 1].")
        if mixup_alpha < 0:
            raise QlabError(f"module.mixup_alpha={mixup_alpha} must be >= 0 (0 turns mixup off).")
        if not 0.0 <= label_smoothing < 1.0:
            raise QlabError(f"module.label_smoothing={label_smoothing} must be in [0, 1).")
        if not norm_bias_lr_scale > 0:
            raise QlabError(f"module.norm_bias_lr_scale={norm_bias_lr_scale} must be positive "
                            f"(1 trains BN biases like every other parameter).")
        if scheduler_interval not in ("epoch", "step"):
            raise QlabError(f"module.scheduler_interval={scheduler_interval!r}: use epoch or step.")
        self.model, self.augment = model, augment
        self.normalize = Normalize(mean, std)
        self.mean, self.std = tuple(mean), tuple(std)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        self.label_smoothing, self.mixup_alpha, self.mixup_prob = label_smoothing, mixup_alpha, mixup_prob
        self.channels_last, self.norm_bias_lr_scale = channels_last, norm_bias_lr_scale
        self.tta = check_tta(tta)  # test only: validation (checkpoint selection) sees one view
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_confmat = MulticlassConfusionMatrix(num_classes)
        self.train_samples = 0  # images this process trained on, for the DDP check
        self.train_seconds = 0.0  # time in training batches (augmentation included), not eval
        self._t0: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def on_after_batch_transfer(self, batch: list[Tensor], dataloader_idx: int) -> list[Tensor]:
        x, y = batch
        x = x.float().div_(255.0)  # uint8 -> [0, 1] on the device, not in a worker
        training = self._trainer is not None and self.trainer.training
        x = self.augment(x) if training and self.augment is not None else self.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return [x, y]

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    def _step(self, batch: list[Tensor], split: str) -> Tensor:
        x, y = batch
        if split == "train" and self.mixup_alpha > 0 and float(torch.rand(())) < self.mixup_prob:
            x, y_a, y_b, lam = mixup(x, y, alpha=self.mixup_alpha)
            logits = self(x)
            loss = lam * self._loss(logits, y_a) + (1.0 - lam) * self._loss(logits, y_b)
            y = y_a if lam >= 0.5 else y_b  # accuracy against the dominant label
        else:
            logits = tta_logits(self, x, self.tta) if split == "test" else self(x)
            loss = self._loss(logits, y)
        acc = getattr(self, f"{split}_acc")
        acc(logits, y)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 sync_dist=True, batch_size=y.numel())
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        if split == "test":
            self.test_confmat.update(logits, y)
        return loss

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        self.train_samples += batch[1].numel()
        return self._step(batch, "train")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient's global 2-norm before clipping (train/grad_norm) and, with
        trainer.gradient_clip_val set, the fraction of steps the clip shrank (train/clipped)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self.log("train/grad_norm", norm, on_step=True, on_epoch=True, sync_dist=True)
        clip = getattr(self.trainer, "gradient_clip_val", None)
        algorithm = getattr(self.trainer, "gradient_clip_algorithm", None) or "norm"  # None: norm
        if clip and algorithm == "norm":
            self.log("train/clipped", (norm > clip).float(), on_step=False, on_epoch=True,
                     sync_dist=True)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_test_epoch_start(self) -> None:
        self.test_confmat.reset()

    def on_train_epoch_start(self) -> None:
        self._t0 = time.perf_counter()

    def on_validation_start(self) -> None:
        self._stop_clock()

    def on_train_epoch_end(self) -> None:
        self._stop_clock()

    def _stop_clock(self) -> None:
        if self._t0 is not None:
            self.train_seconds += time.perf_counter() - self._t0
            self._t0 = None

    def param_groups(self) -> list[dict]:
        """One group, or two when module.norm_bias_lr_scale != 1: BatchNorm biases at lr x scale
        and weight_decay / scale (the same decay per step), as airbench's bias_scaler."""
        k = self.norm_bias_lr_scale
        if k == 1.0:
            return [{"params": list(self.parameters())}]
        norm_biases = {id(m.bias) for m in self.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None}
        keywords = getattr(self.optimizer_factory, "keywords", {})
        lr, wd = keywords.get("lr"), keywords.get("weight_decay", 0.0)
        if lr is None:
            raise QlabError("module.norm_bias_lr_scale needs optimizer.lr in the config.")
        return [{"params": [p for p in self.parameters() if id(p) not in norm_biases]},
                {"params": [p for p in self.parameters() if id(p) in norm_biases],
                 "lr": lr * k, "weight_decay": wd / k}]

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(params=self.param_groups())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        extra = {}
        keywords = getattr(self.scheduler_factory, "keywords", {})
        if keywords.get("total_steps", 0) is None:
            # total_steps: null in the config (one-cycle): every optimizer step of this fit
            extra["total_steps"] = int(self.trainer.estimated_stepping_batches)
        if "max_lr" in keywords and len(optimizer.param_groups) > 1:
            extra["max_lr"] = [g["lr"] for g in optimizer.param_groups]  # each group its own peak
        scheduler = self.scheduler_factory(optimizer=optimizer, **extra)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
