"""The reference executor: runs model.json + weights.npz with integer arithmetic only.

After the input lookup table every value is an integer: uint8/int8 activations, int8 weights,
int32 biases, accumulators held in int64, requantization by an arithmetic shift with an explicit
rounding rule, saturation to the output range. Convolution and linear sums are carried in float32
(or float64) GEMMs only where every partial sum is provably an exactly representable integer:
for every output channel, max|x - zp| * sum|w| over the summed inputs must stay below 2^24
(float32) or 2^53 (float64); input channels are split into chunks until it does, each chunk's
exact sum is converted to int64, and the chunks are added in int64. Load checks this bound.
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
VERSION = 1
ROUNDINGS = ("half_even", "half_up", "half_away", "floor")
DTYPES = {"uint8": (torch.uint8, 0, 255), "int8": (torch.int8, -128, 127)}
GEMM_EXACT_BITS = {"float32": 24, "float64": 53}  # integers below 2^bits are exact
ZERO_POINT_ORDERS = ("after", "before")
OPS = ("quantize_input", "conv", "linear", "add", "maxpool", "avgpool", "flatten")


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


def _fail(path: Path, what: str) -> QlabError:
    return QlabError(f"{path}: {what}. Re-create it with `python quantize.py stage=integer "
                     f"name=NAME from=STAGE`.")


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
        except json.JSONDecodeError as exc:
            raise _fail(spec_path, f"not valid JSON ({exc})") from None
        if spec.get("format") != FORMAT or spec.get("version") != VERSION:
            raise _fail(spec_path, f"not a {FORMAT} version {VERSION} file (format="
                                   f"{spec.get('format')!r}, version={spec.get('version')!r})")
        weights = folder / spec.get("weights_file", "weights.npz")
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
        self._check()

    # ---- checks -------------------------------------------------------------------------------

    def _array(self, op: dict, key: str, dtype: str, shape: tuple | None) -> np.ndarray:
        name = op.get(key)
        if name not in self.arrays:
            raise QlabError(f"weights.npz has no array {name!r} (op {op['name']!r} needs it): the "
                            f"file does not belong to this model.json or is damaged. Re-create "
                            f"both with `python quantize.py stage=integer`.")
        a = self.arrays[name]
        if a.dtype != np.dtype(dtype) or (shape is not None and tuple(a.shape) != tuple(shape)):
            raise QlabError(f"weights.npz array {name!r} is {a.dtype}{list(a.shape)}, model.json "
                            f"says {dtype}{list(shape) if shape else ''}: the files do not belong "
                            f"together or are damaged. Re-create them with stage=integer.")
        return a

    def _check(self) -> None:
        tensors = self.spec.get("tensors", {})
        known = set()
        for op in self.spec.get("ops", []):
            kind = op.get("op")
            if kind not in OPS:
                raise QlabError(f"model.json op {op.get('name')!r} has op={kind!r}; this executor "
                                f"runs {', '.join(OPS)}.")
            missing = [t for t in op["inputs"] if t not in known]
            if missing:
                raise QlabError(f"model.json op {op['name']!r} reads {missing}, which no earlier "
                                f"op writes.")
            out = tensors.get(op["output"])
            if out is None or out.get("dtype") not in DTYPES:
                raise QlabError(f"model.json: tensor {op['output']!r} is missing from `tensors` "
                                f"or has no uint8/int8 dtype.")
            if kind == "quantize_input":
                self._array(op, "lut", "uint8", (out["shape"][0], 256))
            if kind in ("conv", "linear"):
                self._plans[op["name"]] = self._plan(op, tensors[op["inputs"][0]], out)
            known.add(op["output"])
        if self.spec.get("output", {}).get("tensor") not in known:
            raise QlabError("model.json: `output.tensor` is not written by any op.")

    def _plan(self, op: dict, src: dict, out: dict) -> _Gemm:
        """Weights as float chunks whose every partial sum is provably exact (see module doc)."""
        cout = out["shape"][0]
        w = self._array(op, "weight", "int8", None)
        if w.shape[0] != cout:
            raise QlabError(f"weights.npz {op['weight']!r} has {w.shape[0]} output channels, "
                            f"model.json says {cout}.")
        bias = self._array(op, "bias", "int32", (cout,))
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
        if tuple(op.get("dilation", (1, 1))) != (1, 1) or op.get("ceil_mode"):
            raise QlabError(f"op {op['name']!r}: maxpool with dilation or ceil_mode is not "
                            f"supported by this executor.")
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
