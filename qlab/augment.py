"""Training augmentation applied per sample to whole batches on the device, and mixup."""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import Tensor, nn


class TrainAugment(nn.Module):
    """The reference recipe's train transforms as one batched module; None/0 switches one off.

    Input: float images in [0, 1]; output: normalized images (erasing runs after Normalize,
    as in the reference's torchvision pipeline, so erased pixels are 0 in normalized space).
    """

    def __init__(
        self,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int | None = 4,
        crop_padding_mode: str = "constant",
        hflip: bool = True,
        color_jitter: Sequence[float] | None = (0.3, 0.3, 0.3, 0.1),
        rotation: float | None = 20.0,
        translate: float | None = 0.1,
        scale: Sequence[float] | None = (0.9, 1.1),
        erasing_p: float = 0.6,
        erasing_scale: Sequence[float] = (0.02, 0.4),
        erasing_ratio: Sequence[float] = (0.3, 3.3),
        image_size: int = 32,
    ) -> None:
        super().__init__()
        steps: list[nn.Module] = []
        if crop_padding_mode not in ("constant", "reflect", "replicate"):
            raise ValueError(f"augment.crop_padding_mode={crop_padding_mode!r}: use constant "
                             f"(zeros), reflect or replicate.")
        if crop_padding:
            steps.append(K.RandomCrop((image_size, image_size), padding=int(crop_padding),
                                      padding_mode=crop_padding_mode))
        if hflip:
            steps.append(K.RandomHorizontalFlip(p=0.5))
        if color_jitter:
            b, c, s, h = color_jitter
            steps.append(K.ColorJitter(b, c, s, h, p=1.0))
        if rotation:
            steps.append(K.RandomRotation(float(rotation), p=1.0))
        if translate or scale:
            t = (translate, translate) if translate else None
            steps.append(K.RandomAffine(degrees=0.0, translate=t,
                                        scale=tuple(scale) if scale else None, p=1.0))
        steps.append(K.Normalize(torch.tensor(list(mean)), torch.tensor(list(std))))
        if erasing_p > 0:
            steps.append(K.RandomErasing(scale=tuple(erasing_scale), ratio=tuple(erasing_ratio),
                                         p=erasing_p))
        self.steps = nn.Sequential(*steps)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.steps(x)


def mixup(
    x: Tensor, y: Tensor, *, alpha: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Mix each image with a shuffled partner: returns (mixed x, y_a, y_b, lam) for a soft-target loss."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 1.0
    perm = torch.randperm(x.size(0), device=x.device, generator=generator)
    return lam * x + (1.0 - lam) * x[perm], y, y[perm], lam
