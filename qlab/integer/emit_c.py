"""The integer model as portable C99: no float, no malloc, no libm, no division but shifts.

`emit_c(folder)` writes folder/c/ from model.json + weights.npz (or from a spec and arrays):

    qlab_model.h    int qlab_infer(const uint8_t *image, int32_t *logits); the image and output
                    layout as #defines
    qlab_model.c    every op of the model, the static activation arena, the ops in order
    qlab_weights.h  the weights (4-bit ones packed two per byte), biases, shifts and input
                    table as static const arrays
    main.c          qlab_run: raw N x H x W x 3 uint8 images (a file or stdin) -> one line of
                    comma-separated output codes per image
    Makefile        CC ?= cc, CFLAGS ?= -std=c99 -Wall -Wextra -Werror -O2; targets qlab_run and
                    qlab_model.o
    summary.json    files, weight and arena bytes, each layer's accumulator width

The C computes exactly what qlab.integer.reference.IntegerModel.run does, op for op: the same
rounding rule (spec["rounding"] or `rounding=`), the same zero-point order for conv and linear
(`zero_point=`: "after" rounding, fbgemm's and the reference's default, or "before", oneDNN's),
the same saturation. Activations are planar (C, H, W) as in the reference, so flatten is free.
Each conv and linear is its own function with every size and constant a literal; a conv keeps
the accumulators of 8 (or 4) output channels in registers, and its output pixels whose window
crosses the border sum over the taps inside only (padding is the zero point, a real 0, and adds
nothing). Sums use int32 accumulators where the reference's plan proves |acc + bias| plus the
rounding terms stays below 2^31 and int64 elsewhere; requantization always runs in int64. All
activations share one static arena: a tensor's bytes are reused once its last reader has run,
offsets assigned first-fit in execution order.
Arithmetic right shifts of negative numbers are written as ~(~v >> k) and left shifts as
multiplications by 2^k, so nothing depends on implementation-defined or undefined behaviour.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from qlab.errors import QlabError
from qlab.integer.reference import IntegerModel, check_avgpool_shift, pack_int4

log = logging.getLogger(__name__)

CFLAGS = "-std=c99 -Wall -Wextra -Werror -O2"
ALIGN = 16  # arena offsets: every tensor starts on a 16-byte boundary
CTYPES = {"uint8": "uint8_t", "int8": "int8_t"}
SHORT = {"uint8": "u8", "int8": "i8"}
LIMITS = {"uint8": (0, 255), "int8": (-128, 127)}
BLOCK = 8  # conv output channels computed together (accumulators in registers)


def find_cc() -> list[str] | None:
    """The C compiler command: $CC (may carry arguments, e.g. "ccache gcc"), else cc, else gcc."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        words = shlex.split(cc)
        return words if shutil.which(words[0]) else None
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None


def _ident(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def _inside(n_out: int, n_in: int, k: int, stride: int, pad: int, dil: int, name: str) -> dict:
    """The output rows (or columns) [lo, hi) whose whole window lies inside the input."""
    inside = [o for o in range(n_out) if o * stride - pad >= 0
              and o * stride - pad + (k - 1) * dil < n_in]
    lo, hi = (inside[0], inside[-1] + 1) if inside else (0, 0)
    return {f"{name}0": lo, f"{name}1": hi}


def _c_array(ctype: str, name: str, values: np.ndarray, per_line: int = 24) -> str:
    flat = [str(int(v)) for v in np.asarray(values).reshape(-1).tolist()]
    if ctype == "int32_t":  # -2^31 is not a C literal: write it as an expression
        flat = ["(-2147483647 - 1)" if v == "-2147483648" else v for v in flat]
    lines = [", ".join(flat[i:i + per_line]) for i in range(0, len(flat), per_line)]
    body = ",\n    ".join(lines)
    return f"static const {ctype} {name}[{len(flat)}] = {{\n    {body}\n}};\n"


# ---- C templates ------------------------------------------------------------------------------

_ASR = """\
/* floor(v / 2^k) for k >= 0: an arithmetic right shift that does not rely on >> of a negative
   number (implementation-defined in C); ~v = -v - 1 is exact for int64_t. */
static int64_t qlab_asr(int64_t v, int k)
{
    return v >= 0 ? v >> k : ~((~v) >> k);
}

/* v * 2^k for k >= 0 (a left shift of a negative number is undefined in C; the product is not,
   and the reference's bounds keep it inside int64) */
static int64_t qlab_lsl(int64_t v, int k)
{
    return v * ((int64_t)1 << k);
}
"""

_ROUND_BODY = {
    "half_even": "return qlab_asr(v + h - 1 + (qlab_asr(v, k) & 1), k);  /* ties to even */",
    "half_up": "return qlab_asr(v + h, k);  /* ties toward +inf */",
    "half_away": "return qlab_asr(v + h - (v < 0), k);  /* ties away from zero */",
    "floor": "(void)h;\n    return qlab_asr(v, k);  /* the plain arithmetic shift */",
}

_ROUND = """\
/* R(v, k): v / 2^k rounded {rounding}, all in integers (reference.shift_round_ with an int
   shift); k <= 0 is an exact left shift. */
static int64_t qlab_round(int64_t v, int k)
{{
    int64_t h;
    if (k <= 0)
        return qlab_lsl(v, -k);
    h = (int64_t)1 << (k - 1);
    {body}
}}
"""

_ROUND_GEMM = """\
static int64_t qlab_round_gemm(int64_t v, int k)
{
    return qlab_round(v, k);
}
"""

_REQUANT_GEMM = """\
/* conv/linear: sat(R(acc, k) + zp) (zero point after rounding: fbgemm, the reference's default)
   or, with zp_first, sat(R(acc + zp * 2^k, k)) for k > 0 (oneDNN's order) */
static int32_t qlab_requant_gemm(int64_t acc, int k, int32_t zp, int32_t lo, int32_t hi,
                                 int zp_first)
{
    int64_t after = zp;
    int64_t v;
    if (zp_first && k > 0) {
        acc += qlab_lsl(zp, k);
        after = 0;
    }
    v = qlab_round_gemm(acc, k) + after;
    return (int32_t)(v < lo ? lo : v > hi ? hi : v);
}
"""

_REQUANT = """\
/* add/avgpool: sat(R(acc, k) + zp) */
static int32_t qlab_requant(int64_t acc, int k, int32_t zp, int32_t lo, int32_t hi)
{
    int64_t v = qlab_round(acc, k) + zp;
    return (int32_t)(v < lo ? lo : v > hi ? hi : v);
}
"""

_CONV = """\
/* {name}: convolution {cin}x{h}x{w} -> {cout}x{oh}x{ow}, kernel {kh}x{kw}, stride {sh}x{sw},
   padding {ph}x{pw}, dilation {dh}x{dw}, {groups} group(s); {tin} in, {tout} out, {tacc}
   accumulators, {nb} output channel(s) at a time. acc = bias + sum (x - {in_zp}) * w over the
   window, then requantized. Padding is the zero point (a real 0): a padded tap adds nothing, so
   the output pixels whose window crosses the border (rows outside [{oy0}, {oy1}) or columns
   outside [{ox0}, {ox1})) sum over the taps inside only. Weights in blocks of {nb} output channels:
   [{cout} / {nb}][{cin_g}][{kh}][{kw}][{nb}]. */
static void {fn}(const {tin} *x, {tout} *y)
{{
    int g, ocb, oy, ox, ic, ky, kx;
    for (g = 0; g < {groups}; g++) {{
        const {tin} *xg = x + (long)g * {cin_g} * {h} * {w};
        for (ocb = 0; ocb < {cout_g}; ocb += {nb}) {{
            const int oc = g * {cout_g} + ocb;
            const int8_t *wb = {wptr};
            {tout} *yo = y + (long)oc * {oh} * {ow};
            for (oy = 0; oy < {oh}; oy++) {{
                const int iy0 = oy * {sh} - {ph};
                for (ox = 0; ox < {ow}; ox++) {{
                    const int ix0 = ox * {sw} - {pw};
                    {init}
                    if (oy >= {oy0} && oy < {oy1} && ox >= {ox0} && ox < {ox1}) {{
                        const {tin} *xo = xg + iy0 * {w} + ix0;
                        const int8_t *wr = wb;
                        for (ic = 0; ic < {cin_g}; ic++, xo += {h} * {w}) {{
                            for (ky = 0; ky < {kh}; ky++) {{
                                const {tin} *xr = xo + ky * {dh} * {w};
                                for (kx = 0; kx < {kw}; kx++, wr += {nb}) {{
                                    const {tacc} v = ({tacc})xr[kx * {dw}] - {in_zp};
                                    {mac}
                                }}
                            }}
                        }}
                    }} else {{
                        int ky0 = 0, ky1 = {kh}, kx0 = 0, kx1 = {kw};
                        while (ky0 < {kh} && iy0 + ky0 * {dh} < 0)
                            ky0++;
                        while (ky1 > ky0 && iy0 + (ky1 - 1) * {dh} >= {h})
                            ky1--;
                        while (kx0 < {kw} && ix0 + kx0 * {dw} < 0)
                            kx0++;
                        while (kx1 > kx0 && ix0 + (kx1 - 1) * {dw} >= {w})
                            kx1--;
                        for (ic = 0; ic < {cin_g}; ic++) {{
                            for (ky = ky0; ky < ky1; ky++) {{
                                const {tin} *xr = xg + ((long)ic * {h} + iy0 + ky * {dh}) * {w}
                                                  + ix0;
                                const int8_t *wr = wb + ((ic * {kh} + ky) * {kw} + kx0) * {nb};
                                for (kx = kx0; kx < kx1; kx++, wr += {nb}) {{
                                    const {tacc} v = ({tacc})xr[kx * {dw}] - {in_zp};
                                    {mac}
                                }}
                            }}
                        }}
                    }}
                    {store}
                }}
            }}
        }}
    }}
}}
"""

_UNPACK4 = """\
/* 4-bit weights, two per byte (element 2i in the low nibble of byte i, two's complement): n of
   them from element `first` into dst, as int8 (the static scratch buffer). */
static const int8_t *qlab_unpack4(int8_t *dst, const uint8_t *src, long first, long n)
{
    long i;
    for (i = 0; i < n; i++) {
        const long e = first + i;
        const int v = (src[e >> 1] >> ((e & 1) * 4)) & 15;
        dst[i] = (int8_t)((v ^ 8) - 8);
    }
    return dst;
}
"""

_LINEAR = """\
/* {name}: linear {n_in} -> {n_out}, {tin} in, {tout} out, {tacc} accumulators:
   acc = bias + sum (x - {in_zp}) * w, requantized */
static void {fn}(const {tin} *x, {tout} *y)
{{
    int o, i;
    for (o = 0; o < {n_out}; o++) {{
        const int8_t *wo = {wptr};
        {tacc} acc = {bias}[o];
        for (i = 0; i < {n_in}; i++)
            acc += (({tacc})x[i] - {in_zp}) * wo[i];
        y[o] = ({tout})qlab_requant_gemm((int64_t)acc, {shift}, {out_zp}, {lo}, {hi}, {zp_first});
    }}
}}
"""

_ADD = """\
/* add, {ta} + {tb} -> {tout}: acc = (a - za) * 2^la + (b - zb) * 2^lb, then sat(R(acc, k) + zp) */
static void qlab_add_{suffix}(const {ta} *a, const {tb} *b, {tout} *y, int n, int32_t za,
                              int32_t zb, int la, int lb, int k, int32_t zp, int32_t lo,
                              int32_t hi)
{{
    int i;
    for (i = 0; i < n; i++) {{
        const int64_t acc = qlab_lsl((int64_t)a[i] - za, la) + qlab_lsl((int64_t)b[i] - zb, lb);
        y[i] = ({tout})qlab_requant(acc, k, zp, lo, hi);
    }}
}}
"""

_MAXPOOL = """\
/* max pooling, {t}: padding holds the type's lowest value and never wins */
static void qlab_maxpool_{suffix}(const {t} *x, {t} *y, int c, int h, int w, int oh, int ow,
                                  int kh, int kw, int sh, int sw, int ph, int pw)
{{
    int ch, oy, ox, ky, kx;
    for (ch = 0; ch < c; ch++) {{
        const {t} *xc = x + (long)ch * h * w;
        for (oy = 0; oy < oh; oy++) {{
            for (ox = 0; ox < ow; ox++) {{
                {t} m = {lowest};
                for (ky = 0; ky < kh; ky++) {{
                    const int iy = oy * sh - ph + ky;
                    if (iy < 0 || iy >= h)
                        continue;
                    for (kx = 0; kx < kw; kx++) {{
                        const int ix = ox * sw - pw + kx;
                        if (ix >= 0 && ix < w && xc[iy * w + ix] > m)
                            m = xc[iy * w + ix];
                    }}
                }}
                *y++ = m;
            }}
        }}
    }}
}}
"""

_AVGPOOL = """\
/* average pooling, {t}: acc = sum (x - zp) over a kh x kw window (2^k values), sat(R(acc, k) + zp) */
static void qlab_avgpool_{suffix}(const {t} *x, {t} *y, int c, int h, int w, int oh, int ow,
                                  int kh, int kw, int sh, int sw, int k, int32_t zp, int32_t lo,
                                  int32_t hi)
{{
    int ch, oy, ox, ky, kx;
    for (ch = 0; ch < c; ch++) {{
        const {t} *xc = x + (long)ch * h * w;
        for (oy = 0; oy < oh; oy++) {{
            for (ox = 0; ox < ow; ox++) {{
                int32_t acc = 0;
                for (ky = 0; ky < kh; ky++)
                    for (kx = 0; kx < kw; kx++)
                        acc += xc[(oy * sh + ky) * w + ox * sw + kx];
                acc -= kh * kw * zp;
                *y++ = ({t})qlab_requant(acc, k, zp, lo, hi);
            }}
        }}
    }}
}}
"""

_QUANTIZE_INPUT = """\
/* the input: HWC RGB bytes -> planar codes through one table per channel (normalization and
   input quantization in one lookup) */
static void qlab_quantize_input(const uint8_t *image, {t} *q)
{{
    int c, i;
    for (c = 0; c < QLAB_IMAGE_C; c++)
        for (i = 0; i < QLAB_IMAGE_H * QLAB_IMAGE_W; i++)
            q[c * QLAB_IMAGE_H * QLAB_IMAGE_W + i] = ({t})qlab_input_lut[c][image[i * QLAB_IMAGE_C + c]];
}}
"""

_MAIN = """\
/* qlab_run: raw images in, one line of comma-separated output codes per image out.

   usage: qlab_run [FILE]     (no FILE or "-": standard input)
   input: N images of QLAB_IMAGE_H x QLAB_IMAGE_W x QLAB_IMAGE_C bytes each (HWC, RGB), back to
   back; output: QLAB_NUM_CLASSES integers per line, the model's output codes (see
   qlab_model.h for how to turn them into logits). Generated by qlab.integer.emit_c. */
#include <stdio.h>
#include <string.h>

#include "qlab_model.h"

static uint8_t image[QLAB_IMAGE_BYTES];

int main(int argc, char **argv)
{
    FILE *in = stdin;
    int32_t logits[QLAB_NUM_CLASSES];
    long n = 0;
    size_t got;
    int i;
    if (argc > 2) {
        fprintf(stderr, "usage: %s [FILE]  (raw N x %d x %d x %d uint8 images; - or none: stdin)\\n",
                argv[0], QLAB_IMAGE_H, QLAB_IMAGE_W, QLAB_IMAGE_C);
        return 2;
    }
    if (argc == 2 && strcmp(argv[1], "-") != 0) {
        in = fopen(argv[1], "rb");
        if (in == NULL) {
            perror(argv[1]);
            return 2;
        }
    }
    while ((got = fread(image, 1, sizeof image, in)) > 0) {
        if (got != sizeof image) {
            fprintf(stderr, "qlab_run: image %ld has %lu of %d bytes\\n", n, (unsigned long)got,
                    QLAB_IMAGE_BYTES);
            return 1;
        }
        if (qlab_infer(image, logits) != 0) {
            fprintf(stderr, "qlab_run: qlab_infer failed on image %ld\\n", n);
            return 1;
        }
        for (i = 0; i < QLAB_NUM_CLASSES; i++)
            printf(i ? ",%ld" : "%ld", (long)logits[i]);
        putchar('\\n');
        n++;
    }
    if (ferror(in)) {
        perror("qlab_run: read");
        return 1;
    }
    return 0;
}
"""

_MAKEFILE = """\
# Generated by qlab.integer.emit_c. `make` builds qlab_run; `make qlab_model.o` the model alone.
CC ?= cc
CFLAGS ?= {cflags}

qlab_run: main.c qlab_model.c qlab_model.h qlab_weights.h
\t$(CC) $(CFLAGS) -o $@ main.c qlab_model.c $(LDFLAGS)

qlab_model.o: qlab_model.c qlab_model.h qlab_weights.h
\t$(CC) $(CFLAGS) -c -o $@ qlab_model.c

clean:
\trm -f qlab_run qlab_model.o

.PHONY: clean
"""


# ---- the emitter ------------------------------------------------------------------------------

class _Emitter:
    def __init__(self, ref: IntegerModel) -> None:
        self.ref, self.spec, self.arrays = ref, ref.spec, ref.arrays
        self.tensors = self.spec["tensors"]
        self.ops = self.spec["ops"]
        self.helpers: dict[str, str] = {}   # name -> C text, emitted once, in first-use order
        self.weights: list[str] = []
        self.weight_bytes = 0
        self.scratch_bytes = 0  # 4-bit weights: the largest block unpacked at a time
        self.params: list[str] = []
        self.calls: list[str] = []
        self.layers: list[dict] = []

    # buffers ------------------------------------------------------------------------------

    def plan_arena(self) -> None:
        """Each tensor a buffer (flatten's output shares its input's); a buffer lives from the op
        that writes it to its last reader (the output to the end); first-fit offsets."""
        self.buf: dict[str, str] = {}
        for op in self.ops:
            self.buf[op["output"]] = (self.buf[op["inputs"][0]] if op["op"] == "flatten"
                                      else op["output"])
        n = len(self.ops)
        start, end = {}, {}
        for i, op in enumerate(self.ops):
            b = self.buf[op["output"]]
            start.setdefault(b, i)
            end[b] = max(end.get(b, i), i)
            for t in op["inputs"]:
                end[self.buf[t]] = max(end[self.buf[t]], i)
        end[self.buf[self.spec["output"]["tensor"]]] = n
        size = {b: int(np.prod(self.tensors[b]["shape"])) for b in start}
        self.activation_bytes = sum(size.values())
        placed: list[tuple[int, int, int, int]] = []  # offset, size, start, end
        self.offset: dict[str, int] = {}
        for b in sorted(start, key=lambda b: (start[b], b)):
            live = sorted((o, s) for o, s, a, e in placed if a <= end[b] and start[b] <= e)
            off = 0
            for o, s in live:
                if off + size[b] <= o:
                    break
                off = max(off, -(-(o + s) // ALIGN) * ALIGN)
            placed.append((off, size[b], start[b], end[b]))
            self.offset[b] = off
        self.arena_bytes = max((o + s for o, s, _, _ in placed), default=0)

    def ptr(self, tensor: str, const: bool = False, dtype: str | None = None) -> str:
        ctype = CTYPES[dtype or self.tensors[tensor]["dtype"]]
        offset = self.offset[self.buf.get(tensor, tensor)]
        return f"({'const ' if const else ''}{ctype} *)(qlab_arena + {offset})"

    # helpers ------------------------------------------------------------------------------

    def need(self, name: str, text: str) -> None:
        self.helpers.setdefault(name, text)

    def need_rounding(self, gemm: bool) -> None:
        rounding = self.ref.rounding
        self.need("asr", _ASR)
        self.need("round", _ROUND.format(rounding=rounding.replace("_", " "),
                                         body=_ROUND_BODY[rounding]))
        if gemm:
            self.need("round_gemm", _ROUND_GEMM)
            self.need("requant_gemm", _REQUANT_GEMM)
        else:
            self.need("requant", _REQUANT)

    def array(self, ctype: str, name: str, values: np.ndarray) -> str:
        self.weights.append(_c_array(ctype, name, values))
        self.weight_bytes += int(np.asarray(values).size) * {"int8_t": 1, "uint8_t": 1,
                                                              "int32_t": 4}[ctype]
        return name

    # ops ----------------------------------------------------------------------------------

    def emit(self) -> None:
        self.plan_arena()
        for i, op in enumerate(self.ops):
            if "clamp" in op:  # C converts in-range values only (out of range is not portable)
                lo, hi = (int(v) for v in op["clamp"])
                tlo, thi = LIMITS[self.tensors[op["output"]]["dtype"]]
                if not tlo <= lo <= hi <= thi:
                    raise QlabError(f"op {op['name']!r}: clamp [{lo}, {hi}] is outside "
                                    f"{self.tensors[op['output']]['dtype']}.")
            if op["op"] == "add" and min(int(v) for v in op["align"]) < 0:
                raise QlabError(f"op {op['name']!r}: a negative align shift {op['align']}.")
            if self.worst_case(op) >= 2**62:
                raise QlabError(f"op {op['name']!r}: its shifts could carry a value past 2^62; "
                                f"the C requantizes in int64 (re-quantize with a smaller "
                                f"quant.max_shift).")
            getattr(self, f"op_{op['op']}")(i, op)

    def worst_case(self, op: dict) -> int:
        """The largest magnitude requantization can meet (sum, bias, rounding and zero-point
        terms, after a left shift), as the reference's plan bounds it: C's int64 must hold it."""
        kind = op["op"]
        if kind in ("conv", "linear"):
            w = np.abs(self.arrays[op["weight"]].astype(np.int64))
            lo, hi = LIMITS[self.tensors[op["inputs"][0]]["dtype"]]
            zp = int(op["in_zero_point"])
            xmax = max(abs(lo - zp), abs(hi - zp))
            bias = int(np.abs(self.arrays[op["bias"]].astype(np.int64)).max(initial=0))
            total = int(w.reshape(w.shape[0], -1).sum(axis=1).max()) * xmax + bias
            shifts = [int(v) for v in np.asarray(op["shift"]).reshape(-1)]
        elif kind == "add":
            total = sum(255 << int(a) for a in op["align"])
            shifts = [int(op["shift"])]
        elif kind == "avgpool":
            total = 255 << int(op["shift"])
            shifts = [int(op["shift"])]
        else:
            return 0
        return (total + (1 << (max(max(shifts), 0) + 9))) << max(-min(shifts), 0)

    def op_quantize_input(self, i: int, op: dict) -> None:
        out = self.tensors[op["output"]]
        if out["shape"] != list(self.spec["input"]["shape"]):
            raise QlabError(f"model.json: the input table writes {out['shape']}, the input is "
                            f"{self.spec['input']['shape']}.")
        if out["dtype"] != "uint8":
            raise QlabError("model.json: the input table must write uint8 codes.")
        lut = self.arrays[op["lut"]]
        rows = ",\n    ".join("{" + ", ".join(str(int(v)) for v in row) + "}" for row in lut)
        self.weights.append(f"static const uint8_t qlab_input_lut[{lut.shape[0]}][256] = {{\n"
                            f"    {rows}\n}};\n")
        self.weight_bytes += lut.size
        self.need("quantize_input", _QUANTIZE_INPUT.format(t=CTYPES[out["dtype"]]))
        self.calls.append(f"qlab_quantize_input(image, {self.ptr(op['output'])});")

    def _gemm(self, i: int, op: dict, weight: np.ndarray, template: str, index: str,
              first: str, count: int, **fields) -> str:
        """A conv/linear as its own function, every size and constant a literal. Its weights
        for one step of the loop (a block of output channels, or one output) are the `count`
        values from offset `first` (a C expression) of `weight` flattened."""
        plan = self.ref._plans[op["name"]]
        tacc = "int32_t" if plan.acc_dtype == torch.int32 else "int64_t"
        x, y = self.tensors[op["inputs"][0]], self.tensors[op["output"]]
        fn = f"qlab_{op['op']}{i}_{_ident(op['name'])}"
        shift = np.asarray(op["shift"], dtype=np.int64).reshape(-1)
        if shift.size > 1:
            shift_expr = f"{self.array('int32_t', f'{fn}_shift', shift)}[{index}]"
        else:
            shift_expr = str(int(shift[0]))
        nb = fields.get("nb", 1)
        shifts = {f"shift_{j}": shift_expr.replace("{j}", str(j)) for j in range(nb)}
        lo, hi = (int(v) for v in op["clamp"])
        self.need_rounding(gemm=True)
        if op.get("weight_bits", 8) == 4:  # packed in flash, a block at a time into the scratch
            name = self.array("uint8_t", f"{fn}_weight4", pack_int4(weight))
            self.scratch_bytes = max(self.scratch_bytes, count)
            self.need("unpack4", _UNPACK4)
            fields["wptr"] = f"qlab_unpack4(qlab_scratch, {name}, {first}, {count})"
        else:
            name = self.array("int8_t", f"{fn}_weight", weight)
            fields["wptr"] = f"{name} + {first}"
        self.need(fn, template.format(
            name=_ident(op["name"]), fn=fn, tin=CTYPES[x["dtype"]], tout=CTYPES[y["dtype"]],
            tacc=tacc, weight=name,
            bias=self.array("int32_t", f"{fn}_bias", self.arrays[op["bias"]]), shift=shift_expr,
            in_zp=int(op["in_zero_point"]), out_zp=int(op["out_zero_point"]), lo=lo, hi=hi,
            zp_first=int(self.ref.zero_point[op["op"]] == "before"), **shifts, **fields))
        self.layers.append({"op": op["name"], "kind": op["op"], "accumulator": tacc[:-2],
                            "weight_bits": int(op.get("weight_bits", 8))})
        return fn

    def op_conv(self, i: int, op: dict) -> None:
        x, y = self.tensors[op["inputs"][0]], self.tensors[op["output"]]
        cin, h, w = x["shape"]
        cout, oh, ow = y["shape"]
        groups = int(op["groups"])
        kh, kw = op["kernel"]
        wt = self.arrays[op["weight"]]
        if cin % groups or cout % groups or tuple(wt.shape) != (cout, cin // groups, kh, kw):
            raise QlabError(f"op {op['name']!r}: weight {list(wt.shape)} does not fit {cin} -> "
                            f"{cout} channels in {groups} groups with a {kh}x{kw} kernel.")
        nb = next(b for b in (BLOCK, 4, 1) if (cout // groups) % b == 0)
        # blocks of nb output channels, the channel innermost: [cout / nb][cin_g][kh][kw][nb]
        blocked = wt.reshape(cout // nb, nb, cin // groups, kh, kw).transpose(0, 2, 3, 4, 1)
        (sh, sw), (ph, pw), (dh, dw) = op["stride"], op["padding"], op["dilation"]
        tout = CTYPES[y["dtype"]]
        sep = "\n" + " " * 20
        init = sep.join(f"{{tacc}} a{j} = {{bias}}[oc + {j}];" for j in range(nb))
        mac = (sep + " " * 16).join(f"a{j} += v * wr[{j}];" for j in range(nb))
        store = sep.join(f"yo[{j * oh * ow} + oy * {ow} + ox] = ({tout})qlab_requant_gemm("
                         f"(int64_t)a{j}, {{shift_{j}}}, {{out_zp}}, {{lo}}, {{hi}}, "
                         f"{{zp_first}});" for j in range(nb))
        template = _CONV.replace("{init}", init).replace("{mac}", mac).replace("{store}", store)
        per = (cin // groups) * kh * kw  # weights per output channel; a block has nb of them
        fn = self._gemm(i, op, blocked, template, "oc + {j}", f"(long)oc * {per}", per * nb,
                        cin=cin, h=h, w=w, cout=cout, oh=oh, ow=ow, kh=kh, kw=kw, sh=sh, sw=sw,
                        ph=ph, pw=pw, dh=dh, dw=dw, groups=groups, cin_g=cin // groups,
                        cout_g=cout // groups, nb=nb,
                        **_inside(oh, h, kh, sh, ph, dh, "oy"), **_inside(ow, w, kw, sw, pw, dw, "ox"))
        src = self.ptr(op["inputs"][0], True)
        self.calls.append(f"{fn}({src}, {self.ptr(op['output'])});")

    def op_linear(self, i: int, op: dict) -> None:
        x, y = self.tensors[op["inputs"][0]], self.tensors[op["output"]]
        n_in, n_out = int(np.prod(x["shape"])), int(np.prod(y["shape"]))
        if tuple(self.arrays[op["weight"]].shape) != (n_out, n_in):
            raise QlabError(f"op {op['name']!r}: weight {list(self.arrays[op['weight']].shape)} "
                            f"is not [{n_out}, {n_in}].")
        fn = self._gemm(i, op, self.arrays[op["weight"]], _LINEAR, "o",
                        f"(long)o * {n_in}", n_in, n_in=n_in, n_out=n_out)
        self.calls.append(f"{fn}({self.ptr(op['inputs'][0], True)}, {self.ptr(op['output'])});")

    def op_add(self, i: int, op: dict) -> None:
        a, b = (self.tensors[t] for t in op["inputs"])
        y = self.tensors[op["output"]]
        n = int(np.prod(y["shape"]))
        if int(np.prod(a["shape"])) != n or int(np.prod(b["shape"])) != n:
            raise QlabError(f"op {op['name']!r}: adds {a['shape']} and {b['shape']} into "
                            f"{y['shape']}; the integer model adds equal shapes only.")
        self.need_rounding(gemm=False)
        suffix = f"{SHORT[a['dtype']]}_{SHORT[b['dtype']]}_{SHORT[y['dtype']]}"
        self.need(f"add_{suffix}", _ADD.format(suffix=suffix, ta=CTYPES[a["dtype"]],
                                               tb=CTYPES[b["dtype"]], tout=CTYPES[y["dtype"]]))
        (za, zb), (la, lb) = op["in_zero_points"], op["align"]
        lo, hi = op["clamp"]
        self.calls.append(
            f"qlab_add_{suffix}({self.ptr(op['inputs'][0], True)}, "
            f"{self.ptr(op['inputs'][1], True)}, {self.ptr(op['output'])}, {n}, {int(za)}, "
            f"{int(zb)}, {int(la)}, {int(lb)}, {int(op['shift'])}, {int(op['out_zero_point'])}, "
            f"{int(lo)}, {int(hi)});  /* {_ident(op['name'])} */")

    def op_maxpool(self, i: int, op: dict) -> None:
        if tuple(op.get("dilation", (1, 1))) != (1, 1) or op.get("ceil_mode"):
            raise QlabError(f"op {op['name']!r}: maxpool with dilation or ceil_mode is not "
                            f"supported (neither by the reference).")
        x, y = self.tensors[op["inputs"][0]], self.tensors[op["output"]]
        if x["dtype"] != y["dtype"]:
            raise QlabError(f"op {op['name']!r}: max pooling from {x['dtype']} to {y['dtype']}.")
        t = CTYPES[y["dtype"]]
        suffix = SHORT[y["dtype"]]
        lowest = "0" if y["dtype"] == "uint8" else "(-128)"
        self.need(f"maxpool_{suffix}", _MAXPOOL.format(suffix=suffix, t=t, lowest=lowest))
        (c, h, w), (_, oh, ow) = x["shape"], y["shape"]
        (kh, kw), (sh, sw), (ph, pw) = op["kernel"], op["stride"], op["padding"]
        self.calls.append(f"qlab_maxpool_{suffix}({self.ptr(op['inputs'][0], True)}, "
                          f"{self.ptr(op['output'])}, {c}, {h}, {w}, {oh}, {ow}, {kh}, {kw}, "
                          f"{sh}, {sw}, {ph}, {pw});  /* {_ident(op['name'])} */")

    def op_avgpool(self, i: int, op: dict) -> None:
        (kh, kw), (sh, sw) = op["kernel"], op["stride"]
        check_avgpool_shift(op)
        x, y = self.tensors[op["inputs"][0]], self.tensors[op["output"]]
        if x["dtype"] != y["dtype"]:
            raise QlabError(f"op {op['name']!r}: average pooling from {x['dtype']} to "
                            f"{y['dtype']}.")
        self.need_rounding(gemm=False)
        suffix = SHORT[y["dtype"]]
        self.need(f"avgpool_{suffix}", _AVGPOOL.format(suffix=suffix, t=CTYPES[y["dtype"]]))
        (c, h, w), (_, oh, ow) = x["shape"], y["shape"]
        lo, hi = op["clamp"]
        self.calls.append(
            f"qlab_avgpool_{suffix}({self.ptr(op['inputs'][0], True)}, {self.ptr(op['output'])}, "
            f"{c}, {h}, {w}, {oh}, {ow}, {kh}, {kw}, {sh}, {sw}, {int(op['shift'])}, "
            f"{int(op['out_zero_point'])}, {int(lo)}, {int(hi)});  /* {_ident(op['name'])} */")

    def op_flatten(self, i: int, op: dict) -> None:
        self.calls.append(f"/* {_ident(op['name'])}: flatten, the same planar buffer */")

    # files --------------------------------------------------------------------------------

    def header(self) -> str:
        c, h, w = self.spec["input"]["shape"]
        out = self.spec["output"]
        classes = int(np.prod(self.tensors[out["tensor"]]["shape"]))
        guard = "QLAB_MODEL_H"
        return f"""\
/* The integer-only model as C99: generated by qlab.integer.emit_c from model.json ({self.name}).
   No floating point, no malloc, no libm; every rescaling is a shift.

   int qlab_infer(const uint8_t *image, int32_t *logits);

   image:  QLAB_IMAGE_H x QLAB_IMAGE_W x QLAB_IMAGE_C bytes, row-major HWC with the channels
           interleaved (R, G, B for each pixel), 0..255: the order a camera or a decoded image
           file gives them. The normalization the model was trained with is in the input table.
   logits: QLAB_NUM_CLASSES int32 values, the raw integer codes of the output tensor
           ({out['dtype']}), exactly what qlab.integer.reference.IntegerModel.run returns. The
           real-valued logit i is (logits[i] - QLAB_OUT_ZERO_POINT) * 2^QLAB_OUT_EXP; the
           predicted class is the largest code (the scale is positive, so no conversion is
           needed for the arg-max).
   returns 0 on success, -1 if a pointer is NULL.

   Not reentrant: the activations live in one static arena of QLAB_ARENA_BYTES bytes (a
   tensor's bytes are reused once its last reader has run), and 4-bit weights are unpacked a
   block of output channels at a time into a static scratch of QLAB_SCRATCH_BYTES bytes (0: no
   4-bit weights); call it from one thread at a time. Nothing else is allocated; the stack
   holds a few scalars. */
#ifndef {guard}
#define {guard}

#include <stdint.h>

#define QLAB_IMAGE_H {h}
#define QLAB_IMAGE_W {w}
#define QLAB_IMAGE_C {c}
#define QLAB_IMAGE_BYTES ({h} * {w} * {c})
#define QLAB_NUM_CLASSES {classes}
#define QLAB_OUT_ZERO_POINT {int(out['zero_point'])}
#define QLAB_OUT_EXP {int(out['exp'])}
#define QLAB_ARENA_BYTES {self.arena_bytes}
#define QLAB_SCRATCH_BYTES {self.scratch_bytes}
#define QLAB_WEIGHT_BYTES {self.weight_bytes}

#ifdef __cplusplus
extern "C" {{
#endif

int qlab_infer(const uint8_t *image, int32_t *logits);

#ifdef __cplusplus
}}
#endif

#endif /* {guard} */
"""

    def source(self) -> str:
        out_tensor = self.spec["output"]["tensor"]
        arena = max(self.arena_bytes, 1)
        body = "\n    ".join(self.calls)
        order = ", ".join(f"{k}: zero point {v} rounding" for k, v in self.ref.zero_point.items())
        scratch = ("/* 4-bit weights: one block of output channels unpacked at a time */\n"
                   f"static int8_t qlab_scratch[{self.scratch_bytes}];\n"
                   if self.scratch_bytes else "")
        return f"""\
/* The integer-only model ({self.name}) in C99: generated by qlab.integer.emit_c; do not edit.
   Rounding: {self.ref.rounding}; {order}. Activations planar (C, H, W).
   Bit-exact with qlab.integer.reference.IntegerModel.run (tests/test_emit_c.py). */
#include <stddef.h>
#include <stdint.h>

#include "qlab_model.h"
#include "qlab_weights.h"

/* activations: every tensor at a fixed offset, reused after its last reader (summary.json) */
static uint8_t qlab_arena[{arena}];
{scratch}{"".join(self.params)}
{chr(10).join(self.helpers.values())}
int qlab_infer(const uint8_t *image, int32_t *logits)
{{
    const {CTYPES[self.tensors[out_tensor]['dtype']]} *out;
    int i;
    if (image == NULL || logits == NULL)
        return -1;
    {body}
    out = {self.ptr(out_tensor, True)};
    for (i = 0; i < QLAB_NUM_CLASSES; i++)
        logits[i] = out[i];
    return 0;
}}
"""



def emit_c(folder: Path, spec: dict | None = None, arrays: dict[str, np.ndarray] | None = None,
           *, rounding: str | None = None, zero_point: str | dict = "after") -> Path:
    """Write folder/c/ (see the module doc) for model.json + weights.npz in `folder`, or for
    `spec` and `arrays` (as to_integer returns them). `rounding` defaults to spec["rounding"];
    `zero_point` is the conv/linear order ("after", "before" or a dict per kind, as
    IntegerModel takes). The model is checked by IntegerModel first. Returns the c/ folder."""
    folder = Path(folder)
    if spec is None:
        ref = IntegerModel.load(folder, rounding=rounding, zero_point=zero_point)
    else:
        ref = IntegerModel(spec, dict(arrays or {}), rounding=rounding or spec.get("rounding",
                                                                                   "half_even"),
                           zero_point=zero_point)
    em = _Emitter(ref)
    em.name = str((ref.spec.get("source") or {}).get("run", folder.name))
    em.name = _ident(em.name)
    em.emit()
    files = {
        "qlab_weights.h": ("/* The model's integer weights: generated by qlab.integer.emit_c. "
                           "*/\n#include <stdint.h>\n\n" + "\n".join(em.weights)),
        "qlab_model.c": em.source(),
        "qlab_model.h": em.header(),
        "main.c": _MAIN,
        "Makefile": _MAKEFILE.format(cflags=CFLAGS),
    }
    cdir = folder / "c"
    cdir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (cdir / name).write_text(text)
    summary = {"files": sorted([*files, "summary.json"]), "entry": "qlab_infer",
               "rounding": ref.rounding, "zero_point": ref.zero_point,
               "weight_bytes": em.weight_bytes, "arena_bytes": em.arena_bytes,
               "scratch_bytes": em.scratch_bytes,
               "activation_bytes_without_reuse": em.activation_bytes,
               "layers": em.layers,
               "build": f"make -C {cdir}  (or: cc {CFLAGS} -o qlab_run main.c qlab_model.c)"}
    (cdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return cdir


# ---- building and running ---------------------------------------------------------------------

def build_c(cdir: Path, *, cflags: str = CFLAGS, cc: list[str] | None = None,
            output: str = "qlab_run") -> Path:
    """Compile main.c + qlab_model.c into cdir/output (without make); a clear error if it fails."""
    cc = cc or find_cc()
    if cc is None:
        raise QlabError("No C compiler found ($CC, cc, gcc, clang): build the C sources elsewhere "
                        f"with `make -C {cdir}`.")
    cmd = [*cc, *shlex.split(cflags), "-o", output, "main.c", "qlab_model.c"]
    proc = subprocess.run(cmd, cwd=cdir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise QlabError(f"Building the C model failed ({' '.join(cmd)} in {cdir}):\n"
                        f"{proc.stderr[-4000:]}")
    return Path(cdir) / output


ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv"}


def elf_machine(path: Path) -> str:
    """The instruction set an ELF file is built for (its e_machine), e.g. x86_64 or aarch64."""
    data = Path(path).read_bytes()[:20]
    if data[:4] != b"\x7fELF":
        raise QlabError(f"{path} is not an ELF file.")
    code = struct.unpack("<H" if data[5] == 1 else ">H", data[18:20])[0]
    return ELF_MACHINES.get(code, f"e_machine {code}")


def elf_section_sizes(obj: Path) -> dict[str, int]:
    """Section name -> size in bytes of an ELF object file (32/64-bit, either byte order)."""
    data = Path(obj).read_bytes()
    if data[:4] != b"\x7fELF":
        raise QlabError(f"{obj} is not an ELF object file.")
    is64, end = data[4] == 2, "<" if data[5] == 1 else ">"
    if is64:
        (shoff,) = struct.unpack(end + "Q", data[0x28:0x30])
        shentsize, shnum, shstrndx = struct.unpack(end + "HHH", data[0x3A:0x40])
        fields = end + "IIQQQQ"
    else:
        (shoff,) = struct.unpack(end + "I", data[0x20:0x24])
        shentsize, shnum, shstrndx = struct.unpack(end + "HHH", data[0x2E:0x34])
        fields = end + "IIIIII"
    width = struct.calcsize(fields)
    headers = [struct.unpack(fields, data[shoff + i * shentsize:shoff + i * shentsize + width])
               for i in range(shnum)]
    names = headers[shstrndx][4]  # the section-name string table's file offset

    def name(i: int) -> str:
        return data[names + i:data.index(b"\0", names + i)].decode()
    return {name(h[0]): h[5] for h in headers}


def code_bytes(cdir: Path, *, cflags: str = CFLAGS, cc: list[str] | None = None) -> int | None:
    """The machine code of qlab_model.c (its .text sections, weights excluded), compiled alone
    with `cflags`; None without a compiler or for a non-ELF toolchain."""
    cc = cc or find_cc()
    if cc is None:
        return None
    cmd = [*cc, *shlex.split(cflags), "-c", "-o", "qlab_model.o", "qlab_model.c"]
    if subprocess.run(cmd, cwd=cdir, capture_output=True).returncode != 0:
        return None
    try:
        sizes = elf_section_sizes(Path(cdir) / "qlab_model.o")
    except QlabError:
        return None
    finally:
        (Path(cdir) / "qlab_model.o").unlink(missing_ok=True)
    return sum(v for k, v in sizes.items() if k == ".text" or k.startswith(".text."))


def run_c(binary: Path, pixels: torch.Tensor | np.ndarray, *, timeout: float = 600,
          runner: Sequence[str] = ()) -> np.ndarray:
    """The output codes [N, classes] of a qlab_run build for uint8 pixels [N, C, H, W] (the
    reference's layout; sent to the program as HWC bytes). `runner` goes before the binary:
    an emulator such as ["qemu-aarch64"] for a cross-compiled one."""
    x = np.asarray(pixels.numpy() if isinstance(pixels, torch.Tensor) else pixels)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise QlabError(f"run_c takes uint8 pixels [N, C, H, W]; got {x.dtype} {list(x.shape)}.")
    data = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).tobytes()
    proc = subprocess.run([*runner, str(binary)], input=data, capture_output=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise QlabError(f"{binary} failed ({proc.returncode}): "
                        f"{proc.stderr.decode(errors='replace')[-2000:]}")
    lines = proc.stdout.decode().split()
    return np.array([[int(v) for v in line.split(",")] for line in lines],
                    dtype=np.int64).reshape(len(lines), -1)


def check_c(folder: Path, ref: IntegerModel, loader, *, emit: str = "c",
            limit: int = 200) -> dict:
    """stage=integer with integer.emit=c: write folder/c/, and where a C compiler exists build
    it and compare its output codes with the reference's on the first `limit` images of
    `loader`. Returns verify.json's "c" block."""
    if emit != "c":
        raise QlabError(f"integer.emit={emit!r}: use null (no sources) or c (portable C).")
    # a copy: the check does not add to the accumulator ranges verify.json reports
    ref = IntegerModel(ref.spec, ref.arrays, rounding=ref.rounding, gemm=ref.gemm,
                       zero_point=dict(ref.zero_point))
    cdir = emit_c(folder, ref.spec, ref.arrays, rounding=ref.rounding,
                  zero_point=dict(ref.zero_point))
    summary = json.loads((cdir / "summary.json").read_text())
    block = {"folder": str(cdir), **{k: summary[k] for k in ("files", "weight_bytes",
                                                             "arena_bytes")}}
    cc = find_cc()
    if cc is None:
        log.warning("integer.emit=c: the C sources are written to %s, but no C compiler was found "
                    "here ($CC, cc, gcc, clang), so they were not built or checked. Build them "
                    "where one exists: `make -C %s` (or `cc %s -o qlab_run main.c qlab_model.c`), "
                    "then `./qlab_run images.raw` (N x H x W x 3 uint8).", cdir, cdir, CFLAGS)
        return block | {"built": False, "compiler": None}
    binary = build_c(cdir, cc=cc)
    pixels, got = [], 0
    for batch, _ in loader:
        pixels.append(batch[: limit - got])
        got += len(pixels[-1])
        if got >= limit:
            break
    pixels = torch.cat(pixels)
    t0 = time.perf_counter()
    mine = run_c(binary, pixels)
    seconds = time.perf_counter() - t0
    theirs = ref.run(pixels)[0].reshape(len(pixels), -1).numpy().astype(np.int64)
    same = float((mine == theirs).all(axis=1).mean())
    log.info("integer.emit=c: %s built with %s; its output equals the reference's on %.4f of %d "
             "images (%.1f ms per image)", cdir, " ".join(cc), same, len(pixels),
             1e3 * seconds / len(pixels))
    if same != 1.0:
        log.warning("integer.emit=c: the C build differs from the reference on %d of %d images.",
                    round((1 - same) * len(pixels)), len(pixels))
    code = code_bytes(cdir, cc=cc)
    return block | {"built": True, "compiler": " ".join(cc), "cflags": CFLAGS,
                    "images": len(pixels), "identical_fraction": same, "seconds": seconds,
                    "ms_per_image": 1e3 * seconds / len(pixels), "code_bytes": code,
                    "flash_bytes": None if code is None else summary["weight_bytes"] + code,
                    "ram_bytes": summary["arena_bytes"] + summary.get("scratch_bytes", 0)}
