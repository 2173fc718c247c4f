"""Plain evaluation loop for CPU models that Lightning does not drive (the INT8 ones)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from qlab.models import Normalize


@torch.inference_mode()
def evaluate(
    model: Callable[[Tensor], Tensor],
    loader: DataLoader,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    label_smoothing: float = 0.0,
    device: str = "cpu",
) -> dict:
    """Accuracy (%), mean loss (same criterion as test/loss) and confusion matrix over `loader`."""
    normalize = Normalize(mean, std).to(device)
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, n = 0.0, 0
    for x, y in loader:
        x = normalize(x.to(device).float().div_(255.0))
        logits = model(x).float().cpu()
        loss_sum += F.cross_entropy(logits, y, label_smoothing=label_smoothing,
                                    reduction="sum").item()
        confmat += torch.bincount(y * num_classes + logits.argmax(1),
                                  minlength=num_classes**2).view(num_classes, num_classes)
        n += y.numel()
    correct = confmat.diag().sum().item()
    return {"accuracy": 100.0 * correct / max(n, 1), "loss": loss_sum / max(n, 1),
            "confmat": confmat, "num_images": n}
