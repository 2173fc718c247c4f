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
from qlab.quant.observer import (
    Po2MinMaxObserver,
    Po2MovingAverageMinMaxObserver,
    Po2MovingAveragePerChannelMinMaxObserver,
    Po2PerChannelMinMaxObserver,
)

KINDS = ("po2", "torch")
DTYPES = {"quint8": torch.quint8, "qint8": torch.qint8}


def set_backend(backend: str) -> str:
    """Select the quantized engine (x86, fbgemm, qnnpack, onednn) for prepare/convert/inference."""
    supported = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if backend not in supported:
        raise QlabError(f"quant.backend={backend!r} is not available in this torch build; "
                        f"use one of {', '.join(supported)}.")
    torch.backends.quantized.engine = backend
    return backend


def _activation_range(dtype: torch.dtype, reduce_range: bool) -> tuple[int, int]:
    lo, hi = (0, 255) if dtype == torch.quint8 else (-128, 127)
    if reduce_range:  # 7-bit activations: no VPMADDUBSW saturation on x86 CPUs without VNNI
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
) -> QConfig:
    """The QConfig for PTQ (observers) or QAT (FakeQuantize modules that run those observers)."""
    if kind not in KINDS:
        raise QlabError(f"quant.kind={kind!r} is not known; use quant=po2 or quant=torch.")
    if kind == "torch":
        return get_default_qat_qconfig(backend) if qat else get_default_qconfig(backend)
    if activation_dtype not in DTYPES:
        raise QlabError(f"quant.activation_dtype={activation_dtype!r}: use quint8 or qint8.")
    act_dtype = DTYPES[activation_dtype]
    qmin, qmax = _activation_range(act_dtype, reduce_range)
    po2 = {"max_shift": max_shift, "rounding": rounding}
    act = {"dtype": act_dtype, "quant_min": qmin, "quant_max": qmax,
           "qscheme": torch.per_tensor_symmetric if activation_symmetric else torch.per_tensor_affine}
    if per_channel:
        weight = {"dtype": torch.qint8, "quant_min": -128, "quant_max": 127,
                  "qscheme": torch.per_channel_symmetric, "ch_axis": 0}
    else:
        weight = {"dtype": torch.qint8, "quant_min": -128, "quant_max": 127,
                  "qscheme": torch.per_tensor_symmetric}
    if not qat:
        w_obs = Po2PerChannelMinMaxObserver if per_channel else Po2MinMaxObserver
        return QConfig(activation=Po2MinMaxObserver.with_args(**act, **po2),
                       weight=w_obs.with_args(**weight, **po2))
    # QAT: FakeQuantize (not the fused default, whose kernel computes its own qparams) so the
    # po2 observer really decides every scale the training sees.
    w_obs = Po2MovingAveragePerChannelMinMaxObserver if per_channel else Po2MovingAverageMinMaxObserver
    avg = {"averaging_constant": averaging_constant}
    return QConfig(
        activation=FakeQuantize.with_args(observer=Po2MovingAverageMinMaxObserver, **act, **po2, **avg),
        weight=FakeQuantize.with_args(observer=w_obs, **weight, **po2, **avg),
    )
