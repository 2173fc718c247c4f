"""Post-training quantization math: qconfig from the config, calibration, fusion, and the eager
PTQ pipeline (fuse -> prepare -> calibrate -> convert -> snap biases)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.ao.quantization import convert, prepare
from torch.utils.data import DataLoader

from qlab.errors import QlabError
from qlab.integer.export import snap_biases
from qlab.models import Normalize
from qlab.quant.mixed import float_regions, make_float_islands, set_op_qconfigs
from qlab.quant.qconfig import build_qconfig


def qconfig_from_cfg(quant: DictConfig, *, qat: bool, weight_bits: int = 8):
    """build_qconfig(**cfg.quant) without the keys that are not qconfig options; weights of
    `weight_bits` (quant.weight_bits says which ops get which)."""
    keys = ("kind", "backend", "max_shift", "rounding", "per_channel", "activation_dtype",
            "activation_symmetric", "reduce_range", "averaging_constant",
            "weight_averaging_constant", "target", "even_zero_point")
    return build_qconfig(qat=qat, weight_bits=weight_bits,
                         **{k: quant[k] for k in keys if k in quant})


@torch.inference_mode()
def calibrate(model: nn.Module, loader: DataLoader, *, batches: int, mean, std) -> int:
    """Run `batches` un-augmented training batches through the observers; returns images seen."""
    if batches < 1:
        raise QlabError(f"quant.calib_batches={batches}: calibration needs at least one batch "
                        f"(the reference recipe used 32).")
    normalize, seen = Normalize(mean, std), 0
    for i, (x, _) in enumerate(loader):
        if i == batches:
            break
        model(normalize(x.float().div_(255.0)))
        seen += x.shape[0]
    if seen == 0:
        raise QlabError("Calibration saw no images: the training split is empty.")
    return seen


def prepare_ptq(model: nn.Module, qconfig, float_layers: Sequence[str] = (),
                op_qconfigs: Callable[[nn.Module], Mapping[str, object]] | None = None) -> nn.Module:
    """Fuse Conv-BN(-ReLU) in eval mode, keep `float_layers` in float (qlab.quant.mixed), give
    the ops `op_qconfigs(fused model)` names their own qconfig (4-bit weights), attach
    observers."""
    model.eval()
    model.fuse_model(is_qat=False)
    make_float_islands(model, float_layers)
    model.qconfig = qconfig
    set_op_qconfigs(model, op_qconfigs(model) if op_qconfigs else {})
    return prepare(model, inplace=True)


def convert_int8(prepared: nn.Module, example: Tensor) -> nn.Module:
    """The INT8 model of a calibrated (or QAT) eager model, on CPU; `prepared` is left as it is.
    Every bias goes on its int32 accumulator grid: what integer hardware adds, and what makes
    torch's model compute exactly the shift-requantized integer model (stage=integer). Float
    islands next to each other pass float (float_regions)."""
    int8 = convert(copy.deepcopy(prepared).cpu().eval(), inplace=False)
    float_regions(int8, example)
    snap_biases(int8, example)
    return int8


def quantize_ptq(model: nn.Module, qconfig, loader, *, batches: int, mean, std, example: Tensor,
                 float_layers: Sequence[str] = (),
                 op_qconfigs: Callable[[nn.Module], Mapping[str, object]] | None = None,
                 on_step: Callable[[str], None] | None = None) -> nn.Module:
    """The eager PTQ pipeline: fuse and prepare `model` in place (prepare_ptq), calibrate on
    `batches` batches of uint8 images from `loader` (calibrate), convert with biases snapped
    (convert_int8). on_step(name), if given, is called after "fuse+prepare", "calibrate" and
    "convert" (for timing)."""
    step = on_step or (lambda name: None)
    prepared = prepare_ptq(model, qconfig, float_layers, op_qconfigs)
    step("fuse+prepare")
    calibrate(prepared, loader, batches=batches, mean=mean, std=std)
    step("calibrate")
    int8 = convert_int8(prepared, example)
    step("convert")
    return int8
