"""Plain evaluation loop for CPU models that Lightning does not drive (the INT8 ones)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from qlab.errors import QlabError
from qlab.models import Normalize

TTA_MODES = ("none", "flip", "flip_translate")


def check_tta(mode: str) -> str:
    if mode not in TTA_MODES:
        raise QlabError(f"module.tta={mode!r}: use none, flip (the image and its mirror) or "
                        f"flip_translate (also both shifted one pixel each way; airbench's level 2).")
    return mode


def tta_views(x: Tensor, mode: str) -> list[tuple[float, Tensor]]:
    """The (weight, batch) views whose logits test-time augmentation averages, for NCHW images
    in any space (pixels or normalized: flips and reflect-padded shifts commute with
    normalization). flip: the image and its mirror, 1/2 each. flip_translate (airbench's level
    2): those two at 1/4 each, and the pair shifted one pixel down-right and the pair shifted
    one pixel up-left (reflect padding) at 1/8 each."""
    if mode == "none":
        return [(1.0, x)]
    flipped = [x, x.flip(-1)]
    if mode == "flip":
        return [(0.5, v) for v in flipped]
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2]]
    return [(0.25, v) for v in flipped] + [
        (0.125, v) for s in shifted for v in (s, s.flip(-1))]


def tta_logits(model: Callable[[Tensor], Tensor], x: Tensor, mode: str = "none") -> Tensor:
    """float32 logits of `model` averaged over tta_views(x, mode); one forward when mode=none."""
    views = tta_views(x, mode)
    if len(views) == 1:
        return model(x).float()
    return sum(weight * model(v.contiguous()).float() for weight, v in views)


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
    tta: str = "none",
) -> dict:
    """Accuracy (%), mean loss (same criterion as test/loss) and confusion matrix over `loader`,
    with the logits averaged over test-time augmentation views (`tta`, see tta_views)."""
    check_tta(tta)
    normalize = Normalize(mean, std).to(device)
    confmat = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, n = 0.0, 0
    for x, y in loader:
        x = normalize(x.to(device).float().div_(255.0))
        logits = tta_logits(model, x, tta).cpu()
        loss_sum += F.cross_entropy(logits, y, label_smoothing=label_smoothing,
                                    reduction="sum").item()
        confmat += torch.bincount(y * num_classes + logits.argmax(1),
                                  minlength=num_classes**2).view(num_classes, num_classes)
        n += y.numel()
    correct = confmat.diag().sum().item()
    return {"accuracy": 100.0 * correct / max(n, 1), "loss": loss_sum / max(n, 1),
            "confmat": confmat, "num_images": n}
