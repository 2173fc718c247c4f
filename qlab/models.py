"""The quantizable networks: torchvision's quantizable blocks with CIFAR-sized (32x32) stems.

Each model has QuantStub/DeQuantStub, FloatFunctional skip adds and `fuse_model(is_qat)`, so the
eager PTQ/QAT flow and the po2 qconfig apply to all of them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.ao.quantization import DeQuantStub, QuantStub
from torchvision.models.quantization.mobilenetv2 import (
    QuantizableInvertedResidual,
    QuantizableMobileNetV2,
)
from torchvision.models.quantization.resnet import (
    QuantizableBasicBlock,
    QuantizableBottleneck,
    QuantizableResNet,
)
from torchvision.models.quantization.utils import _fuse_modules, _replace_relu

from qlab.errors import QlabError

STEMS = ("cifar", "imagenet")


def _check_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2.")


def _torchvision_resnet(block, layers: list[int], *, num_classes: int, stem: str, maxpool: bool,
                        zero_init_residual: bool) -> QuantizableResNet:
    if stem not in STEMS:
        raise ValueError(f"model.stem={stem!r} is not known; use one of {', '.join(STEMS)}.")
    _check_classes(num_classes)
    model = QuantizableResNet(block, layers, num_classes=num_classes,
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


def build_resnet50(
    *, num_classes: int = 10, stem: str = "cifar", maxpool: bool = True,
    zero_init_residual: bool = False,
) -> QuantizableResNet:
    """ResNet-50 with QuantStub/DeQuantStub, FloatFunctional add_relu and `fuse_model(is_qat)`."""
    return _torchvision_resnet(QuantizableBottleneck, [3, 4, 6, 3], num_classes=num_classes,
                               stem=stem, maxpool=maxpool, zero_init_residual=zero_init_residual)


def build_resnet18(
    *, num_classes: int = 10, stem: str = "cifar", maxpool: bool = False,
    zero_init_residual: bool = False,
) -> QuantizableResNet:
    """torchvision's quantizable ResNet-18 (basic blocks); CIFAR stem, no maxpool by default."""
    return _torchvision_resnet(QuantizableBasicBlock, [2, 2, 2, 2], num_classes=num_classes,
                               stem=stem, maxpool=maxpool, zero_init_residual=zero_init_residual)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers: three stages of n basic blocks, 16/32/64 channels),
    built from torchvision's QuantizableBasicBlock with 1x1 projection shortcuts."""

    def __init__(self, *, depth: int = 20, num_classes: int = 10,
                 widths: Sequence[int] = (16, 32, 64), zero_init_residual: bool = False) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"model.depth={depth}: a CIFAR ResNet has 6n+2 layers (20, 32, 44, 56).")
        _check_classes(num_classes)
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, inplanes = [], widths[0]
        for i, width in enumerate(widths):
            for j in range((depth - 2) // 6):
                stride = 2 if i > 0 and j == 0 else 1
                down = None
                if stride != 1 or inplanes != width:
                    down = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(width))
                blocks.append(QuantizableBasicBlock(inplanes, width, stride, down))
                inplanes = width
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, QuantizableBasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(self.quant(x))))
        x = self.avgpool(self.layers(x)).flatten(1)
        return self.dequant(self.fc(x))

    def fuse_model(self, is_qat: bool | None = None) -> None:
        """Conv-BN-ReLU of the stem, then each block's own triples (as torchvision's ResNet)."""
        _fuse_modules(self, ["conv1", "bn1", "relu"], is_qat, inplace=True)
        for m in self.modules():
            if type(m) is QuantizableBasicBlock:
                m.fuse_model(is_qat)


def build_resnet20(
    *, num_classes: int = 10, depth: int = 20, zero_init_residual: bool = False,
) -> CifarResNet:
    """ResNet-20 for 32x32 images (0.27 M parameters, 41 M multiply-accumulates per image)."""
    return CifarResNet(depth=depth, num_classes=num_classes, zero_init_residual=zero_init_residual)


class ConvGroup(nn.Module):
    """conv3x3-BN-ReLU, 2x2 max-pool, conv3x3-BN-ReLU: one of AirNet's three stages. BN and ReLU
    come before the pool so each conv fuses with its BN and ReLU; `pool_first` trains as airbench
    does, conv-pool-BN-ReLU (BN statistics of the pooled map), and `pool_last` turns that into the
    same function in the fusable order."""

    def __init__(self, cin: int, cout: int, *, bn_momentum: float = 0.1,
                 bn_weight: bool = True, pool_first: bool = False) -> None:
        super().__init__()
        self.pool_first = bool(pool_first)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.relu2 = nn.ReLU(inplace=True)
        for bn in (self.bn1, self.bn2):
            bn.weight.requires_grad_(bn_weight)  # airbench trains only the BN biases

    def forward(self, x: Tensor) -> Tensor:
        if self.pool_first:
            x = self.relu1(self.bn1(self.pool(self.conv1(x))))
        else:
            x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        return self.relu2(self.bn2(self.conv2(x)))

    @torch.no_grad()
    def pool_last(self) -> None:
        """conv-pool-BN-ReLU -> conv-BN-ReLU-pool, the same function in eval: BN with a positive
        scale and ReLU are nondecreasing per channel, so they commute with the max. Idempotent."""
        if not self.pool_first:
            return
        scale = self.bn1.weight / (self.bn1.running_var + self.bn1.eps).sqrt()
        if not bool((scale > 0).all()):
            raise QlabError(
                f"model.pool_first: {int((scale <= 0).sum())} of {scale.numel()} BN channels have "
                f"a scale <= 0, so the pool cannot move behind BN and ReLU (fusion needs it there); "
                f"train pool_first models with model.bn_weight=false (BN weights fixed at 1).")
        self.pool_first = False


class AirNet(nn.Module):
    """The airbench family's CIFAR-10 speed-run network, made quantizable: a 2x2 patch-whitening
    conv (24 channels: 12 whitening filters and their negatives, so ReLU keeps both signs), three
    ConvGroups of widths 64/256/256 that each halve the image, a 3x3 max-pool and a linear head.
    ReLU replaces airbench's GELU (the integer model has no GELU); 118 M multiply-accumulates
    per 32x32 image, 1.97 M parameters."""

    def __init__(self, *, num_classes: int = 10, widths: Sequence[int] = (64, 256, 256),
                 whiten_width: int = 24, train_whitening: bool = False, init: str = "kaiming",
                 bn_momentum: float = 0.1, bn_weight: bool = True,
                 logit_scale: float = 1.0, whiten_float32: bool = False,
                 pool_first: bool = False) -> None:
        super().__init__()
        _check_classes(num_classes)
        if whiten_width % 2 or not 2 <= whiten_width <= 24:
            raise ValueError(f"model.whiten_width={whiten_width}: an even number from 2 to 24 "
                             f"(twice the number of 2x2x3 whitening filters kept, at most 12).")
        if init not in ("kaiming", "dirac"):
            raise ValueError(f"model.init={init!r}: use kaiming (He normal, fan-out) or dirac "
                             f"(torch's default init with an identity kernel on the first "
                             f"in_channels filters, as airbench).")
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"model.bn_momentum={bn_momentum}: torch's convention, in (0, 1] "
                             f"(the running statistics' update weight; airbench's 0.6 is 0.4 here).")
        if not logit_scale > 0:
            raise ValueError(f"model.logit_scale={logit_scale} must be positive.")
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.whiten = nn.Conv2d(3, whiten_width, 2, bias=True)
        self.whiten.weight.requires_grad_(train_whitening)  # airbench keeps the filters fixed
        self.whiten_relu = nn.ReLU(inplace=True)
        self.whiten_float32 = bool(whiten_float32)
        groups, cin = [], whiten_width
        for width in widths:
            groups.append(ConvGroup(cin, width, bn_momentum=bn_momentum, bn_weight=bn_weight,
                                    pool_first=pool_first))
            cin = width
        self.layers = nn.Sequential(*groups)
        self.pool = nn.MaxPool2d(3)
        self.fc = nn.Linear(cin, num_classes)
        self.logit_scale = float(logit_scale)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.whiten:
                if init == "kaiming":
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:  # the conv keeps torch's default init; its first filters pass inputs on
                    nn.init.dirac_(m.weight.data[:min(m.in_channels, m.out_channels)])

    @torch.no_grad()
    def init_whitening(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the whitening conv from the 2x2 patches of normalized training images [N, 3, H, W]:
        its filters are the patch covariance's eigenvectors scaled by 1/sqrt(eigenvalue + eps),
        the strongest ones first, each followed by its negative."""
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # N, C, H', W', 2, 2
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * 4)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigvals, eigvecs = torch.linalg.eigh(cov.double())  # ascending
        k = self.whiten.out_channels // 2
        vals, vecs = eigvals.flip(0)[:k].float(), eigvecs.flip(1)[:, :k].float()
        filters = (vecs / (vals + eps).sqrt()).T.reshape(k, images.shape[1], 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def _whiten(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102 (TorchScript has no autocast; kept apart)
            if self.whiten_float32 and torch.is_autocast_enabled(x.device.type):
                # the weak whitening directions are large filters whose taps nearly cancel: in
                # bf16 they come out with 5-30 % relative error, in float32 exact to ~1e-6
                with torch.autocast(x.device.type, enabled=False):
                    return self.whiten(x.float())
        return self.whiten(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.whiten_relu(self._whiten(self.quant(x)))
        x = self.pool(self.layers(x)).flatten(1)
        x = self.dequant(self.fc(x))
        if self.logit_scale != 1.0:
            x = x * self.logit_scale
        return x

    @torch.no_grad()
    def fold_logit_scale(self) -> None:
        """Fold the logit scale into the linear head (same logits, one op fewer): every quantized
        form starts from here, so the INT8 head carries the scale in its weights. Idempotent."""
        if self.logit_scale != 1.0:
            self.fc.weight.mul_(self.logit_scale)
            self.fc.bias.mul_(self.logit_scale)
            self.logit_scale = 1.0

    @torch.no_grad()
    def prepare_quantization(self) -> None:
        """The float model every quantization flow starts from, with the same logits: the logit
        scale folded into the head and each group's pool behind its BN and ReLU. Idempotent.
        A model whose pools moved sets `bn_statistics_fixed`: its BN statistics are those of the
        pooled maps, so QAT normalizes with them (frozen) from its first step."""
        self.fold_logit_scale()
        for group in self.layers:
            if group.pool_first:
                group.pool_last()
                self.bn_statistics_fixed = True

    def fuse_model(self, is_qat: bool | None = None) -> None:
        """The quantizable form (`prepare_quantization`), whitening conv + ReLU, then conv-BN-ReLU
        twice per group."""
        self.prepare_quantization()
        _fuse_modules(self, ["whiten", "whiten_relu"], is_qat, inplace=True)
        for group in self.layers:
            _fuse_modules(group, [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"]], is_qat,
                          inplace=True)


def build_airnet(*, widths: Sequence[int] = (64, 256, 256), **options) -> AirNet:
    """AirNet (see the class for its options): the testbed network, widths from a config list."""
    return AirNet(widths=tuple(widths), **options)


# torchvision's MobileNetV2 setting (expansion t, channels c, blocks n, stride s) with the
# 24-channel stage at stride 1 instead of 2; with the stem also at stride 1 (below) a 32x32
# image is downsampled 8x in all (4x4 before pooling), instead of 32x (1x1).
CIFAR_MOBILENET_V2 = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2],
                      [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def build_mobilenet_v2(*, num_classes: int = 10, width_mult: float = 1.0,
                       dropout: float = 0.2) -> QuantizableMobileNetV2:
    """torchvision's quantizable MobileNetV2 for 32x32 inputs: stem and 24-channel stage at
    stride 1 (see CIFAR_MOBILENET_V2); ReLU6 becomes ReLU, as in torchvision's quantized model."""
    _check_classes(num_classes)
    model = QuantizableMobileNetV2(num_classes=num_classes, width_mult=width_mult, dropout=dropout,
                                   inverted_residual_setting=CIFAR_MOBILENET_V2,
                                   block=QuantizableInvertedResidual)
    model.features[0][0].stride = (1, 1)
    _replace_relu(model)
    return model


@torch.no_grad()
def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """BN statistics and affine terms of a trained-looking network (from torch's RNG): an
    untrained model then spreads its activations over many quantization codes, which speed and
    bit-exactness checks need; the default (mean 0, var 1, weight 1, bias 0) barely does."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
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
