"""Per-op sensitivity of an eager INT8 model: which quantized op costs the accuracy.

Every quantized op of the converted model (the input quantization, each conv and linear, each
add) is paired with the same op of the FP32 model fused the same way. For each op:

- SQNR (dB) of its weights and of its output, 10 log10(sum x^2 / sum (x - x_hat)^2): the
  converted model's tensor (dequantized) against the fused FP32 model's, on calibration images;
- the fraction of the FP32 output that falls outside the op's INT8 range (clipped);
- the accuracy with only that op quantized, and with only that op left in float (AIMET's two
  sweeps). Those run on a simulation: the fused FP32 model with the converted model's own
  dequantized weights and biases, and a fake-quantize with the converted model's own output
  scale and zero point after each op. With every op switched on it is the converted model up to
  float rounding; `Simulation` reports how close (simulated vs converted accuracy).
  The sweeps run the part of each pass before the op once per batch, cached at cuts
  (`find_cuts`), not once per op.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional, QFunctional
from torch.ao.nn.quantized import Quantize as QuantizeModule
from torch.ao.nn.quantized.modules.utils import WeightedQuantizedModule
from torch.ao.quantization import QuantStub

from qlab.errors import QlabError

AVG_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)


@dataclass
class QuantOp:
    """One quantized op: where it sits in both models and the qparams of its output."""

    name: str
    kind: str
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    weight: Tensor | None = None          # the converted model's weight, dequantized
    bias: Tensor | None = None            # its float bias (on the int32 grid)
    float_weight: Tensor | None = None    # the fused FP32 model's
    float_bias: Tensor | None = None
    weight_scales: Tensor | None = None   # per-channel or one
    pools: list[tuple[str, float, int]] = field(default_factory=list)  # average pools it feeds:
    # (name, scale, zero point) of their INT8 output, which rounds the mean to a code
    stats: dict = field(default_factory=dict)


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise); inf when the tensors are identical."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, QuantizeModule):
        return "input"
    if isinstance(module, QFunctional):
        return "add"
    if isinstance(module, WeightedQuantizedModule) or hasattr(module, "_packed_params"):
        name = type(module).__name__.lower()
        if "conv" in name:
            return "conv"
        if "linear" in name:
            return "linear"
    return None


def _weighted(module: nn.Module) -> nn.Module:
    """The Conv2d/Linear inside a fused float module (ConvReLU2d is a Sequential)."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        return module
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            return m
    raise QlabError(f"No conv or linear inside {type(module).__name__}.")


def _hook_point(module: nn.Module) -> nn.Module:
    """Where an op's output can be observed: the module itself, or for an add (FloatFunctional /
    QFunctional, whose forward is never called) the identity it passes its result through."""
    if isinstance(module, FloatFunctional | QFunctional):
        return module.activation_post_process
    return module


def _clipped(op: QuantOp, x: Tensor) -> int:
    """How many values of the float tensor x fall outside op's INT8 output range (half a step
    of slack)."""
    lo = (op.qmin - op.zero_point) * op.scale
    hi = (op.qmax - op.zero_point) * op.scale
    return int(((x < lo - op.scale / 2) | (x > hi + op.scale / 2)).sum())


def _add_error(sums: list, x: Tensor, x_hat: Tensor) -> None:
    """Accumulate the signal and noise energies of x_hat against x (sums[0], sums[1])."""
    sums[0] += float(x.double().pow(2).sum())
    sums[1] += float((x.double() - x_hat.double()).pow(2).sum())


def _qrange(dtype: torch.dtype) -> tuple[int, int]:
    return (0, 255) if dtype == torch.quint8 else (-128, 127)


def find_ops(int8: nn.Module, fused: nn.Module, example: Tensor) -> list[QuantOp]:
    """The quantized ops of a converted eager model in execution order, paired with the fused
    FP32 model's modules of the same names."""
    floats = dict(fused.named_modules())
    candidates = {name: m for name, m in int8.named_modules() if _kind(m) is not None}
    order: list[str] = []
    dtypes: dict[str, torch.dtype] = {}
    pools: dict[str, list[tuple[str, float, int]]] = {}
    handles = []
    for name, m in candidates.items():
        def record(mod, inputs, output, name=name):
            if name not in dtypes:
                order.append(name)
                dtypes[name] = output.dtype
        handles.append(_hook_point(m).register_forward_hook(record))
    for name, m in int8.named_modules():
        if isinstance(m, AVG_POOLS):
            def pooled(mod, inputs, output, name=name):
                if output.is_quantized and order and name not in {p[0] for v in pools.values()
                                                                   for p in v}:
                    pools.setdefault(order[-1], []).append(
                        (name, float(output.q_scale()), int(output.q_zero_point())))
            handles.append(m.register_forward_hook(pooled))
    with torch.inference_mode():
        int8(example)
    for h in handles:
        h.remove()
    ops = []
    for name in order:
        m, kind = candidates[name], _kind(candidates[name])
        if name not in floats:
            raise QlabError(f"The INT8 op {name} has no FP32 counterpart: the FP32 model was not "
                            f"fused the way the INT8 one was.")
        if kind == "input" and not isinstance(floats[name], QuantStub):
            raise QlabError(f"{name}: an input quantization where the FP32 model has "
                            f"{type(floats[name]).__name__}.")
        qmin, qmax = _qrange(dtypes[name])
        op = QuantOp(name=name, kind=kind, scale=float(m.scale), zero_point=int(m.zero_point),
                     qmin=qmin, qmax=qmax, pools=pools.get(name, []))
        if kind in ("conv", "linear"):
            qw = m.weight()
            op.weight = qw.dequantize()
            per_channel = qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
            op.weight_scales = (qw.q_per_channel_scales() if per_channel
                                else torch.tensor([qw.q_scale()])).double()
            b = m.bias()
            op.bias = None if b is None else b.detach().clone()
            inner = _weighted(floats[name])
            op.float_weight = inner.weight.detach().clone()
            op.float_bias = None if inner.bias is None else inner.bias.detach().clone()
        ops.append(op)
    if not ops:
        raise QlabError("The model has no quantized ops: is it a converted eager INT8 model?")
    return ops


def fake_quantize(x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """torch.fake_quantize_per_tensor_affine's float, bit for bit: x times the float32 inverse
    scale, rounded half to even, clamped to the integer range, times the scale. Four vectorized
    passes; that op's kernel also builds a gradient mask (5x slower on one thread of an AVX2
    EPYC)."""
    inverse = float(1.0 / torch.tensor(scale, dtype=torch.float32))
    return x.mul(inverse).round_().clamp_(qmin - zero_point, qmax - zero_point).mul_(scale)


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x, *args[1:])


class Simulation:
    """The fused FP32 model with a switch per op: a quantized op uses the converted model's
    weights and bias and fake-quantizes its output with the converted model's qparams; a float
    op is the FP32 model's own."""

    cuttable = True  # blocks of the eager model can start a pass (find_cuts)

    def __init__(self, fused: nn.Module, ops: Sequence[QuantOp]) -> None:
        # channels_last: the layout oneDNN's float CPU convolutions prefer (a whole MobileNetV2
        # forward 1.8x faster on one thread of an AVX2 EPYC): the sweeps are float passes
        self.model = copy.deepcopy(fused).eval().to(memory_format=torch.channels_last)
        self.model.register_forward_pre_hook(_channels_last_input)
        self.ops = list(ops)
        self.modules = dict(self.model.named_modules())
        self.quantized: set[str] = set()
        self._weights: dict[str, bool] = {}  # which weights each op holds now (quantized?)
        for op in self.ops:
            hook = self._fake_quant(op.name, op.scale, op.zero_point, op.qmin, op.qmax)
            _hook_point(self.modules[op.name]).register_forward_hook(hook)
            for pool, scale, zero_point in op.pools:  # a quantized average rounds its mean
                hook = self._fake_quant(op.name, scale, zero_point, op.qmin, op.qmax)
                self.modules[pool].register_forward_hook(hook)

    def _fake_quant(self, name: str, scale: float, zero_point: int, qmin: int,
                    qmax: int) -> Callable:
        def hook(mod, inputs, output):
            if name not in self.quantized:
                return output
            return fake_quantize(output, scale, zero_point, qmin, qmax)
        return hook

    def set_quantized(self, names: Iterable[str]) -> Simulation:
        self.quantized = set(names)
        with torch.no_grad():
            for op in self.ops:
                q = op.name in self.quantized
                if op.weight is None or self._weights.get(op.name) == q:
                    continue
                inner = _weighted(self.modules[op.name])
                inner.weight.copy_(op.weight if q else op.float_weight)
                bias = op.bias if q else op.float_bias
                if inner.bias is not None and bias is not None:
                    inner.bias.copy_(bias)
                self._weights[op.name] = q
        return self

    def __call__(self, x: Tensor) -> Tensor:
        return self.model(x)


@torch.inference_mode()
def output_stats(ops: Sequence[QuantOp], fused: nn.Module, int8: nn.Module,
                 batches: Iterable[Tensor]) -> None:
    """Fill op.stats: output SQNR (converted vs fused FP32, same images), fraction of the FP32
    output outside the op's INT8 range, and weight SQNR."""
    sums = {op.name: [0.0, 0.0, 0, 0] for op in ops}  # signal, noise, clipped, count
    captured: dict[str, Tensor] = {}
    fmods, qmods = dict(fused.named_modules()), dict(int8.named_modules())
    handles = []
    for op in ops:
        def keep_float(mod, inputs, output, name=op.name):
            captured[name] = output.detach().float()

        def compare(mod, inputs, output, op=op):
            x = captured.pop(op.name)
            x_hat = output.dequantize() if output.is_quantized else output.float()
            s = sums[op.name]
            _add_error(s, x, x_hat)
            s[2] += _clipped(op, x)
            s[3] += x.numel()
        handles.append(_hook_point(fmods[op.name]).register_forward_hook(keep_float))
        handles.append(_hook_point(qmods[op.name]).register_forward_hook(compare))
    try:
        for x in batches:
            fused(x)
            int8(x)
    finally:
        for h in handles:
            h.remove()
    for op in ops:
        signal, noise, clipped, count = sums[op.name]
        op.stats["output_sqnr_db"] = sqnr_db(signal, noise)
        op.stats["clipped_fraction"] = clipped / max(count, 1)
        op.stats["output_scale_exponent"] = round(math.log2(op.scale)) if op.scale > 0 else None
        _weight_stats(op)


def _weight_stats(op: QuantOp) -> None:
    """Weight SQNR and the range of weight-scale exponents (None for ops without weights)."""
    if op.weight is None:
        op.stats["weight_sqnr_db"] = op.stats["weight_exponents"] = None
        return
    w, wq = op.float_weight.double(), op.weight.double()
    op.stats["weight_sqnr_db"] = sqnr_db(float(w.pow(2).sum()), float((w - wq).pow(2).sum()))
    exps = op.weight_scales.log2().round()
    op.stats["weight_exponents"] = [int(exps.min()), int(exps.max())]


@torch.inference_mode()
def accuracy(model: Callable[[Tensor], Tensor], batches: Sequence[tuple[Tensor, Tensor]]) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


class _Halt(Exception):
    """Raised by a forward pre-hook to end a forward pass early, carrying the module's input."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


def _run(model: nn.Module, x: Tensor, start: nn.Module | None = None, state: Tensor | None = None,
         stop: nn.Module | None = None) -> Tensor:
    """model's forward pass from `start`, whose input is `state` (the layers before it run on
    one image, x[:1], and their results are dropped), up to `stop`, whose input it returns, or
    to the end (the logits). None: from the model's input, to the end."""
    handles = []
    if start is not None:
        handles.append(start.register_forward_pre_hook(lambda mod, args: (state, *args[1:])))
        x = x[:1]
    if stop is not None:
        def halt(mod, args):
            raise _Halt(args[0])
        handles.append(stop.register_forward_pre_hook(halt))
    try:
        return model(x)
    except _Halt as h:
        return h.value
    finally:
        for h in handles:
            h.remove()


@dataclass
class Cuts:
    """Points where a forward pass can be cut in two: modules (children of the model or of an
    nn.Sequential) called once with one tensor, whose input is all that the rest of the pass
    reads, checked by running the rest from a cached input. `of[i]`: the last cut at or before
    op i (None: op i comes before every cut), so ops before it are exactly the ops before op i;
    it never decreases along the ops (a later op can always use an earlier op's cut)."""

    modules: list[nn.Module]
    of: list[int | None]


@torch.no_grad()
def find_cuts(sim: Simulation, x: Tensor) -> Cuts:
    """For each op, the latest cut of the simulation's model at or before it whose rest of the
    pass, run from the cached input, gives the very logits of the whole pass, bit for bit, on
    the images x in both states the sweeps cache (all ops float, all quantized)."""
    model, order, calls, single = sim.model, {}, {}, {}
    modules = {id(m): m for m in model.modules()}
    candidates = {id(m) for m in model.children()}
    for m in model.modules():
        if type(m) is nn.Sequential:  # containers, not fused modules (ConvReLU2d, ...)
            candidates |= {id(c) for c in m.children()}
    handles = []
    for m in modules.values():
        def seen(mod, args, kwargs):
            order.setdefault(id(mod), len(order))
            calls[id(mod)] = calls.get(id(mod), 0) + 1
            single[id(mod)] = len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
        handles.append(m.register_forward_pre_hook(seen, with_kwargs=True))
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    cuts = sorted((i for i in candidates if calls.get(i) == 1 and single[i]), key=order.get)
    wholes = []
    for state in ((), [op.name for op in sim.ops]):
        sim.set_quantized(state)
        wholes.append((state, model(x)))
    valid: dict[int, bool] = {}

    def is_valid(i: int) -> bool:
        if i not in valid:
            valid[i] = True
            for state, whole in wholes:
                sim.set_quantized(state)
                try:
                    rest = _run(model, x, modules[i], _run(model, x, stop=modules[i]))
                    valid[i] = valid[i] and rest.shape == whole.shape and torch.equal(rest, whole)
                except Exception:  # noqa: BLE001 - a pass that cannot be cut here fails anyhow
                    valid[i] = False
        return valid[i]

    of = []
    for op in sim.ops:
        position = order[id(_hook_point(sim.modules[op.name]))]
        of.append(next((i for i in reversed(cuts) if order[i] <= position and is_valid(i)), None))
    chosen = sorted({i for i in of if i is not None}, key=order.get)  # in execution order
    return Cuts([modules[i] for i in chosen], [None if i is None else chosen.index(i) for i in of])


def per_op_accuracy(sim: Simulation, batches: Sequence[tuple[Tensor, Tensor]], *,
                    only_quantized: bool = True, only_float: bool = True,
                    names: Iterable[str] | None = None, cut: bool = True,
                    progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """AIMET's two sweeps: for each op (or each op in `names`), the accuracy with only that op
    quantized and with every op but that one quantized. With `cut`, the part of each pass
    before the op is not run again per op: it is the same for every later op (all float in the
    first sweep, all quantized in the second), so it is run once per batch up to each cut
    (`find_cuts`) and each op's pass starts from the cut before it; the accuracies are the
    same as whole passes give, bit for bit."""
    all_names = [op.name for op in sim.ops]
    wanted = set(all_names if names is None else names)
    sweeps_to_run = ([("accuracy_only_this_quantized", ())] if only_quantized else []) + \
        ([("accuracy_only_this_float", all_names)] if only_float else [])
    correct = {n: {key: 0 for key, _ in sweeps_to_run} for n in all_names if n in wanted}
    cuts = (find_cuts(sim, batches[0][0][:8]) if cut and batches and sim.cuttable
            else Cuts([], [None] * len(all_names)))
    total = 0
    with torch.inference_mode():
        for b, (x, y) in enumerate(batches):
            for key, prefix in sweeps_to_run:
                state, at = None, None
                for i, op in enumerate(sim.ops):
                    if op.name not in wanted:
                        continue
                    c = cuts.of[i]
                    if c is not None and c != at:  # move the cached input on to cut c
                        sim.set_quantized(prefix)  # (cuts.of never decreases: see find_cuts)
                        state = _run(sim.model, x, None if at is None else cuts.modules[at],
                                     state, cuts.modules[c])
                        at = c
                    sim.set_quantized([op.name] if key == "accuracy_only_this_quantized"
                                      else (n for n in all_names if n != op.name))
                    logits = _run(sim.model, x, None if c is None else cuts.modules[c], state)
                    correct[op.name][key] += int((logits.argmax(1) == y).sum())
            total += len(y)
            if progress:
                progress(f"batch {b + 1}/{len(batches)}")
    sim.set_quantized(all_names)
    return {n: {key: 100.0 * v / max(total, 1) for key, v in d.items()} for n, d in correct.items()}


def sweeps(sim: Simulation, batches: Sequence[tuple[Tensor, Tensor]],
           progress: Callable[[str], None] | None = None, cut: bool = True) -> dict:
    """AIMET's two sweeps on the simulation (per_op_accuracy, into each op's stats), and the
    all-float and all-quantized accuracies they are read against."""
    names = [op.name for op in sim.ops]
    result = {"float": accuracy(sim.set_quantized(()), batches),
              "quantized": accuracy(sim.set_quantized(names), batches)}
    by_name = {op.name: op for op in sim.ops}
    for name, accs in per_op_accuracy(sim, batches, cut=cut, progress=progress).items():
        by_name[name].stats.update(accs)
    return result


# ---- the PT2E flow: the convert_pt2e graph itself, with a switch on every q/dq pair ----------

_QD = torch.ops.quantized_decomposed
_PASS_THROUGH = ("relu", "relu_", "flatten", "view", "reshape", "hardtanh", "hardtanh_",
                 "clamp", "contiguous", "dropout")
_KIND_OF = {"conv2d": "conv", "linear": "linear", "add": "add", "add_": "add", "cat": "cat",
            "max_pool2d": "pool", "avg_pool2d": "pool", "adaptive_avg_pool2d": "pool",
            "mean": "pool"}


def _aten_name(node: torch.fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def _producer(node: torch.fx.Node) -> torch.fx.Node:
    """The op a quantized tensor comes from, looking through ReLU and reshapes."""
    while ((node.op == "call_function" and _aten_name(node) in _PASS_THROUGH)
           or (node.op == "call_module" and str(node.target).startswith("_qlab_tap_"))):
        node = node.args[0]
    return node


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _value(gm: torch.fx.GraphModule, arg):
    """A graph argument's value: the tensor behind a get_attr node, else the constant itself."""
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        return _attr(gm, arg.target)
    return arg


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _ActSwitch(nn.Module):
    """dequantize(quantize(x)) when on (fake-quantize: the same float), x when off."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax = scale, zero_point, qmin, qmax
        self.on = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.on:
            return x
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax)


class _ParamSwitch(nn.Module):
    """The converted model's (dequantized) parameter when on, the float model's when off."""

    def __init__(self, quantized: Tensor, float_: Tensor) -> None:
        super().__init__()
        self.register_buffer("quantized", quantized.detach().clone())
        self.register_buffer("float_", float_.detach().clone())
        self.on = True

    def forward(self) -> Tensor:
        return self.quantized if self.on else self.float_


class _Tap(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class GraphSimulation:
    """The PT2E flow's sensitivity model: the convert_pt2e graph with each q/dq pair replaced by
    a switchable fake-quantize (identical when on: dequantize(quantize(x)) is that float) and
    each dequantized weight and snapped bias by a switch to the prepared model's float one (BN
    folded the same way). All on is the converted model; all off is the FP32 model fused as
    PT2E fuses it. Ops are named by the module that produces them."""

    cuttable = False  # one graph module: a pass cannot start midway (find_cuts)

    def __init__(self, converted: torch.fx.GraphModule, prepared: torch.fx.GraphModule) -> None:
        self.model = copy.deepcopy(converted)
        gm, graph = self.model, self.model.graph
        prepared_nodes = {n.name: n for n in prepared.graph.nodes}
        ops: dict[str, QuantOp] = {}
        self._switches: dict[str, list[nn.Module]] = {}
        self._out: dict[str, nn.Module] = {}
        names: dict[torch.fx.Node, str] = {}

        def op_for(producer: torch.fx.Node) -> QuantOp:
            if producer in names:
                return ops[names[producer]]
            kind = ("input" if producer.op == "placeholder"
                    else _KIND_OF.get(_aten_name(producer), "other"))
            base = "input" if kind == "input" else (_module_path(producer) or producer.name)
            name = base if kind in ("conv", "linear", "input") else f"{base}:{kind}"
            while name in ops:
                name += "'"
            names[producer] = name
            ops[name] = QuantOp(name=name, kind=kind, scale=0.0, zero_point=0, qmin=0, qmax=0)
            self._switches[name] = []
            return ops[name]

        counter = 0
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target == _QD.quantize_per_tensor.default:
                x, scale, zp, qmin, qmax = node.args[:5]
                op = op_for(_producer(x))
                op.scale, op.zero_point = float(_value(gm, scale)), int(_value(gm, zp))
                op.qmin, op.qmax = int(qmin), int(qmax)
                switch = _ActSwitch(op.scale, op.zero_point, op.qmin, op.qmax)
                counter += 1
                gm.add_submodule(f"_qlab_act_{counter}", switch)
                with graph.inserting_after(node):
                    new = graph.call_module(f"_qlab_act_{counter}", (x,))
                for dq in list(node.users):
                    dq.replace_all_uses_with(new)
                    graph.erase_node(dq)
                graph.erase_node(node)
                self._switches[op.name].append(switch)
                self._out[op.name] = switch
            elif node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
                dq = node.args[1]
                if not (isinstance(dq, torch.fx.Node) and "dequantize" in str(dq.target)):
                    continue
                op = op_for(node)
                before = prepared_nodes.get(node.name)
                if before is None:
                    raise QlabError(f"{node.name}: not in the prepared graph; the converted "
                                    f"model does not come from it.")
                w_float = _float_param(prepared, before.args[1])
                w_q = dq.target(*[_value(gm, a) for a in dq.args])
                op.weight, op.float_weight = w_q.detach(), w_float.detach()
                scales = _value(gm, dq.args[1])
                op.weight_scales = torch.as_tensor(scales, dtype=torch.float64).flatten()
                for slot, q_val, f_val in ((1, w_q, w_float),
                                           (2, *_bias_pair(gm, prepared, node, before))):
                    if q_val is None:
                        continue
                    counter += 1
                    switch = _ParamSwitch(q_val, f_val)
                    gm.add_submodule(f"_qlab_param_{counter}", switch)
                    with graph.inserting_before(node):
                        new = graph.call_module(f"_qlab_param_{counter}", ())
                    old = node.args[slot]
                    node.update_arg(slot, new)
                    if isinstance(old, torch.fx.Node) and not old.users:
                        graph.erase_node(old)
                    self._switches[op.name].append(switch)
                if op.name not in self._out:  # a weight-only op (an unquantized output)
                    counter += 1
                    tap = _Tap()
                    gm.add_submodule(f"_qlab_tap_{counter}", tap)
                    with graph.inserting_after(node):
                        new = graph.call_module(f"_qlab_tap_{counter}", (node,))
                    node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
                    self._out[op.name] = tap
        graph.eliminate_dead_code()
        gm.recompile()
        self.ops = list(ops.values())
        self.quantized = {op.name for op in self.ops}

    def set_quantized(self, names: Iterable[str]) -> GraphSimulation:
        self.quantized = set(names)
        for name, switches in self._switches.items():
            for s in switches:
                s.on = name in self.quantized
        return self

    def __call__(self, x: Tensor) -> Tensor:
        return self.model(x)

    @torch.inference_mode()
    def output_stats(self, batches: Iterable[Tensor]) -> None:
        """op.stats as output_stats gives them for the eager flow: all-off (the fused FP32
        model) against all-on (the converted one) at each op's output, on the same images."""
        sums = {op.name: [0.0, 0.0, 0, 0] for op in self.ops}
        captured: dict[str, Tensor] = {}
        mode = {"float": True}
        handles = []
        for op in self.ops:
            def hook(mod, inputs, output, op=op):
                x_in = inputs[0] if isinstance(mod, _ActSwitch) else output
                if mode["float"]:
                    captured[op.name] = output.detach().float()
                    if isinstance(mod, _ActSwitch):  # the FP32 tensor against the INT8 range
                        sums[op.name][2] += _clipped(op, x_in)
                        sums[op.name][3] += x_in.numel()
                    return
                _add_error(sums[op.name], captured.pop(op.name), output)
            handles.append(self._out[op.name].register_forward_hook(hook))
        keep = set(self.quantized)
        try:
            for x in batches:
                mode["float"] = True
                self.set_quantized(())(x)
                mode["float"] = False
                self.set_quantized(op.name for op in self.ops)(x)
        finally:
            for h in handles:
                h.remove()
            self.set_quantized(keep)
        for op in self.ops:
            signal, noise, clipped, count = sums[op.name]
            op.stats["output_sqnr_db"] = sqnr_db(signal, noise)
            op.stats["clipped_fraction"] = clipped / count if count else None
            op.stats["output_scale_exponent"] = (round(math.log2(op.scale)) if op.scale > 0
                                                 else None)
            _weight_stats(op)


def _float_param(prepared: torch.fx.GraphModule, arg) -> Tensor:
    """The float tensor behind a prepared graph's weight argument (through its observer)."""
    node = arg
    while isinstance(node, torch.fx.Node) and node.op != "get_attr":
        node = node.args[0]
    if not isinstance(node, torch.fx.Node):
        raise QlabError("A weight of the prepared graph is not a parameter.")
    return _attr(prepared, node.target)


def _bias_pair(gm, prepared, node, before) -> tuple[Tensor | None, Tensor | None]:
    if len(node.args) < 3 or node.args[2] is None or len(before.args) < 3 or before.args[2] is None:
        return None, None
    return _value(gm, node.args[2]), _float_param(prepared, before.args[2])
