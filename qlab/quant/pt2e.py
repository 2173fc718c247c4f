"""The po2 qconfig for torchao's PT2E flow: the same observers on torchao's classes (its
prepare_pt2e / convert_pt2e refuse torch.ao ones) and a QuantizationConfig for
X86InductorQuantizer."""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torchao.quantization.pt2e import FakeQuantize
from torchao.quantization.pt2e import observer as ao_observer
from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

from qlab.errors import QlabError
from qlab.quant.observer import _Po2Mixin
from qlab.quant.qconfig import weight_range


class Po2AoMinMaxObserver(_Po2Mixin, ao_observer.MinMaxObserver):
    """Per-tensor po2 observer (PT2E PTQ)."""


class Po2AoMovingAverageMinMaxObserver(_Po2Mixin, ao_observer.MovingAverageMinMaxObserver):
    """Per-tensor po2 observer over a moving-average min/max (PT2E QAT)."""


class Po2AoPerChannelMinMaxObserver(_Po2Mixin, ao_observer.PerChannelMinMaxObserver):
    """Per-channel po2 observer (PT2E weights)."""


class Po2AoMovingAveragePerChannelMinMaxObserver(
        _Po2Mixin, ao_observer.MovingAveragePerChannelMinMaxObserver):
    """Per-channel po2 observer over a moving-average min/max (PT2E QAT weights)."""


def po2_quantization_config(quant: DictConfig, *, qat: bool) -> QuantizationConfig:
    """quant=po2 as a PT2E QuantizationConfig: uint8 affine activations, int8 symmetric weights
    bounded by quant.target, every scale 2^n within +-quant.max_shift."""
    if quant.kind != "po2":
        raise QlabError(f"quant.flow=pt2e takes quant=po2 (got quant.kind={quant.kind!r}); for "
                        f"torch's own x86 config use the eager flow with quant=torch.")
    if quant.activation_dtype != "quint8" or quant.activation_symmetric or quant.reduce_range:
        raise QlabError("quant.flow=pt2e quantizes activations as uint8 affine 0..255 (the x86 "
                        "inductor kernels' format): drop quant.activation_dtype, "
                        "activation_symmetric and reduce_range.")
    wmin, wmax = weight_range(quant.target)
    po2 = {"max_shift": quant.max_shift, "rounding": quant.rounding}
    if qat:
        avg = {"averaging_constant": quant.averaging_constant}
        w_obs = (Po2AoMovingAveragePerChannelMinMaxObserver if quant.per_channel
                 else Po2AoMovingAverageMinMaxObserver)
        act_ctr = FakeQuantize.with_args(observer=Po2AoMovingAverageMinMaxObserver, **po2, **avg)
        w_ctr = FakeQuantize.with_args(observer=w_obs, **po2, **avg)
    else:
        act_ctr = Po2AoMinMaxObserver.with_args(**po2)
        w_ctr = (Po2AoPerChannelMinMaxObserver if quant.per_channel else Po2AoMinMaxObserver
                 ).with_args(**po2)
    act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255,
                           qscheme=torch.per_tensor_affine, is_dynamic=False,
                           observer_or_fake_quant_ctr=act_ctr)
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=wmin, quant_max=wmax,
        qscheme=torch.per_channel_symmetric if quant.per_channel else torch.per_tensor_symmetric,
        ch_axis=0, is_dynamic=False, observer_or_fake_quant_ctr=w_ctr)
    return QuantizationConfig(act, None, weight, None, is_qat=qat)
