"""Mixed precision in an eager INT8 model: float islands and 4-bit weights.

Float islands: named conv/linear ops kept in float. Each is wrapped as dequantize -> the float
op -> quantize (with its own observed po2 output scale), so everything around it stays INT8; the
TorchScript artifact carries the float op as it is. After convert, a quantize that no INT8 op
reads is dropped (float_regions): adjacent islands pass float to each other, the model's input
stays float when only islands read it, and a float head feeds the output as it is.

4-bit weights: named conv/linear ops whose weights are int8 values restricted to -8..7 (po2
scales like every other), set through a per-op qconfig before prepare."""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence

import torch
import torch.ao.nn.quantized as nnq
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
    names = _island_names(model, names)
    for name in names:
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, attr, FloatIsland(getattr(holder, attr)))
    return names


def _island_names(fused: nn.Module, names: Sequence[str]) -> list[str]:
    """`names` without repeats, each checked to be a conv/linear op of the fused model."""
    names = list(dict.fromkeys(str(n) for n in names))
    candidates = weighted_ops(fused) if names else []
    for name in names:
        if name not in candidates:
            kind = type(fused.get_submodule(name)).__name__ if _has(fused, name) else None
            raise QlabError(
                f"quant.float_layers: {name} "
                + (f"is a {kind}, not a conv or linear op" if kind
                   else "is not in this model, so not a conv or linear op")
                + f". Float islands are conv/linear ops of the fused model: "
                  f"{', '.join(candidates[:6])}{' ...' if len(candidates) > 6 else ''} "
                  f"(stage=sensitivity lists them all).")
    return names


def islands_after_calibration(prepared: nn.Module, fused: nn.Module,
                               names: Sequence[str]) -> nn.Module:
    """A copy of a calibrated eager model (prepare_ptq + calibrate) with the named ops made float
    islands, for convert: the same model as preparing with those float_layers and calibrating
    again, without calibrating again. PTQ observers see float activations whatever is float, so
    the op's own output observer has seen what the island's quantize would see; the island takes
    it (and its qconfig), and the op itself comes from `fused`, the float model fused the same
    way. Observers of the copy no longer update (it is for convert, not more calibration)."""
    model = copy.deepcopy(prepared)
    for name in _island_names(fused, names):
        op = model.get_submodule(name)
        if isinstance(op, FloatIsland):
            continue
        observer = getattr(op, "activation_post_process", None)
        if observer is None:
            raise QlabError(f"{name} has no calibrated output observer: pass the prepared, "
                            f"calibrated model.")
        island = FloatIsland(copy.deepcopy(fused.get_submodule(name)))
        island.dequant.qconfig = island.quant.qconfig = op.qconfig
        island.quant.activation_post_process = observer
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, island)
    return model


def float_regions(int8: nn.Module, example: Tensor, keep: Collection[str] = ()) -> list[str]:
    """Drop every quantize of a converted model with float islands that no INT8 op reads: an
    island's output read only by other islands (their dequantize passes a float tensor through)
    or by the model's dequantize, and the model's input when only islands read it. Adjacent
    islands then form one float region, with no 8-bit rounding between them, as the PT2E flow
    makes them (an op left unannotated reads float). INT8 kernels refuse a float tensor, so a
    quantize is dropped when the model still runs on `example` without it; each one's fate
    depends only on the ops that read its output, not on the order they are tried in. Returns
    the names of the dropped quantizes (the converted model changes in place; the state_dict
    loses their scale and zero point, and a rebuilt model drops the same ones). The quantizes
    named in `keep` stay (a model saved before float regions existed holds all of them)."""
    if not float_islands(int8):
        return []
    dropped: list[str] = []
    for name, m in list(int8.named_modules()):
        if not isinstance(m, nnq.Quantize) or name in keep:
            continue
        parent, _, attr = name.rpartition(".")
        holder = int8.get_submodule(parent) if parent else int8
        setattr(holder, attr, nn.Identity())
        try:
            with torch.inference_mode():
                int8(example)
        except (NotImplementedError, RuntimeError):  # an INT8 op read the float tensor
            setattr(holder, attr, m)
            continue
        dropped.append(name)
    return dropped


def boundaries_record(int8: nn.Module) -> dict:
    """Where a converted model with float islands still rounds to 8 bits around them: whether
    its input is quantized, and which islands requantize their output (an INT8 op reads it)."""
    islands = {n: m for n, m in int8.named_modules() if isinstance(m, FloatIsland)}
    inputs = [n for n, m in int8.named_modules() if isinstance(m, nnq.Quantize)
              and not any(n.startswith(i + ".") for i in islands)]
    return {"input_quantized": bool(inputs),
            "requantized": [n for n, m in islands.items() if isinstance(m.quant, nnq.Quantize)]}


def input_readers(fused: nn.Module, example: Tensor) -> list[str]:
    """The conv/linear ops of a fused float model (no islands) that read its input
    quantization's output directly: the ops that must be islands for the input to stay float."""
    ops = weighted_ops(fused)
    stubs = [m for m in fused.modules() if isinstance(m, QuantStub)]
    seen: dict[int, None] = {}
    readers: list[str] = []
    handles = [s.register_forward_hook(lambda mod, args, out: seen.setdefault(id(out)))
               for s in stubs]
    for name in ops:
        def read(mod, args, name=name):
            if args and id(args[0]) in seen and name not in readers:
                readers.append(name)
        handles.append(fused.get_submodule(name).register_forward_pre_hook(read))
    try:
        with torch.inference_mode():
            fused(example)
    finally:
        for h in handles:
            h.remove()
    return readers


def weight_bits_of(spec, names: Sequence[str]) -> dict[str, int]:
    """quant.weight_bits resolved per op: an int (4 or 8) for every op, or a mapping op -> bits
    (ops it does not name stay 8-bit; the key `default` sets their width instead)."""
    if spec is None:
        spec = 8
    if isinstance(spec, bool) or not isinstance(spec, int | Mapping):
        raise QlabError(f"quant.weight_bits={spec!r}: give 4 or 8 (every conv/linear op), or a "
                        f"mapping op -> 4|8 such as quant.weight_bits={{layers.2.conv2:4}}.")
    table = dict(spec) if isinstance(spec, Mapping) else {"default": spec}
    default = table.pop("default", 8)
    unknown = [n for n in table if n not in names]
    if unknown:
        raise QlabError(f"quant.weight_bits names {', '.join(map(str, unknown))}, not a conv or "
                        f"linear op of this model: "
                        f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''} "
                        f"(stage=sensitivity lists them all).")
    bits = {n: table.get(n, default) for n in names}
    bad = {n: b for n, b in bits.items() if isinstance(b, bool) or b not in (4, 8)}
    if bad:
        name, b = next(iter(bad.items()))
        raise QlabError(f"quant.weight_bits: {name} gets {b!r} bits; weights are 4 or 8 bits.")
    return bits


def plain_8bit(spec) -> bool:
    """Whether quant.weight_bits leaves every weight 8-bit without naming any op."""
    return spec is None or (isinstance(spec, int) and not isinstance(spec, bool) and spec == 8)


def four_bit(spec, model: nn.Module) -> list[str]:
    """The ops of a fused model that quant.weight_bits makes 4-bit, in model order."""
    if plain_8bit(spec):
        return []
    return [n for n, b in weight_bits_of(spec, weighted_ops(model)).items() if b == 4]


def set_op_qconfigs(model: nn.Module, qconfigs: Mapping[str, object]) -> None:
    """Give the named ops of a fused model (before prepare) their own qconfig, e.g. a 4-bit
    weight observer; a float island cannot take one."""
    for name, qconfig in qconfigs.items():
        op = model.get_submodule(name)
        if isinstance(op, FloatIsland):
            raise QlabError(f"{name} is both a float island (quant.float_layers) and a 4-bit op "
                            f"(quant.weight_bits): keep it in one of the two.")
        op.qconfig = qconfig


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def float_islands(model: nn.Module) -> list[str]:
    """The float islands of a (prepared or converted) model, by the name of the op they hold."""
    return [name for name, m in model.named_modules() if isinstance(m, FloatIsland)]


def quantized_gemms(int8: nn.Module) -> dict[str, nn.Module]:
    """The quantized conv and linear ops of a converted eager model, by name, in model order."""
    return {n: m for n, m in int8.named_modules() if isinstance(m, nnq.Conv2d | nnq.Linear)}


def weight_bits_record(int8: nn.Module, spec) -> dict:
    """The `weight_bits` block of metrics.json for quant.weight_bits=`spec`: which ops of the
    converted model hold 4-bit weights, how many weights that is, and the bytes that packing
    them two per byte saves (size_mb counts them so)."""
    gemms = quantized_gemms(int8)
    four = [n for n, b in weight_bits_of(spec, list(gemms)).items() if b == 4]
    count = 0
    for name in four:
        w = gemms[name].weight().int_repr()
        if int(w.min()) < -8 or int(w.max()) > 7:
            raise QlabError(f"{name}: 4-bit weights outside -8..7 after conversion.")
        count += w.numel()
    return {"4": four, "8": [n for n in gemms if n not in four], "weights_4bit": count,
            "packed_saving_bytes": (count + 1) // 2 if count else 0}
