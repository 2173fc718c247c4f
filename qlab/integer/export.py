"""torch's INT8 model (eager, converted) -> the integer-only model: model.json + weights.npz.

The converted model is traced with torch.fx (quantized modules are leaves) and run once on a
zero image to read every tensor's scale and zero point; each quantized op then becomes one
integer op whose scales are all 2^n, so every requantization is a shift.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import Tensor, fx, nn
from torch.nn import functional as F

from qlab.artifacts import atomic_write
from qlab.errors import QlabError
from qlab.integer.bias import bias_grid
from qlab.integer.reference import FORMAT, VERSION, pack_int4
from qlab.models import Normalize

QDTYPES = {torch.quint8: ("uint8", 0, 255), torch.qint8: ("int8", -128, 127)}
ALIASES = (nn.Identity, nn.Dropout)
GEMMS = (nnq.Conv2d, nnq.Linear)


def _weight_scales(w: Tensor) -> Tensor:
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return w.q_per_channel_scales().double()
    return torch.tensor([w.q_scale()], dtype=torch.float64)


def _weight_zero_points(w: Tensor) -> Tensor:
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return w.q_per_channel_zero_points()
    return torch.tensor([w.q_zero_point()])


@torch.inference_mode()
def input_scales(int8: nn.Module, sample: Tensor) -> dict[str, float]:
    """The scale of the tensor each quantized conv/linear reads (fixed once converted)."""
    scales, hooks = {}, []
    for name, mod in int8.named_modules():
        if isinstance(mod, GEMMS):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: scales.__setitem__(name, float(args[0].q_scale()))))
    try:
        int8(sample)
    finally:
        for h in hooks:
            h.remove()
    return scales


@torch.inference_mode()
def snap_biases(int8: nn.Module, sample: Tensor) -> int:
    """Put every float bias on its accumulator grid: b = round(b / (s_in * s_w)) * s_in * s_w.

    Integer hardware adds an int32 bias to the int32 accumulator; fbgemm adds b / (s_in * s_w)
    in float. With po2 scales and b on the grid the two are the same number, so torch's INT8
    model computes exactly what the shift-requantized integer model does. Returns how many
    biases moved."""
    moved = 0
    for name, s_in in input_scales(int8, sample).items():
        mod = int8.get_submodule(name)
        w, b = mod.weight(), mod.bias()
        if b is None:
            continue
        codes, step = bias_grid(b, s_in, _weight_scales(w))
        snapped = (codes * step).float()
        if not torch.equal(snapped, b):
            mod.set_weight_bias(w, snapped)
            moved += 1
    return moved


def exponent(scale: float, what: str, max_shift: int | None) -> int:
    """n with scale == 2^n exactly, else a clear error naming the tensor."""
    mantissa, n = math.frexp(float(scale))
    if mantissa != 0.5:
        raise QlabError(
            f"{what} has scale {scale!r}, not a power of two: the integer model needs every scale "
            f"to be 2^n (quantize with quant=po2, not quant=torch).")
    n -= 1
    if max_shift is not None and abs(n) > max_shift:
        raise QlabError(f"{what} has scale 2^{n}, outside the configured range 2^-{max_shift} .. "
                        f"2^{max_shift} (quant.max_shift={max_shift}).")
    return n


class _Record(fx.Interpreter):
    """Runs the traced model once and keeps what every node returned."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def trace(int8: nn.Module) -> fx.GraphModule:
    """torch.fx graph of a converted eager model (quantized modules stay single calls)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fx.symbolic_trace(int8)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


class _Exporter:
    def __init__(self, int8: nn.Module, mean: Sequence[float], std: Sequence[float],
                 image_size: int, max_shift: int | None, four_bit: Sequence[str] = ()) -> None:
        self.four_bit = set(four_bit)
        self.gm = trace(int8.eval())
        self.mean, self.std, self.max_shift = list(mean), list(std), max_shift
        rec = _Record(self.gm)
        with torch.inference_mode():
            rec.run(torch.zeros(1, len(self.mean), image_size, image_size))
        self.values = rec.values
        self.tensors: dict[str, dict] = {}
        self.alias: dict[str, str] = {}
        self.ops: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.output: dict | None = None

    # tensors ---------------------------------------------------------------------------------

    def src(self, node) -> str:
        if not isinstance(node, fx.Node):
            raise QlabError(f"The integer export expected a tensor, got {node!r}.")
        name = self.alias.get(node.name, node.name)
        if name not in self.tensors:
            raise QlabError(f"The integer export reached {node.name!r}, which reads a float "
                            f"tensor: every op between the input quantization and the output "
                            f"must run on quantized tensors.")
        return name

    def add_tensor(self, node: fx.Node) -> dict:
        value = self.values[node.name]
        if not isinstance(value, Tensor) or not value.is_quantized:
            raise QlabError(f"{node.name!r} does not return a quantized tensor.")
        if value.dtype not in QDTYPES or value.qscheme() not in (torch.per_tensor_affine,
                                                                 torch.per_tensor_symmetric):
            raise QlabError(f"{node.name!r} is {value.dtype} {value.qscheme()}; activations must "
                            f"be per-tensor quint8 or qint8.")
        dtype, lo, hi = QDTYPES[value.dtype]
        info = {"shape": list(value.shape[1:]), "dtype": dtype,
                "exp": exponent(value.q_scale(), f"tensor {node.name!r}", self.max_shift),
                "zero_point": int(value.q_zero_point())}
        self.tensors[node.name] = info
        return info

    def clamp(self, info: dict, relu: bool) -> list[int]:
        _, lo, hi = next(v for v in QDTYPES.values() if v[0] == info["dtype"])
        return [info["zero_point"] if relu else lo, hi]

    # ops -------------------------------------------------------------------------------------

    def quantize_input(self, node: fx.Node, mod: nnq.Quantize) -> None:
        out = self.add_tensor(node)
        if out["dtype"] != "uint8":
            raise QlabError("The input quantization must be quint8 (pixels map to 0..255).")
        channels = len(self.mean)
        pixels = torch.arange(256, dtype=torch.float32).div(255.0)  # as evaluate() feeds them
        x = Normalize(self.mean, self.std)(pixels.view(1, 1, 1, 256).expand(1, channels, 1, 256))
        with torch.inference_mode():
            lut = mod(x).int_repr().reshape(channels, 256)
        self.arrays["input.lut"] = lut.numpy().astype(np.uint8)
        self.ops.append({"op": "quantize_input", "name": node.name, "inputs": [],
                         "output": node.name, "lut": "input.lut"})

    def gemm(self, node: fx.Node, mod: nn.Module) -> None:
        name = str(node.target)
        src = self.src(node.args[0])
        x, out = self.tensors[src], self.add_tensor(node)
        w, b = mod.weight(), mod.bias()
        if (_weight_zero_points(w) != 0).any():
            raise QlabError(f"{name}: weights with a non-zero zero point are not supported "
                            f"(the po2 qconfig quantizes weights symmetrically).")
        w_exp = [exponent(s, f"{name} weight", self.max_shift) for s in _weight_scales(w).tolist()]
        cout = w.shape[0]
        shifts = [out["exp"] - x["exp"] - e for e in w_exp]
        bias = torch.zeros(cout, dtype=torch.float64) if b is None else b.detach().double()
        codes, step = bias_grid(bias, 2.0 ** x["exp"],
                                torch.tensor([2.0 ** e for e in w_exp], dtype=torch.float64))
        bias_q = codes.numpy()
        if np.abs(bias_q).max(initial=0) >= 2**31:
            raise QlabError(f"{name}: a bias needs more than 32 bits on the accumulator grid.")
        wq = w.int_repr().numpy().astype(np.int8)
        # 4-bit weights: two per byte (reference.pack_int4); it refuses values outside -8..7
        self.arrays[f"{name}.weight"] = pack_int4(wq) if name in self.four_bit else wq
        self.arrays[f"{name}.bias"] = bias_q.astype(np.int32)
        on_grid = bool(torch.equal(codes * step, bias))
        relu = isinstance(mod, nniq.ConvReLU2d | nniq.LinearReLU)
        op = {"op": "conv" if isinstance(mod, nnq.Conv2d) else "linear", "name": name,
              "inputs": [src], "output": node.name, "weight": f"{name}.weight",
              "bias": f"{name}.bias", "in_zero_point": x["zero_point"],
              "out_zero_point": out["zero_point"],
              "weight_exp": w_exp[0] if len(w_exp) == 1 else w_exp,
              "shift": shifts[0] if len(w_exp) == 1 else shifts,
              "relu": relu, "clamp": self.clamp(out, relu), "bias_on_grid": on_grid}
        if name in self.four_bit:
            op["weight_bits"] = 4
        if isinstance(mod, nnq.Conv2d):
            if mod.padding_mode != "zeros":
                raise QlabError(f"{name}: padding_mode={mod.padding_mode!r}; only zeros.")
            op |= {"kernel": _pair(mod.kernel_size), "stride": _pair(mod.stride),
                   "padding": _pair(mod.padding), "dilation": _pair(mod.dilation),
                   "groups": int(mod.groups)}
        self.ops.append(op)

    def add(self, node: fx.Node) -> None:
        relu = node.target is torch.ops.quantized.add_relu
        srcs = [self.src(a) for a in node.args[:2]]
        a, b = (self.tensors[s] for s in srcs)
        out = self.add_tensor(node)
        common = min(a["exp"], b["exp"])
        self.ops.append({"op": "add", "name": node.name, "inputs": srcs, "output": node.name,
                         "in_zero_points": [a["zero_point"], b["zero_point"]],
                         "align": [a["exp"] - common, b["exp"] - common],
                         "shift": out["exp"] - common, "out_zero_point": out["zero_point"],
                         "relu": relu, "clamp": self.clamp(out, relu)})

    def maxpool(self, node: fx.Node, params: dict) -> None:
        src = self.src(node.args[0])
        out = self.add_tensor(node)
        if out["exp"] != self.tensors[src]["exp"] or out["zero_point"] != self.tensors[src]["zero_point"]:
            raise QlabError(f"{node.name}: max pooling that changes the scale is not supported.")
        kernel = _pair(params["kernel_size"])
        stride = _pair(params.get("stride") or params["kernel_size"])
        self.ops.append({"op": "maxpool", "name": node.name, "inputs": [src], "output": node.name,
                         "kernel": kernel, "stride": stride,
                         "padding": _pair(params.get("padding", 0)),
                         "dilation": _pair(params.get("dilation", 1)),
                         "ceil_mode": bool(params.get("ceil_mode", False))})

    def avgpool(self, node: fx.Node, output_size) -> None:
        src = self.src(node.args[0])
        x, out = self.tensors[src], self.add_tensor(node)
        (h, w), (oh, ow) = x["shape"][1:], out["shape"][1:]
        if h % oh or w % ow:
            raise QlabError(f"{node.name}: adaptive average pooling {h}x{w} -> {oh}x{ow} has "
                            f"uneven windows; the integer model needs equal windows.")
        kh, kw = h // oh, w // ow
        n = kh * kw
        if n & (n - 1):
            raise QlabError(f"{node.name}: an average over {kh}x{kw}={n} values is not a shift "
                            f"(the window must hold a power of two values, e.g. 2x2, 4x4, 8x8).")
        if (out["exp"], out["zero_point"]) != (x["exp"], x["zero_point"]):
            raise QlabError(f"{node.name}: average pooling that changes the scale is not "
                            f"supported.")
        self.ops.append({"op": "avgpool", "name": node.name, "inputs": [src], "output": node.name,
                         "kernel": [kh, kw], "stride": [kh, kw], "shift": n.bit_length() - 1,
                         "out_zero_point": out["zero_point"], "clamp": self.clamp(out, False)})

    def flatten(self, node: fx.Node) -> None:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        if start != 1 or len(node.args) > 2 or "end_dim" in node.kwargs:
            raise QlabError(f"{node.name}: only flatten(x, 1) is supported.")
        src = self.src(node.args[0])
        self.add_tensor(node)
        self.ops.append({"op": "flatten", "name": node.name, "inputs": [src],
                         "output": node.name})

    def walk(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            mod = self.gm.get_submodule(node.target) if node.op == "call_module" else None
            fn = node.target
            if isinstance(mod, nnq.Quantize):
                self.quantize_input(node, mod)
            elif isinstance(mod, ALIASES):
                self.alias[node.name] = self.src(node.args[0])
            elif isinstance(mod, GEMMS):
                self.gemm(node, mod)
            elif isinstance(mod, nn.MaxPool2d):
                self.maxpool(node, vars(mod))
            elif fn is F.max_pool2d:
                self.maxpool(node, dict(zip(("kernel_size", "stride", "padding", "dilation",
                                             "ceil_mode"), node.args[1:])) | dict(node.kwargs))
            elif isinstance(mod, nn.AdaptiveAvgPool2d):
                self.avgpool(node, mod.output_size)
            elif fn is F.adaptive_avg_pool2d:
                self.avgpool(node, node.args[1])
            elif fn in (torch.ops.quantized.add, torch.ops.quantized.add_relu):
                self.add(node)
            elif fn is torch.flatten or (node.op == "call_method" and fn == "flatten"):
                self.flatten(node)
            elif isinstance(mod, nnq.DeQuantize):
                src = self.src(node.args[0])
                self.output = {"tensor": src, **{k: self.tensors[src][k] for k in
                                                 ("exp", "zero_point", "dtype", "shape")}}
            else:
                what = type(mod).__name__ if mod is not None else str(fn)
                raise QlabError(f"The integer export does not know {node.name!r} ({what}); it "
                                f"handles quantize, conv, linear, add(+relu), max/avg pooling, "
                                f"flatten and dequantize.")
        if self.output is None or not self.ops or self.ops[0]["op"] != "quantize_input":
            raise QlabError("The model must start with a QuantStub and end with a DeQuantStub.")


def to_integer(int8: nn.Module, *, mean: Sequence[float], std: Sequence[float], image_size: int,
               max_shift: int | None = None,
               four_bit: Sequence[str] = ()) -> tuple[dict, dict[str, np.ndarray]]:
    """The integer model of a converted po2 INT8 model: (model.json content, weights.npz arrays).

    `mean`/`std` are the normalization the float model was trained with: the input table maps
    each uint8 pixel of each channel through it and the input quantization. The ops named in
    `four_bit` hold 4-bit weights: stored packed, two per byte (format version 2)."""
    ex = _Exporter(int8, mean, std, image_size, max_shift, four_bit)
    ex.walk()
    missing = ex.four_bit - {op["name"] for op in ex.ops}
    if missing:
        raise QlabError(f"4-bit ops {', '.join(sorted(missing))} are not conv/linear ops of this "
                        f"INT8 model.")
    first = ex.tensors[ex.ops[0]["output"]]
    spec = {
        "format": FORMAT, "version": 2 if ex.four_bit else VERSION, "rounding": "half_even",
        "input": {"tensor": ex.ops[0]["output"], "shape": [len(mean), image_size, image_size],
                  "pixels": "uint8 0..255, NCHW, channels in training order (RGB)",
                  "lut": "input.lut", "mean": list(mean), "std": list(std),
                  "exp": first["exp"], "zero_point": first["zero_point"]},
        "output": ex.output,
        "tensors": ex.tensors,
        "ops": ex.ops,
    }
    return spec, ex.arrays


def write_integer(folder: Path, spec: dict, arrays: dict[str, np.ndarray],
                  extra: dict | None = None) -> dict:
    """weights.npz then model.json (with the weights' sha256), each atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    spec = spec | (extra or {}) | {"weights_file": "weights.npz",
                                   "weights_sha256": hashlib.sha256(data).hexdigest()}
    atomic_write(Path(folder) / "weights.npz", lambda tmp: tmp.write_bytes(data))
    text = json.dumps(spec, indent=1) + "\n"
    atomic_write(Path(folder) / "model.json", lambda tmp: tmp.write_text(text))
    return spec
