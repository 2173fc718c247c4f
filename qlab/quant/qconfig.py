"""qconfigs from the `quant` config group: po2 (the custom one) or torch's default for the backend."""

from __future__ import annotations

import torch
from torch.ao.quantization import (
    FakeQuantize,
    QConfig,
    get_default_qat_qconfig,
    get_default_qconfig,
)

from qlab.errors import QlabError
from qlab.hardware import PORTABLE_WEIGHT_MAX, TARGETS
from qlab.quant.observer import (
    Po2MinMaxObserver,
    Po2MovingAverageMinMaxObserver,
    Po2MovingAveragePerChannelMinMaxObserver,
    Po2PerChannelMinMaxObserver,
)

KINDS = ("po2", "torch")
WEIGHT_BITS = (4, 8)
DTYPES = {"quint8": torch.quint8, "qint8": torch.qint8}


def weight_range(target: str, bits: int = 8) -> tuple[int, int]:
    """Integer weight range: +-64 for `portable` (exact on every CPU), the full int8 for `vnni`;
    4-bit weights are -8..7 on either (int8 values restricted to the 4-bit range)."""
    if target not in TARGETS:
        raise QlabError(f"quant.target={target!r} is not known; use portable (exact INT8 on every "
                        f"CPU, the default) or vnni (full 8-bit weights, exact only with VNNI).")
    if bits not in WEIGHT_BITS:
        raise QlabError(f"quant.weight_bits: {bits!r} bits; weights are 4 or 8 bits wide.")
    if bits == 4:
        return -8, 7
    return (-PORTABLE_WEIGHT_MAX, PORTABLE_WEIGHT_MAX) if target == "portable" else (-128, 127)


def averaging_constants(activation: float, weight: float) -> tuple[float, float]:
    """QAT's moving-average constants (quant.averaging_constant, quant.weight_averaging_constant),
    each checked: 0 < c <= 1 (1: the current tensor's range)."""
    for key, value in (("averaging_constant", activation), ("weight_averaging_constant", weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise QlabError(f"quant.{key}={value!r}: a moving-average constant is in (0, 1]: 1 "
                            f"takes the range of the current tensor, 0.01 (torch's default) "
                            f"averages over about 100 steps.")
    return float(activation), float(weight)


def _activation_range(dtype: torch.dtype, reduce_range: bool) -> tuple[int, int]:
    lo, hi = (0, 255) if dtype == torch.quint8 else (-128, 127)
    if reduce_range:  # 7-bit activations: torch's guard against int16 saturation without VNNI,
        # which holds only for values inside the calibrated range (quant.target bounds weights)
        lo, hi = lo // 2, hi // 2
    return lo, hi


def build_qconfig(
    *,
    kind: str = "po2",
    backend: str = "x86",
    qat: bool = False,
    max_shift: int = 8,
    rounding: str = "nearest",
    per_channel: bool = False,
    activation_dtype: str = "quint8",
    activation_symmetric: bool = False,
    reduce_range: bool = False,
    averaging_constant: float = 0.01,
    weight_averaging_constant: float = 1.0,
    target: str = "portable",
    even_zero_point: bool = True,
    weight_bits: int = 8,
) -> QConfig:
    """The QConfig for PTQ (observers) or QAT (FakeQuantize modules that run those observers).

    `target` and `weight_bits` bound the integer weights (see weight_range: 4-bit weights are
    int8 values in -8..7, with po2 scales like any other); activations stay 8-bit unless
    `reduce_range`; `even_zero_point` makes every po2 zero point even (see
    observer.even_zero_point: the same integers on every engine). QAT's observers average the
    ranges they see: activations by `averaging_constant`, weights by `weight_averaging_constant`
    (1: the range of the current weights, the scales conversion will quantize them with)."""
    if kind not in KINDS:
        raise QlabError(f"quant.kind={kind!r} is not known; use quant=po2 or quant=torch.")
    wmin, wmax = weight_range(target, weight_bits)
    if kind == "torch":
        qc = get_default_qat_qconfig(backend) if qat else get_default_qconfig(backend)
        if target == "vnni" and weight_bits == 8:
            return qc
        return QConfig(activation=qc.activation,
                       weight=qc.weight.with_args(quant_min=wmin, quant_max=wmax))
    if activation_dtype not in DTYPES:
        raise QlabError(f"quant.activation_dtype={activation_dtype!r}: use quint8 or qint8.")
    act_dtype = DTYPES[activation_dtype]
    qmin, qmax = _activation_range(act_dtype, reduce_range)
    po2 = {"max_shift": max_shift, "rounding": rounding, "even_zero_point": even_zero_point}
    act = {"dtype": act_dtype, "quant_min": qmin, "quant_max": qmax,
           "qscheme": torch.per_tensor_symmetric if activation_symmetric else torch.per_tensor_affine}
    weight = {"dtype": torch.qint8, "quant_min": wmin, "quant_max": wmax,
              "qscheme": torch.per_tensor_symmetric}
    if per_channel:
        weight |= {"qscheme": torch.per_channel_symmetric, "ch_axis": 0}
    if not qat:
        w_obs = Po2PerChannelMinMaxObserver if per_channel else Po2MinMaxObserver
        return QConfig(activation=Po2MinMaxObserver.with_args(**act, **po2),
                       weight=w_obs.with_args(**weight, **po2))
    # QAT: FakeQuantize (not the fused default, whose kernel computes its own qparams) so the
    # po2 observer really decides every scale the training sees.
    w_obs = Po2MovingAveragePerChannelMinMaxObserver if per_channel else Po2MovingAverageMinMaxObserver
    act_c, weight_c = averaging_constants(averaging_constant, weight_averaging_constant)
    return QConfig(
        activation=FakeQuantize.with_args(observer=Po2MovingAverageMinMaxObserver, **act, **po2,
                                          averaging_constant=act_c),
        weight=FakeQuantize.with_args(observer=w_obs, **weight, **po2, averaging_constant=weight_c),
    )
