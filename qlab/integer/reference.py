"""The reference executor: runs model.json + weights.npz with integer arithmetic only.

After the input lookup table every value is an integer: uint8/int8 activations, int8 weights
(or 4-bit ones, stored two per byte and unpacked on load), int32 biases, accumulators held in
int64, requantization by an arithmetic shift with an explicit rounding rule, saturation to the
output range. Convolution and linear sums are carried in float32 (or float64) GEMMs only where
every partial sum is provably an exactly representable integer: for every output channel,
max|x - zp| * sum|w| over the summed inputs must stay below 2^24 (float32) or 2^53 (float64);
input channels are split into chunks until it does, each chunk's exact sum is converted to
int64, and the chunks are added in int64. Load checks this bound.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from qlab.errors import QlabError

FORMAT = "qlab-integer-model"
VERSION = 1          # what a model with 8-bit weights only is written as
VERSIONS = (1, 2)    # 2: some conv/linear has 4-bit weights (`weight_bits`: 4), packed
ROUNDINGS = ("half_even", "half_up", "half_away", "floor")
DTYPES = {"uint8": (torch.uint8, 0, 255), "int8": (torch.int8, -128, 127)}
GEMM_EXACT_BITS = {"float32": 24, "float64": 53}  # integers below 2^bits are exact
ZERO_POINT_ORDERS = ("after", "before")
OPS = ("quantize_input", "conv", "linear", "add", "maxpool", "avgpool", "flatten")
# the fields each op must have besides op, name, inputs, output (docs/integer.md#ops)
FIELDS = {
    "quantize_input": ("lut",),
    "conv": ("weight", "bias", "kernel", "stride", "padding", "dilation", "groups",
             "in_zero_point", "out_zero_point", "shift", "clamp"),
    "linear": ("weight", "bias", "in_zero_point", "out_zero_point", "shift", "clamp"),
    "add": ("in_zero_points", "align", "shift", "out_zero_point", "clamp"),
    "maxpool": ("kernel", "stride", "padding"),
    "avgpool": ("kernel", "stride", "shift", "out_zero_point", "clamp"),
    "flatten": (),
}
ARITY = {"quantize_input": 0, "add": 2}  # inputs per op; every other op reads one tensor
PAIRS = ("kernel", "stride", "padding", "dilation", "clamp", "in_zero_points", "align")
REMAKE = ("Re-create model.json and weights.npz together with `python quantize.py stage=integer "
          "name=NAME from=STAGE`.")


def shift_round_(v: Tensor, shift: Tensor | int, rounding: str = "half_even") -> Tensor:
    """v / 2^shift rounded to an integer by `rounding`, computed in place on an integer tensor v
    and returned. `shift` is an int or a per-channel tensor broadcast against v; a negative
    shift is an exact left shift. With h = 2^(shift-1) (all in integer arithmetic):

    half_even: (v + h - 1 + ((v >> shift) & 1)) >> shift   ties to the even neighbour (torch)
    half_up:   (v + h) >> shift                             ties toward +inf
    half_away: (v + h - (v < 0)) >> shift                   ties away from zero
    floor:     v >> shift                                   the plain arithmetic shift"""
    if rounding not in ROUNDINGS:
        raise QlabError(f"integer.rounding={rounding!r} is not known; use one of "
                        f"{', '.join(ROUNDINGS)}.")
    if isinstance(shift, int) and shift <= 0:
        return v.bitwise_left_shift_(-shift)
    k = torch.as_tensor(shift, dtype=v.dtype)
    if bool((k < 0).any()):
        v.bitwise_left_shift_((-k).clamp(min=0))
        k = k.clamp(min=0)
    if rounding != "floor":
        one = torch.ones((), dtype=v.dtype)
        half = torch.where(k > 0, one.bitwise_left_shift((k - 1).clamp(min=0)), 0)
        if rounding == "half_even":
            rounds = (k > 0).to(v.dtype)  # a zero shift has nothing to round
            odd = v.bitwise_right_shift(k).bitwise_and_(1).mul_(rounds)
            v.add_(half - rounds).add_(odd)
        elif rounding == "half_up":
            v.add_(half)
        else:  # a zero shift (a left shift above) has nothing to round: no tie correction
            negative = ((v < 0) & (k > 0)).to(v.dtype)
            v.add_(half).sub_(negative)
    return v.bitwise_right_shift_(k)


def check_avgpool_shift(op: dict) -> None:
    """An average pool is a shift only over a power-of-two window with shift = log2 of it."""
    (kh, kw), n = op["kernel"], op["kernel"][0] * op["kernel"][1]
    if n & (n - 1) or (1 << int(op["shift"])) != n:
        raise QlabError(f"op {op['name']!r}: an average over {kh}x{kw}={n} values is not a "
                        f"shift (the window must hold a power of two, and shift=log2 of it).")


def shift_round(v: Tensor, shift: Tensor | int, rounding: str = "half_even") -> Tensor:
    """shift_round_ on a copy (int64)."""
    return shift_round_(v.to(torch.int64, copy=True), shift, rounding)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """int8 values in -8..7, flattened (C order), two per byte: element 2i in the low nibble of
    byte i, element 2i+1 in the high one, each in two's complement; an odd count leaves the last
    high nibble 0."""
    flat = np.asarray(values).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise QlabError(f"4-bit weights must lie in -8..7; these reach {int(flat.min())}.."
                        f"{int(flat.max())}.")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """pack_int4 undone: int8 values in -8..7 of `shape`."""
    count = int(np.prod(shape))
    nibbles = np.empty(packed.size * 2, dtype=np.int16)
    nibbles[0::2], nibbles[1::2] = packed & 0xF, packed >> 4
    return (((nibbles[:count] ^ 8) - 8).astype(np.int8)).reshape(shape)


def _fail(path: Path, what: str) -> QlabError:
    return QlabError(f"{path}: {what}. Re-create it with `python quantize.py stage=integer "
                     f"name=NAME from=STAGE`.")


def _bad(what: str) -> QlabError:
    """model.json and weights.npz that do not make a model: what is wrong, then the fix."""
    return QlabError(f"{what}. {REMAKE}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field_problem(op: dict, key: str) -> str | None:
    """What is wrong with op[key] (None when it is fine): names, ints, pairs and shifts."""
    v = op[key]
    if key in ("weight", "bias", "lut"):
        return None if isinstance(v, str) and v else "must name an array of weights.npz"
    if key in PAIRS:
        if not (isinstance(v, list) and len(v) == 2 and all(map(_is_int, v))):
            return "must be a list of two integers"
        low = 0 if key in ("padding", "in_zero_points", "align") else 1
        if key != "clamp" and min(v) < low:
            return f"must be >= {low}"
        return "must be [low, high] with low <= high" if key == "clamp" and v[0] > v[1] else None
    if key == "shift" and op["op"] in ("conv", "linear") and isinstance(v, list):
        return None if v and all(map(_is_int, v)) else "must be an integer or a list of them"
    if not _is_int(v):
        return "must be an integer"
    return "must be >= 1" if key == "groups" and v < 1 else None


def _check_maxpool(op: dict) -> None:
    if tuple(op.get("dilation", (1, 1))) != (1, 1) or op.get("ceil_mode"):
        raise QlabError(f"op {op['name']!r}: maxpool with dilation or ceil_mode is not "
                        f"supported by this executor.")


def _spatial(size: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Gemm:
    """A conv/linear ready to run: float weights split into exact chunks of input channels."""

    chunks: list[tuple[int, int, Tensor]]  # (first, end) input channel, weight slice
    bias: Tensor                            # int64 [Cout]
    shift: Tensor                           # int64 [Cout] (broadcast shape)
    bound: int                              # the largest |sum| any chunk can reach
    acc_dtype: torch.dtype                  # int32 where acc + bias + rounding provably fit


@dataclass
class IntegerModel:
    """model.json + weights.npz, checked and ready to run (see `load`)."""

    spec: dict
    arrays: dict[str, np.ndarray]
    rounding: str = "half_even"
    gemm: str = "float32"
    zero_point: str | dict = "after"  # conv/linear: add the zero point after rounding or before
    acc_max: dict[str, int] = field(default_factory=dict)  # per op: largest |accumulator| seen
    _plans: dict[str, _Gemm] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path, *, rounding: str | None = None,
             gemm: str = "float32", zero_point: str | dict = "after") -> IntegerModel:
        """Read and check folder/model.json and the weights file it names."""
        folder = Path(folder)
        spec_path = folder / "model.json"
        try:
            spec = json.loads(spec_path.read_text())
        except FileNotFoundError:
            raise QlabError(f"{spec_path} does not exist; write it with `python quantize.py "
                            f"stage=integer name=NAME from=STAGE`.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _fail(spec_path, f"not valid JSON ({exc})") from None
        if not isinstance(spec, dict):
            raise _fail(spec_path, f"holds a JSON {type(spec).__name__}, not a {FORMAT} object")
        if spec.get("format") != FORMAT:
            raise _fail(spec_path, f"not a {FORMAT} file (its format field is "
                                   f"{spec.get('format')!r}, not {FORMAT!r})")
        if "version" not in spec:
            raise _fail(spec_path, f"has no format version (a {FORMAT} file says version "
                                   f"{VERSION})")
        if spec["version"] not in VERSIONS:
            raise _fail(spec_path, f"is format version {spec['version']!r}; this qlab reads "
                                   f"versions {', '.join(map(str, VERSIONS))}")
        name = spec.get("weights_file", "weights.npz")
        if not isinstance(name, str) or not name:
            raise _fail(spec_path, f"weights_file={name!r} names no file")
        weights = folder / name
        if not weights.is_file():
            raise _fail(weights, "does not exist")
        digest = file_sha256(weights)
        if spec.get("weights_sha256") not in (None, digest):
            raise _fail(weights, f"its sha256 {digest[:12]}... is not the "
                                 f"{spec['weights_sha256'][:12]}... model.json was written with: "
                                 f"the file was changed or is corrupted")
        try:
            with np.load(weights, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise _fail(weights, f"is not a readable .npz file ({exc})") from None
        return cls(spec, arrays, rounding=rounding or spec.get("rounding", "half_even"), gemm=gemm,
                   zero_point=zero_point)

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise QlabError(f"integer.rounding={self.rounding!r} is not known; use one of "
                            f"{', '.join(ROUNDINGS)}.")
        if isinstance(self.zero_point, str):
            self.zero_point = {"conv": self.zero_point, "linear": self.zero_point}
        bad = {k: v for k, v in self.zero_point.items() if v not in ZERO_POINT_ORDERS}
        if bad or set(self.zero_point) != {"conv", "linear"}:
            raise QlabError(f"integer.zero_point={self.zero_point!r}: use after (round, then add "
                            f"the zero point: fbgemm) or before (round after adding it: oneDNN), "
                            f"for conv and linear.")
        if self.gemm not in GEMM_EXACT_BITS:
            raise QlabError(f"integer.gemm={self.gemm!r}: use float32 or float64.")
        self.arrays = dict(self.arrays)  # 4-bit weights are unpacked into it, not the caller's
        self._check()

    # ---- checks -------------------------------------------------------------------------------

    def _array(self, op: dict, key: str, dtype: str, shape: tuple, dims: str) -> np.ndarray:
        """The array op[key] names, checked against the dtype and shape model.json implies."""
        name = op[key]
        if name not in self.arrays:
            raise _bad(f"weights.npz has no array {name!r} (the {key} of op {op['name']!r}): the "
                       f"file does not belong to this model.json or is damaged")
        a = self.arrays[name]
        if a.dtype != np.dtype(dtype):
            raise _bad(f"weights.npz array {name!r} (the {key} of op {op['name']!r}) has dtype "
                       f"{a.dtype}, not {dtype}: the files do not belong together or are damaged")
        if tuple(a.shape) != tuple(shape):
            raise _bad(f"weights.npz array {name!r} has shape {list(a.shape)}, but model.json "
                       f"makes the {key} of op {op['name']!r} {list(shape)} ({dims}): the files "
                       f"do not belong together or are damaged")
        return a

    def _weight(self, op: dict, shape: tuple, dims: str) -> np.ndarray:
        """The op's int8 weight; 4-bit weights (weight_bits: 4) are stored packed two per byte
        and unpacked here, once, or are already int8 values in -8..7 (a model built in memory)."""
        if op.get("weight_bits", 8) != 4:
            return self._array(op, "weight", "int8", shape, dims)
        name = op["weight"]
        a = self.arrays.get(name)
        if a is not None and a.dtype != np.int8:  # packed (from weights.npz)
            need = (int(np.prod(shape)) + 1) // 2
            if a.dtype != np.uint8 or a.shape != (need,):
                raise _bad(f"weights.npz array {name!r} (the 4-bit weight of op {op['name']!r}) "
                           f"is {a.dtype} {list(a.shape)}, not the uint8 [{need}] that packs "
                           f"{list(shape)} ({dims}) two per byte: the files do not belong "
                           f"together or are damaged")
            self.arrays[name] = unpack_int4(a, tuple(shape))
        a = self._array(op, "weight", "int8", shape, dims)
        if a.size and (int(a.min()) < -8 or int(a.max()) > 7):
            raise _bad(f"weights.npz array {name!r}: op {op['name']!r} has 4-bit weights, "
                       f"but its values reach {int(a.min())}..{int(a.max())}")
        return a

    def _check_op(self, i: int, op) -> None:
        """op i of model.json: a known op with every field it needs, of the right kind."""
        if not isinstance(op, dict):
            raise _bad(f"model.json op {i} is a {type(op).__name__}, not an object")
        kind = op.get("op")
        if kind not in OPS:
            raise _bad(f"model.json op {i} ({op.get('name')!r}) has op={kind!r}, which is not "
                       f"an op of the {FORMAT} format (it has {', '.join(OPS)}): the file was "
                       f"edited or written by another program")
        absent = [k for k in ("name", "inputs", "output", *FIELDS[kind]) if k not in op]
        if absent:
            raise _bad(f"model.json op {i} ({op.get('name')!r}, {kind}) has no "
                       f"{', '.join(absent)} field")
        if not isinstance(op["name"], str) or not isinstance(op["output"], str):
            raise _bad(f"model.json op {i}: name and output must be strings")
        n = ARITY.get(kind, 1)
        if not (isinstance(op["inputs"], list) and len(op["inputs"]) == n
                and all(isinstance(t, str) for t in op["inputs"])):
            raise _bad(f"model.json op {op['name']!r} ({kind}) must read {n} tensor(s) by name; "
                       f"its inputs are {op['inputs']!r}")
        if (kind == "quantize_input") != (i == 0):
            raise _bad(f"model.json op {i} ({op['name']!r}) is a {kind}: the first op, and only "
                       f"the first, must be quantize_input")
        for key in (*FIELDS[kind], *(["dilation"] if "dilation" in op else [])):
            problem = _field_problem(op, key)
            if problem:
                raise _bad(f"model.json op {op['name']!r} ({kind}): {key}={op[key]!r} {problem}")
        if kind == "maxpool":
            _check_maxpool(op)
        if "weight_bits" in op:
            bits = op["weight_bits"]
            if kind not in ("conv", "linear") or not _is_int(bits) or bits not in (4, 8):
                raise _bad(f"model.json op {op['name']!r} ({kind}): weight_bits={bits!r}; only "
                           f"a conv or linear has it, and it is 4 or 8")
            if bits == 4 and self.spec.get("version") == 1:
                raise _bad(f"model.json op {op['name']!r} has 4-bit weights, which format "
                           f"version 1 does not have (they need version 2)")

    def _tensor(self, name: str, op: dict) -> dict:
        """The `tensors` entry op writes: a uint8/int8 dtype, a shape, an exponent, a zero point."""
        t = self.spec["tensors"].get(name)
        if not isinstance(t, dict):
            raise _bad(f"model.json: tensor {name!r} (the output of op {op['name']!r}) is "
                       f"missing from `tensors`")
        shape = t.get("shape")
        if (str(t.get("dtype")) not in DTYPES or not isinstance(shape, list)
                or len(shape) not in (1, 3) or not all(_is_int(d) and d > 0 for d in shape)
                or not _is_int(t.get("exp")) or not _is_int(t.get("zero_point"))):
            raise _bad(f"model.json: tensor {name!r} needs a dtype (uint8 or int8), a shape "
                       f"([C, H, W] or [features]), an integer exp and zero_point; it has {t}")
        if "clamp" in op:
            (lo, hi), (_, dlo, dhi) = op["clamp"], DTYPES[t["dtype"]]
            if lo < dlo or hi > dhi:
                raise _bad(f"model.json op {op['name']!r}: clamp {op['clamp']} is outside the "
                           f"{t['dtype']} range of its output {name!r}")
        return t

    def _out_shape(self, op: dict, srcs: list[dict], out: dict) -> list[int] | None:
        """The output shape op computes from its inputs (None where nothing fixes it)."""
        kind, shapes = op["op"], [s["shape"] for s in srcs]
        if kind == "quantize_input":
            if len(out["shape"]) != 3:
                raise _bad(f"model.json: the input tensor {op['output']!r} is {out['shape']}, "
                           f"not [C, H, W]")
            given = self.spec.get("input", {})
            return list(given["shape"]) if isinstance(given, dict) and "shape" in given else None
        ranks = {"linear": 1, "add": len(shapes[0]), "flatten": 3}
        if any(len(s) != ranks.get(kind, 3) for s in shapes):
            raise _bad(f"model.json op {op['name']!r} ({kind}) reads a {shapes} tensor; it takes "
                       f"{'[features]' if kind == 'linear' else '[C, H, W]'}")
        if kind == "linear":
            return [out["shape"][0]]
        if kind == "add":
            if shapes[0] != shapes[1]:
                raise _bad(f"model.json op {op['name']!r} adds tensors of shapes {shapes[0]} and "
                           f"{shapes[1]}")
            return shapes[0]
        if kind == "flatten":
            return [int(np.prod(shapes[0]))]
        (c, h, w), (kh, kw), (sh, sw) = shapes[0], op["kernel"], op["stride"]
        (ph, pw), (dh, dw) = op.get("padding", [0, 0]), op.get("dilation", [1, 1])
        if kind == "conv":
            groups = op["groups"]
            if c % groups or len(out["shape"]) != 3 or out["shape"][0] % groups:
                raise _bad(f"model.json op {op['name']!r}: groups={groups} does not divide its "
                           f"{c} input and {out['shape'][0]} output channels")
            c = out["shape"][0]
        shape = [c, _spatial(h, kh, sh, ph, dh), _spatial(w, kw, sw, pw, dw)]
        if min(shape) < 1:
            raise _bad(f"model.json op {op['name']!r}: a {kh}x{kw} window does not fit its "
                       f"{h}x{w} input")
        return shape

    def _check(self) -> None:
        """Every op known and complete, fed by earlier ops, its output of the shape it computes;
        every array it names of the dtype and shape model.json implies."""
        tensors, ops = self.spec.get("tensors"), self.spec.get("ops")
        if not isinstance(tensors, dict) or not isinstance(ops, list) or not ops:
            raise _bad("model.json has no `tensors` object or no `ops` list")
        written: dict[str, str] = {}  # tensor -> the op that writes it
        for i, op in enumerate(ops):
            self._check_op(i, op)
            kind, name = op["op"], op["name"]
            dangling = [t for t in op["inputs"] if t not in written]
            if dangling:
                raise _bad(f"model.json op {name!r} ({kind}) reads {', '.join(map(repr, dangling))}"
                           f", which no earlier op writes: every input must be the output of an "
                           f"op above it")
            if op["output"] in written:
                raise _bad(f"model.json op {name!r} writes tensor {op['output']!r}, which op "
                           f"{written[op['output']]!r} already wrote")
            out = self._tensor(op["output"], op)
            srcs = [tensors[t] for t in op["inputs"]]
            want = self._out_shape(op, srcs, out)
            if want is not None and out["shape"] != want:
                raise _bad(f"model.json op {name!r} ({kind}) makes a {want} tensor from "
                           f"{[s['shape'] for s in srcs]}, but `tensors` says {op['output']!r} "
                           f"is {out['shape']}")
            if kind == "quantize_input":
                self._array(op, "lut", "uint8", (out["shape"][0], 256), "[channels, 256]")
            elif kind in ("conv", "linear"):
                self._plans[name] = self._plan(op, srcs[0], out)
            elif kind == "avgpool":
                check_avgpool_shift(op)
            written[op["output"]] = name
        output = self.spec.get("output")
        if not isinstance(output, dict) or not isinstance(output.get("tensor"), str) \
                or output["tensor"] not in written:
            raise _bad("model.json: `output.tensor` names no tensor an op writes")
        if not _is_int(output.get("exp")) or not _is_int(output.get("zero_point")):
            raise _bad("model.json: `output` needs an integer exp and zero_point")

    def _plan(self, op: dict, src: dict, out: dict) -> _Gemm:
        """Weights as float chunks whose every partial sum is provably exact (see module doc)."""
        cout, cin = out["shape"][0], src["shape"][0]
        if op["op"] == "conv":
            w = self._weight(op, (cout, cin // op["groups"], *op["kernel"]),
                             "[out channels, in channels / groups, kernel h, kernel w]")
        else:
            w = self._weight(op, (cout, cin), "[out features, in features]")
        bias = self._array(op, "bias", "int32", (cout,), "[out channels]")
        shift = np.asarray(op["shift"], dtype=np.int64).reshape(-1)
        if shift.size not in (1, cout):
            raise QlabError(f"model.json op {op['name']!r}: {shift.size} shifts for {cout} "
                            f"output channels (give one, or one per channel).")
        _, lo, hi = DTYPES[src["dtype"]]
        zp = int(op["in_zero_point"])
        xmax = max(abs(lo - zp), abs(hi - zp))
        limit = 2 ** GEMM_EXACT_BITS[self.gemm]
        absw = np.abs(w.astype(np.int64)).reshape(cout, w.shape[1], -1).sum(axis=2)  # [Cout, Cin]
        groups = int(op.get("groups", 1))
        if groups > 1:  # a grouped sum runs whole: no chunking across a group's channels
            cuts = [(0, w.shape[1])]
        else:
            cuts, first, run = [], 0, np.zeros(cout, dtype=np.int64)
            for c in range(w.shape[1]):
                if c > first and (run + absw[:, c]).max() * xmax >= limit:
                    cuts.append((first, c))
                    first, run = c, np.zeros(cout, dtype=np.int64)
                run += absw[:, c]
            cuts.append((first, w.shape[1]))
        bound = max(int(absw[:, a:b].sum(axis=1).max()) * xmax for a, b in cuts)
        if bound >= limit:
            raise QlabError(f"op {op['name']!r}: a partial sum can reach {bound} >= 2^"
                            f"{GEMM_EXACT_BITS[self.gemm]}, which {self.gemm} does not hold "
                            f"exactly; run with integer.gemm=float64.")
        fdtype = torch.float32 if self.gemm == "float32" else torch.float64
        wt = torch.from_numpy(w.astype(np.float32)).to(fdtype)
        per_ch = (-1, 1, 1) if op["op"] == "conv" else (-1,)
        # int32 accumulators where |sum over all inputs| + |bias| + the rounding and zero-point
        # terms (< 2^(shift+9)), times 2^|shift| for a left shift, cannot reach 2^31; else int64
        whole = (int(absw.sum(axis=1).max()) * xmax + int(np.abs(bias.astype(np.int64)).max(
            initial=0)) + 2 ** (max(int(shift.max()), 0) + 9)) << max(-int(shift.min()), 0)
        acc_dtype = torch.int32 if whole < 2**31 else torch.int64
        return _Gemm(chunks=[(a, b, wt[:, a:b].contiguous()) for a, b in cuts],
                     bias=torch.from_numpy(bias.astype(np.int64)).to(acc_dtype).view(per_ch),
                     shift=torch.from_numpy(shift).to(acc_dtype).view(
                         per_ch if shift.size > 1 else ()),
                     bound=bound, acc_dtype=acc_dtype)

    # ---- running ------------------------------------------------------------------------------

    def _requant(self, op: dict, acc: Tensor, shift: Tensor | int, *,
                 zp_first: bool = False) -> Tensor:
        """Saturate(round(acc / 2^shift) + zero point) into the output dtype; acc is consumed."""
        self._note(op, acc)
        lo, hi = op["clamp"]
        zp = int(op["out_zero_point"])
        after: Tensor | int = zp
        if zp_first:  # round(acc / 2^k + zp): oneDNN's order; differs only on ties with odd zp
            # a right shift (k > 0) takes zp * 2^k before rounding; a left shift (k <= 0) has
            # nothing to round, so zp is added to the shifted sum: acc * 2^|k| + zp
            k = torch.as_tensor(shift, dtype=acc.dtype)
            right = k > 0
            acc.add_(torch.where(right, torch.full_like(k, zp).bitwise_left_shift_(
                k.clamp(min=0)), 0))
            after = torch.where(right, 0, torch.full_like(k, zp))
        shift_round_(acc, shift, self.rounding)  # fbgemm's order and the ATen add/pool kernels'
        dtype = DTYPES[self.spec["tensors"][op["output"]]["dtype"]][0]
        return acc.add_(after).clamp_(int(lo), int(hi)).to(dtype)

    def _note(self, op: dict, acc: Tensor) -> None:
        if acc.numel():
            lo, hi = torch.aminmax(acc)
            seen = max(-int(lo), int(hi))
            self.acc_max[op["name"]] = max(self.acc_max.get(op["name"], 0), seen)

    def _gemm(self, op: dict, x: Tensor) -> Tensor:
        plan = self._plans[op["name"]]
        fdtype = plan.chunks[0][2].dtype
        xc = x.to(fdtype).sub_(int(op["in_zero_point"]))  # |x - zp| <= 255: exact
        acc = None
        for a, b, w in plan.chunks:
            part = xc[:, a:b] if len(plan.chunks) > 1 else xc
            if op["op"] == "conv":
                y = F.conv2d(part, w, None, op["stride"], op["padding"], op["dilation"],
                             op["groups"])
            else:
                y = part @ w.t()
            y = y.to(plan.acc_dtype)  # an integer below 2^24 (2^53): exact
            acc = y if acc is None else acc.add_(y)
        acc.add_(plan.bias)
        return self._requant(op, acc, plan.shift, zp_first=self.zero_point[op["op"]] == "before")

    def _add(self, op: dict, a: Tensor, b: Tensor) -> Tensor:
        (za, zb), (la, lb) = op["in_zero_points"], op["align"]
        # |a - za| << la plus |b - zb| << lb (each < 2^(8+align)), then left-shifted by -shift
        # when the output exponent is below the common one
        bits = 10 + max(int(la), int(lb), int(op["shift"]), 0) + max(-int(op["shift"]), 0)
        dtype = torch.int32 if bits < 31 else torch.int64
        acc = a.to(dtype).sub_(int(za)).bitwise_left_shift_(int(la))
        acc.add_(b.to(dtype).sub_(int(zb)).bitwise_left_shift_(int(lb)))
        return self._requant(op, acc, int(op["shift"]))

    def _maxpool(self, op: dict, x: Tensor) -> Tensor:
        (kh, kw), (sh, sw), (ph, pw) = op["kernel"], op["stride"], op["padding"]
        _check_maxpool(op)
        lo = DTYPES[self.spec["tensors"][op["output"]]["dtype"]][1]
        xp = F.pad(x.to(torch.int16), (pw, pw, ph, ph), value=lo)  # padding never wins the max
        return xp.unfold(2, kh, sh).unfold(3, kw, sw).amax(dim=(-2, -1)).to(x.dtype)

    def _avgpool(self, op: dict, x: Tensor) -> Tensor:
        (kh, kw), (sh, sw) = op["kernel"], op["stride"]
        check_avgpool_shift(op)
        zp = int(op["out_zero_point"])
        acc = x.to(torch.int32).unfold(2, kh, sh).unfold(3, kw, sw).sum(dim=(-2, -1),
                                                                         dtype=torch.int32)
        acc.sub_(kh * kw * zp)
        return self._requant(op, acc, int(op["shift"]))

    def quantize_input(self, pixels: Tensor) -> Tensor:
        """uint8 pixels [N, C, H, W] -> the quantized input, one table lookup per channel."""
        op = self.spec["ops"][0]
        lut = torch.from_numpy(self.arrays[op["lut"]].astype(np.int64))  # [C, 256]
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[1] != lut.shape[0]:
            raise QlabError(f"The integer model takes uint8 pixels [N, {lut.shape[0]}, H, W]; got "
                            f"{pixels.dtype} {list(pixels.shape)}.")
        idx = pixels.to(torch.int64) + 256 * torch.arange(lut.shape[0]).view(1, -1, 1, 1)
        dtype = DTYPES[self.spec["tensors"][op["output"]]["dtype"]][0]
        return lut.flatten()[idx].to(dtype)

    @torch.inference_mode()
    def run(self, pixels: Tensor, *, keep: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        """Integer output codes [N, classes] for uint8 pixels; with keep, every tensor by name."""
        env: dict[str, Tensor] = {}
        last_use = {t: i for i, op in enumerate(self.spec["ops"]) for t in op["inputs"]}
        out_name = self.spec["output"]["tensor"]
        for i, op in enumerate(self.spec["ops"]):
            args = [env[t] for t in op["inputs"]]
            kind = op["op"]
            if kind == "quantize_input":
                y = self.quantize_input(pixels)
            elif kind in ("conv", "linear"):
                y = self._gemm(op, args[0])
            elif kind == "add":
                y = self._add(op, *args)
            elif kind == "maxpool":
                y = self._maxpool(op, args[0])
            elif kind == "avgpool":
                y = self._avgpool(op, args[0])
            else:  # flatten
                y = args[0].reshape(args[0].shape[0], -1)
            env[op["output"]] = y
            if not keep:
                for t in op["inputs"]:
                    if last_use[t] == i and t != out_name:
                        env.pop(t, None)
        return env[out_name], env

    def dequantize(self, codes: Tensor) -> Tensor:
        """The output codes as float logits: (q - zero_point) * 2^exp (exact in float64)."""
        out = self.spec["output"]
        return (codes.to(torch.float64) - out["zero_point"]) * math.ldexp(1.0, out["exp"])

    def acc_bits(self) -> dict[str, int]:
        """Signed accumulator width each op needed so far: bits for the largest |acc|, plus sign."""
        return {k: int(v).bit_length() + 1 for k, v in self.acc_max.items()}
