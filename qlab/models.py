"""The quantizable ResNet-50: torchvision's QuantizableResNet with a CIFAR-sized stem."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.quantization.resnet import QuantizableBottleneck, QuantizableResNet

STEMS = ("cifar", "imagenet")


def build_resnet50(
    *, num_classes: int = 10, stem: str = "cifar", maxpool: bool = True,
    zero_init_residual: bool = False,
) -> QuantizableResNet:
    """ResNet-50 with QuantStub/DeQuantStub, FloatFunctional add_relu and `fuse_model(is_qat)`."""
    if stem not in STEMS:
        raise ValueError(f"model.stem={stem!r} is not known; use one of {', '.join(STEMS)}.")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2.")
    model = QuantizableResNet(QuantizableBottleneck, [3, 4, 6, 3], num_classes=num_classes,
                              zero_init_residual=zero_init_residual)
    if stem == "cifar":
        # 32x32 inputs: a 7x7 stride-2 stem would throw away 3/4 of the pixels before layer1,
        # so CIFAR models use a 3x3 stride-1 conv. It keeps the name conv1, so fuse_model's
        # ["conv1", "bn1", "relu"] triple still applies.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if not maxpool:
        model.maxpool = nn.Identity()
    return model


class Normalize(nn.Module):
    """Per-channel (x - mean) / std on float NCHW input, as a scriptable module."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Deployable(nn.Module):
    """What gets exported: float [0, 1] NCHW images in, logits out (normalization inside)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))
