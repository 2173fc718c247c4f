"""Power-of-two ("po2") observers: the standard min/max qparams, then every scale rounded to 2^n.

With scales 2^n, requantizing int32 accumulators (in_scale * w_scale / out_scale) is itself a
power of two: a bit shift instead of a fixed-point multiply. n is clamped to
[-max_shift, max_shift] so the shift fits the hardware's shifter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.ao.quantization.observer import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)

ROUNDINGS = ("nearest", "ceil")


def po2_exponent(scale: Tensor, *, max_shift: int = 8, rounding: str = "nearest") -> Tensor:
    """n = round(log2 scale) (or ceil), clamped to [-max_shift, max_shift].

    A scale that is <= 0, NaN or inf has no log; it gets the smallest allowed scale 2^-max_shift,
    which keeps everything finite (a zero-width range needs no resolution at all).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"quant.rounding={rounding!r}: use one of {', '.join(ROUNDINGS)}.")
    if max_shift < 0:
        raise ValueError(f"quant.max_shift={max_shift} must be >= 0.")
    scale = scale.double()
    valid = torch.isfinite(scale) & (scale > 0)
    log2 = torch.log2(torch.where(valid, scale, torch.ones_like(scale)))
    n = torch.round(log2) if rounding == "nearest" else torch.ceil(log2 - 1e-12)
    n = torch.where(valid, n, torch.full_like(n, -max_shift))
    return n.clamp(-max_shift, max_shift)


def scale_approximate(scale: float, max_shift_amount: int = 8, rounding: str = "nearest") -> float:
    """The reference report's helper, for one float: the po2 scale 2^n."""
    n = po2_exponent(torch.tensor([scale]), max_shift=max_shift_amount, rounding=rounding)
    return math.ldexp(1.0, int(n.item()))


def even_zero_point(zero: Tensor, *, top: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """The nearest even zero point: zero + 1 where the largest value's code `top` has room
    above it (nothing clips), else zero - 1 (the smallest value clips by one step).

    Why even: engines add the output zero point on either side of the rounding, fbgemm as
    round(acc * 2^-k) + zp, oneDNN and ONNX Runtime as round(acc * 2^-k + zp). Both round half
    to even, and acc * 2^-k is a tie (n + 1/2) whenever the k-th bit of acc is its lowest set
    one. For a tie t, round(t + zp) = round(t) + zp exactly when zp is even (an integer shift
    of even size keeps the parity that picks the even neighbour); away from ties the two
    orders always agree. An even zero point therefore makes every engine compute the same
    integers."""
    odd = zero % 2 != 0
    up = odd & (top < quant_max) & (zero < quant_max)
    down = odd & ~up
    return (zero + up.to(zero.dtype) - down.to(zero.dtype)).clamp(quant_min, quant_max)


class _Po2Mixin:
    """Turns one of torch's min/max observers into a po2 observer (mixed in before it)."""

    def __init__(self, *args, max_shift: int = 8, rounding: str = "nearest",
                 even_zero_point: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        po2_exponent(torch.ones(1), max_shift=max_shift, rounding=rounding)  # validate early
        self.max_shift, self.rounding = int(max_shift), rounding
        self.even_zero_point = bool(even_zero_point)

    def forward(self, x_orig: Tensor) -> Tensor:
        x = x_orig.detach()
        if x.numel() and not torch.isfinite(x).all():
            # NaN/inf carry no range information; 0 is always inside the range anyway
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        super().forward(x)
        return x_orig

    @property
    def _symmetric(self) -> bool:
        return self.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)

    def _standard_qparams(self, min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
        """scale/zero point before rounding: symmetric max|x|/qmax, affine (max-min)/(qmax-qmin)."""
        qmin, qmax = self.quant_min, self.quant_max
        min_neg = torch.min(min_val, torch.zeros_like(min_val))  # the range must hold 0 exactly
        max_pos = torch.max(max_val, torch.zeros_like(max_val))
        if self._symmetric:
            # qint8: zero point 0, scale = max|x| / qmax; quint8: zero point mid-range (128)
            mid = 0 if self.dtype == torch.qint8 else (qmin + qmax + 1) // 2
            scale = torch.max(-min_neg, max_pos) / float(qmax - mid)
            zero = torch.full(scale.shape, mid, dtype=torch.int64)
        else:
            scale = (max_pos - min_neg) / float(qmax - qmin)
            zero = torch.zeros_like(scale, dtype=torch.int64)
        return scale, zero

    def po2_qparams(self, min_val: Tensor, max_val: Tensor) -> dict[str, Tensor]:
        """Every quantity of the rounding, for the per-layer scale table and the tests."""
        raw, zero = self._standard_qparams(min_val.float(), max_val.float())
        raw = torch.where(torch.isfinite(raw) & (raw > 0), raw, torch.zeros_like(raw))
        unclamped = po2_exponent(raw, max_shift=10**6, rounding=self.rounding)
        # an empty or all-zero range has no log: it takes 2^-max_shift without counting as clamped
        unclamped = torch.where(raw > 0, unclamped, torch.full_like(unclamped, -self.max_shift))
        n = unclamped.clamp(-self.max_shift, self.max_shift)
        scale = torch.pow(2.0, n).float()
        if not self._symmetric:
            min_neg = torch.min(min_val.float(), torch.zeros_like(scale))
            zero = (self.quant_min - torch.round(min_neg / scale)).to(torch.int64)
        zero = zero.clamp(self.quant_min, self.quant_max)
        if self.even_zero_point:
            max_pos = torch.max(max_val.float(), torch.zeros_like(scale))
            zero = even_zero_point(zero, top=zero + torch.round(max_pos / scale).to(torch.int64),
                                   quant_min=self.quant_min, quant_max=self.quant_max)
        return {"raw_scale": raw, "exponent": n, "unclamped_exponent": unclamped,
                "scale": scale, "zero_point": zero}

    def _calculate_qparams(self, min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
        p = self.po2_qparams(min_val, max_val)
        return p["scale"].to(min_val.device), p["zero_point"].to(min_val.device)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, max_shift={self.max_shift}, rounding={self.rounding}, "
                f"even_zero_point={self.even_zero_point}")


class Po2MinMaxObserver(_Po2Mixin, MinMaxObserver):
    """Per-tensor po2 observer over the running min/max (PTQ calibration)."""


class Po2MovingAverageMinMaxObserver(_Po2Mixin, MovingAverageMinMaxObserver):
    """Per-tensor po2 observer over a moving-average min/max (QAT activations)."""


class Po2PerChannelMinMaxObserver(_Po2Mixin, PerChannelMinMaxObserver):
    """Per-channel po2 observer (weights), one 2^n per output channel."""


class Po2MovingAveragePerChannelMinMaxObserver(_Po2Mixin, MovingAveragePerChannelMinMaxObserver):
    """Per-channel po2 observer over a moving-average min/max."""
