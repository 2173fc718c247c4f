"""Float islands: named conv/linear ops of an eager INT8 model kept in float. Each is wrapped as
dequantize -> the float op -> quantize (with its own observed po2 output scale), so everything
around it stays INT8; the TorchScript artifact carries the float op as it is."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.ao.nn import intrinsic as nni
from torch.ao.quantization import DeQuantStub, QuantStub

from qlab.errors import QlabError

# what a fused conv/linear op of the float model can be (eval fusion, QAT fusion, unfused)
WEIGHTED = (nn.Conv2d, nn.Linear, nni.ConvReLU2d, nni.LinearReLU, nni.ConvBn2d, nni.ConvBnReLU2d)


class FloatIsland(nn.Module):
    """One op left in float inside an INT8 model: its input dequantized, its output quantized
    again (the QuantStub is observed like any other activation)."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.dequant = DeQuantStub()
        self.op = op
        self.op.qconfig = None  # prepare/convert leave it float
        self.quant = QuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.quant(self.op(self.dequant(x)))


def weighted_ops(model: nn.Module) -> list[str]:
    """The names of a fused model's conv and linear ops (not the conv inside a fused ConvReLU):
    what can become a float island."""
    names: list[str] = []
    for name, m in model.named_modules():  # parents before children
        if isinstance(m, WEIGHTED) and not any(name.startswith(p + ".") for p in names):
            names.append(name)
    return names


def make_float_islands(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Wrap each named op of a fused model (before prepare) in a FloatIsland; returns the names.
    Names are module paths, as stage=sensitivity lists them (layers.0.conv1, fc, ...)."""
    names = list(dict.fromkeys(str(n) for n in names))
    if not names:
        return []
    candidates = weighted_ops(model)
    for name in names:
        if name not in candidates:
            kind = type(model.get_submodule(name)).__name__ if _has(model, name) else None
            raise QlabError(
                f"quant.float_layers: {name} "
                + (f"is a {kind}, not a conv or linear op" if kind else "is not in this model")
                + f". Float islands are conv/linear ops of the fused model: "
                  f"{', '.join(candidates[:6])}{' ...' if len(candidates) > 6 else ''} "
                  f"(stage=sensitivity lists them all).")
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, attr, FloatIsland(getattr(holder, attr)))
    return names


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def float_islands(model: nn.Module) -> list[str]:
    """The float islands of a (prepared or converted) model, by the name of the op they hold."""
    return [name for name, m in model.named_modules() if isinstance(m, FloatIsland)]
