"""The eager flow (torch.ao.quantization): fuse modules, observers or fake-quant from the qlab
qconfig, convert to quantized modules run by fbgemm/x86/onednn/qnnpack, TorchScript artifact."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch import Tensor, nn

from qlab import artifacts
from qlab.hardware import quantized_weight_max
from qlab.quant.flows.base import Exported, Flow
from qlab.quant.mixed import four_bit
from qlab.quant.ptq import convert_int8, prepare_ptq, qconfig_from_cfg
from qlab.quant.qat import QATCallback
from qlab.quant.scales import scale_table


def _four_bit_qconfigs(quant: DictConfig, *, qat: bool):
    """op name -> the 4-bit qconfig, for the ops quant.weight_bits makes 4-bit (a function of
    the fused model, whose op names it checks)."""
    spec = quant.get("weight_bits", 8)

    def qconfigs(fused: nn.Module) -> dict:
        names = four_bit(spec, fused)
        if not names:
            return {}
        qconfig = qconfig_from_cfg(quant, qat=qat, weight_bits=4)
        return dict.fromkeys(names, qconfig)
    return qconfigs


class EagerFlow(Flow):
    name = "eager"
    float_islands = True
    mixed_bits = True

    def prepare_ptq(self, model: nn.Module, quant: DictConfig, example: Tensor) -> nn.Module:
        return prepare_ptq(model, qconfig_from_cfg(quant, qat=False),
                           float_layers=quant.get("float_layers") or (),
                           op_qconfigs=_four_bit_qconfigs(quant, qat=False))

    def qat_callback(self, quant: DictConfig, fp32_weights: Path | None,
                     example: Tensor) -> L.Callback:
        return QATCallback(qconfig=qconfig_from_cfg(quant, qat=True), fp32_weights=fp32_weights,
                           freeze_observer_epoch=quant.qat.freeze_observer_epoch,
                           freeze_bn_epoch=quant.qat.freeze_bn_epoch,
                           float_layers=quant.get("float_layers") or (),
                           op_qconfigs=_four_bit_qconfigs(quant, qat=True))

    def scale_table(self, prepared: nn.Module) -> list[dict]:
        return scale_table(prepared)

    def convert(self, prepared: nn.Module, example: Tensor) -> nn.Module:
        return convert_int8(prepared, example)

    def weight_max(self, int8: nn.Module) -> int:
        return quantized_weight_max(int8)

    def export(self, int8: nn.Module, mean: Sequence[float], std: Sequence[float], out: Path,
               meta: dict, example: Tensor) -> Exported:
        scripted = artifacts.torchscript_of(int8, mean, std)
        artifacts.save_torchscript(out / "model_int8.pt", scripted, meta=meta)
        return Exported(scripted)
