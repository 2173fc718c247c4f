"""The integer-only model: rounding rules, hand-computed ops, bit-exactness against torch, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.ao.quantization import convert, prepare

from qlab.errors import QlabError
from qlab.hardware import quantized_engine
from qlab.integer.bias import bias_grid
from qlab.integer.export import snap_biases, to_integer, write_integer
from qlab.integer.reference import IntegerModel, shift_round
from qlab.integer.verify import zero_point_order
from qlab.models import (
    Normalize,
    build_mobilenet_v2,
    build_resnet20,
    build_resnet50,
    randomize_batchnorm,
)
from qlab.quant.qconfig import build_qconfig

from conftest import AVX2_ONLY, ROOT, X86

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


# ---- rounding ------------------------------------------------------------------------------

TIES = torch.tensor([-7, -6, -5, -3, -2, -1, 0, 1, 2, 3, 5, 6, 7])  # / 2: every odd one is a tie


@pytest.mark.parametrize("rounding, expected", [
    # -3.5 -3 -2.5 -1.5 -1 -0.5 0 0.5 1 1.5 2.5 3 3.5
    ("half_even", [-4, -3, -2, -2, -1, 0, 0, 0, 1, 2, 2, 3, 4]),
    ("half_up", [-3, -3, -2, -1, -1, 0, 0, 1, 1, 2, 3, 3, 4]),
    ("half_away", [-4, -3, -3, -2, -1, -1, 0, 1, 1, 2, 3, 3, 4]),
    ("floor", [-4, -3, -3, -2, -1, -1, 0, 0, 1, 1, 2, 3, 3]),
])
def test_each_rounding_rule_on_ties(rounding, expected):
    assert shift_round(TIES, 1, rounding).tolist() == expected


def test_shift_round_matches_exact_rational_rounding():
    v = torch.randint(-(2**20), 2**20, (20000,))
    for k in (1, 3, 7, 12):
        exact = v.double() / 2**k  # exact in float64
        assert torch.equal(shift_round(v, k, "half_even"), torch.round(exact).long())  # numpy rule
        assert torch.equal(shift_round(v, k, "floor"), torch.floor(exact).long())
        assert torch.equal(shift_round(v, k, "half_up"), torch.floor(exact + 0.5).long())
        away = torch.sign(exact) * torch.floor(exact.abs() + 0.5)
        assert torch.equal(shift_round(v, k, "half_away"), away.long())
    # per-channel shifts, a zero shift (no rounding) and a negative one (exact left shift)
    v = torch.tensor([[5, 5, 5, 5]])
    assert shift_round(v, torch.tensor([2, 1, 0, -2]), "half_even").tolist() == [[1, 2, 5, 20]]
    for rounding in ("half_even", "half_up", "half_away", "floor"):  # a zero shift: nothing to round
        assert shift_round(-v, torch.tensor([0, 0, 0, -1]), rounding).tolist() == [[-5, -5, -5, -10]]
    with pytest.raises(QlabError, match="integer.rounding='nearest'"):
        shift_round(v, 1, "nearest")


# ---- hand-built models ---------------------------------------------------------------------

def _tensor(shape, exp, zp=0, dtype="uint8"):
    return {"shape": shape, "dtype": dtype, "exp": exp, "zero_point": zp}


def _model(tmp_path, tensors, ops, arrays, output):
    lut = np.tile(np.arange(256, dtype=np.uint8), (tensors["x"]["shape"][0], 1))  # q = pixel
    spec = {"format": "qlab-integer-model", "version": 1, "rounding": "half_even",
            "tensors": tensors, "output": {"tensor": output, **tensors[output]},
            "ops": [{"op": "quantize_input", "name": "x", "inputs": [], "output": "x",
                     "lut": "input.lut"}, *ops]}
    write_integer(tmp_path, spec, {"input.lut": lut, **arrays})
    return tmp_path


def test_a_3x3_conv_by_hand(tmp_path):
    # one input channel, 4x4 pixels 0..15, zero point 3; two filters; padding 1
    w = np.array([[[[1, 0, -1], [2, 0, -2], [1, 0, -1]]],
                  [[[0, 0, 0], [0, 1, 0], [0, 0, 0]]]], dtype=np.int8)
    ops = [{"op": "conv", "name": "c", "inputs": ["x"], "output": "y", "weight": "c.weight",
            "bias": "c.bias", "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1],
            "dilation": [1, 1], "groups": 1, "in_zero_point": 3, "out_zero_point": 10,
            "shift": 2, "relu": False, "clamp": [0, 255]}]
    tensors = {"x": _tensor([1, 4, 4], 0, 3), "y": _tensor([2, 4, 4], 2, 10)}
    d = _model(tmp_path, tensors, ops, {"c.weight": w, "c.bias": np.array([5, -2], np.int32)}, "y")
    pixels = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    codes, _ = IntegerModel.load(d).run(pixels)
    # by hand: centre pixel (1,1) of filter 0: x - 3 over its 3x3 window
    x = pixels[0, 0].long() - 3
    sobel = (x[0, 0] + 2 * x[1, 0] + x[2, 0]) - (x[0, 2] + 2 * x[1, 2] + x[2, 2])  # -8
    assert sobel == -8
    assert codes[0, 0, 1, 1] == 10 + round((-8 + 5) / 4)  # -0.75 -> -1 -> 9
    # filter 1 is the identity: (x - 3 - 2) / 4, half to even, + 10
    expected = [10 + int(np.rint((p - 3 - 2) / 4)) for p in range(16)]
    assert codes[0, 1].flatten().tolist() == expected
    # a corner: padding is the zero point (a real 0), so only the 2x2 inside counts
    corner = -2 * x[0, 1] - x[1, 1] + 5  # 4 - 2 + 5 = 7: row -1 and column -1 are padding
    assert corner == 7 and codes[0, 0, 0, 0] == 10 + 2  # 7 / 4 = 1.75


@pytest.mark.parametrize("order", ["after", "before"])
def test_a_left_shift_adds_the_zero_point_after_shifting_in_either_order(tmp_path, order):
    """Output exponent below the accumulator's: requantization is acc * 2^|shift| + zp, exact in
    both zero-point orders (nothing to round); a sum that a left shift carries past 2^31 is
    computed in int64, not wrapped."""
    w = np.array([[[[1]]], [[[127]]]], dtype=np.int8)
    ops = [{"op": "conv", "name": "c", "inputs": ["x"], "output": "y", "weight": "c.weight",
            "bias": "c.bias", "kernel": [1, 1], "stride": [1, 1], "padding": [0, 0],
            "dilation": [1, 1], "groups": 1, "in_zero_point": 0, "out_zero_point": 10,
            "shift": [-2, -17], "relu": False, "clamp": [0, 255]}]
    tensors = {"x": _tensor([1, 1, 4], 0), "y": _tensor([2, 1, 4], -2, 10)}
    d = _model(tmp_path, tensors, ops, {"c.weight": w, "c.bias": np.zeros(2, np.int32)}, "y")
    pixels = torch.tensor([0, 1, 30, 255], dtype=torch.uint8).view(1, 1, 1, 4)
    codes, _ = IntegerModel.load(d, zero_point=order).run(pixels)
    assert codes[0, 0, 0].tolist() == [10, 14, 130, 255]  # 4x + 10, saturated at 255
    assert codes[0, 1, 0].tolist() == [10, 255, 255, 255]  # 127 * 255 << 17 > 2^31: still 255


def test_add_of_two_scales_and_relu(tmp_path):
    # a = q * 2^-2, b = q * 2^-3 -> common exponent -3; output 2^-2: one right shift
    tensors = {"x": _tensor([2, 1, 1], -3), "a": _tensor([1, 1, 1], -2),
               "b": _tensor([1, 1, 1], -3), "y": _tensor([1, 1, 1], -2, 0)}
    w1 = np.array([[[[1]], [[0]]]], dtype=np.int8)
    w2 = np.array([[[[0]], [[1]]]], dtype=np.int8)
    conv = {"op": "conv", "kernel": [1, 1], "stride": [1, 1], "padding": [0, 0],
            "dilation": [1, 1], "groups": 1, "in_zero_point": 0, "relu": False}
    ops = [conv | {"name": "pa", "inputs": ["x"], "output": "a", "weight": "pa.w", "bias": "pa.b",
                   "out_zero_point": 0, "shift": 1, "clamp": [0, 255]},
           conv | {"name": "pb", "inputs": ["x"], "output": "b", "weight": "pb.w", "bias": "pb.b",
                   "out_zero_point": 0, "shift": 0, "clamp": [0, 255]},
           {"op": "add", "name": "s", "inputs": ["a", "b"], "output": "y",
            "in_zero_points": [0, 0], "align": [1, 0], "shift": 1, "out_zero_point": 0,
            "relu": True, "clamp": [0, 255]}]
    arrays = {"pa.w": w1, "pa.b": np.zeros(1, np.int32), "pb.w": w2, "pb.b": np.zeros(1, np.int32)}
    d = _model(tmp_path, tensors, ops, arrays, "y")
    pixels = torch.tensor([[[[8]], [[3]]]], dtype=torch.uint8)  # a: 8/2 = 4 (1.0); b: 3 (0.375)
    for rounding, want in (("half_even", 6), ("floor", 5), ("half_up", 6)):
        codes, env = IntegerModel.load(d, rounding=rounding).run(pixels, keep=True)
        assert env["a"].item() == 4 and env["b"].item() == 3
        assert codes.item() == want  # (4 << 1) + 3 = 11, / 2 = 5.5 (1.375 / 0.25)


def test_average_pool_is_a_shift_and_other_windows_are_refused(tmp_path):
    tensors = {"x": _tensor([1, 2, 2], 0), "y": _tensor([1, 1, 1], 0)}
    pool = {"op": "avgpool", "name": "p", "inputs": ["x"], "output": "y", "kernel": [2, 2],
            "stride": [2, 2], "shift": 2, "out_zero_point": 0, "clamp": [0, 255]}
    d = _model(tmp_path, tensors, [pool], {}, "y")
    for values, want in (([1, 2, 3, 4], 2), ([1, 2, 3, 8], 4), ([0, 0, 1, 1], 0), ([0, 1, 1, 1], 1)):
        pixels = torch.tensor(values, dtype=torch.uint8).view(1, 1, 2, 2)  # 2.5, 3.5, 0.5, 0.75
        assert IntegerModel.load(d).run(pixels)[0].item() == want
    tensors = {"x": _tensor([1, 3, 3], 0), "y": _tensor([1, 1, 1], 0)}
    bad = _model(tmp_path / "b", tensors, [pool | {"kernel": [3, 3], "stride": [3, 3]}], {}, "y")
    with pytest.raises(QlabError, match="3x3=9 values is not a shift"):
        IntegerModel.load(bad).run(torch.zeros(1, 1, 3, 3, dtype=torch.uint8))


def test_float32_sums_stay_exact_at_the_bound_by_splitting_channels(tmp_path):
    # 1024 input channels of |x - zp| = 255 times w = 127: 33 M > 2^24, so float32 alone could
    # round; the executor splits the channels into exact chunks and adds them in integers
    cin = 1024
    w = np.full((2, cin, 1, 1), 127, dtype=np.int8)
    w[1] = -128
    ops = [{"op": "conv", "name": "c", "inputs": ["x"], "output": "y", "weight": "c.w",
            "bias": "c.b", "kernel": [1, 1], "stride": [1, 1], "padding": [0, 0],
            "dilation": [1, 1], "groups": 1, "in_zero_point": 0, "out_zero_point": 128,
            "shift": 18, "relu": False, "clamp": [0, 255]}]
    tensors = {"x": _tensor([cin, 1, 1], 0), "y": _tensor([2, 1, 1], 18, 128)}
    d = _model(tmp_path, tensors, ops, {"c.w": w, "c.b": np.array([1, 1], np.int32)}, "y")
    pixels = torch.full((1, cin, 1, 1), 255, dtype=torch.uint8)
    pixels[0, ::7] = 254
    ref = IntegerModel.load(d)
    assert len(ref._plans["c"].chunks) > 1 and ref._plans["c"].bound < 2**24
    codes, _ = ref.run(pixels)
    acc = (pixels.flatten().long() * torch.from_numpy(w[:, :, 0, 0]).long()).sum(1) + 1
    assert ref.acc_max["c"] == int(acc.abs().max())
    assert codes.flatten().tolist() == (torch.round(acc.double() / 2**18).long() + 128).tolist()
    assert IntegerModel.load(d, gemm="float64")._plans["c"].chunks.__len__() == 1


# ---- exported from torch -------------------------------------------------------------------

def _int8(build, *, per_channel=False, engine="fbgemm", kind="po2", seed=0, even_zero_point=True):
    """A po2 PTQ model with random (but BN-realistic) weights, calibrated on random images,
    converted on `engine` (a test that runs it sets that engine for its body: use_engine)."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(build(num_classes=10).eval())
    model.fuse_model(is_qat=False)
    model.qconfig = build_qconfig(kind=kind, backend=engine, per_channel=per_channel,
                                  even_zero_point=even_zero_point)
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(model, inplace=True)
        model(_normalized(_pixels(32, seed=seed + 1)))
        return convert(model)


def _pixels(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _normalized(pixels):
    return Normalize(MEAN, STD)(pixels.float().div(255.0))


def _export(int8, tmp_path, **load):
    spec, arrays = to_integer(int8, mean=MEAN, std=STD, image_size=32, max_shift=8)
    write_integer(tmp_path, spec, arrays)
    return IntegerModel.load(tmp_path, **load)


def test_the_bias_grid_is_s_in_times_s_w_with_ties_to_even():
    """The one rounding the eager and PT2E flows and the QDQ ONNX rewrite snap biases with."""
    bias = torch.tensor([0.75, 0.25, -0.25, 1.25, -0.375])  # float32, every value exact
    codes, step = bias_grid(bias, 0.5, torch.tensor([1.0, 1.0, 0.5, 0.5, 0.25]))  # per channel
    assert step.dtype == codes.dtype == torch.float64
    assert step.tolist() == [0.5, 0.5, 0.25, 0.25, 0.125]
    assert codes.tolist() == [2.0, 0.0, -1.0, 5.0, -3.0]  # 1.5 -> 2 and 0.5 -> 0: ties to even
    codes, step = bias_grid(bias, torch.tensor(0.25, dtype=torch.float64), 2.0)  # per tensor
    assert step.shape == bias.shape and set(step.tolist()) == {0.5}
    assert codes.tolist() == [2.0, 0.0, -0.0, 2.0, -1.0]  # 2.5 -> 2, -0.75 -> -1
    assert torch.equal(codes * step, torch.tensor([1.0, 0.0, 0.0, 1.0, -0.5], dtype=torch.float64))


@pytest.mark.parametrize("build, per_channel", [
    (build_resnet50, False), (build_resnet50, True), (build_resnet20, False),
    (build_mobilenet_v2, False), (build_mobilenet_v2, True),
])
def test_bit_exact_against_torch(tmp_path, build, per_channel, use_engine):
    use_engine("fbgemm")
    int8 = _int8(build, per_channel=per_channel)
    assert snap_biases(int8, torch.zeros(1, 3, 32, 32)) > 0
    ref = _export(int8, tmp_path)
    pixels = _pixels(48, seed=7)
    codes, _ = ref.run(pixels)
    with torch.inference_mode():
        theirs = int8(_normalized(pixels)).double()
    assert torch.equal(ref.dequantize(codes), theirs)
    assert snap_biases(int8, torch.zeros(1, 3, 32, 32)) == 0  # already on the grid
    spec = json.loads((tmp_path / "model.json").read_text())
    kinds = {op["op"] for op in spec["ops"]}
    assert {"quantize_input", "conv", "add", "avgpool", "flatten", "linear"} <= kinds
    assert all(isinstance(op["shift"], list) == per_channel
               for op in spec["ops"] if op["op"] == "conv" and op["name"] != "conv1")


def test_biases_off_the_grid_show_where_torch_differs(tmp_path, use_engine):
    from qlab.integer.verify import first_mismatch

    use_engine("fbgemm")
    int8 = _int8(build_resnet20)  # not snapped: fbgemm adds b / (s_in s_w) unrounded
    ref = _export(int8, tmp_path)
    pixels = _pixels(16, seed=3)
    spec = json.loads((tmp_path / "model.json").read_text())
    assert not all(op["bias_on_grid"] for op in spec["ops"] if op["op"] == "conv")
    found = first_mismatch(ref, int8, pixels, _normalized(pixels))
    assert found["kind"] == "conv" and found["max_abs_diff"] >= 1 and found["elements"] > 0


@pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines,
                    reason="needs the onednn engine")
@pytest.mark.parametrize("even", [False, True])
def test_onednn_adds_the_zero_point_before_rounding(tmp_path, even):
    """With odd zero points (quant.even_zero_point=false) only the reference in oneDNN's order
    matches oneDNN; with even ones (the default) both orders do."""
    assert zero_point_order("fbgemm") == {"conv": "after", "linear": "after"}
    assert zero_point_order("onednn") == {"conv": "before", "linear": "before"}
    with quantized_engine("onednn"):
        int8 = _int8(build_resnet20, engine="onednn", even_zero_point=even)
        snap_biases(int8, torch.zeros(1, 3, 32, 32))
        pixels = _pixels(32, seed=5)
        with torch.inference_mode():
            theirs = int8(_normalized(pixels)).double()
    before = _export(int8, tmp_path, zero_point="before")
    assert torch.equal(before.dequantize(before.run(pixels)[0]), theirs)
    after = _export(int8, tmp_path / "after", zero_point="after")  # ties with odd zero points
    assert torch.equal(after.dequantize(after.run(pixels)[0]), theirs) == even


@pytest.mark.skipif(not X86, reason="x86 kernels")
def test_bit_exact_where_the_kernels_are_limited_to_avx2():
    script = (
        "import torch, tempfile, pathlib\n"
        "from test_integer import _int8, _export, _pixels, _normalized\n"
        "from qlab.integer.export import snap_biases\n"
        "from qlab.hardware import quantized_engine\n"
        "from qlab.integer.verify import zero_point_order\n"
        "with quantized_engine('auto') as engine:\n"
        "    int8 = _int8(__import__('qlab.models').models.build_resnet20, engine=engine)\n"
        "    snap_biases(int8, torch.zeros(1, 3, 32, 32))\n"
        "    order = zero_point_order(engine)\n"
        "    ref = _export(int8, pathlib.Path(tempfile.mkdtemp()), zero_point=order)\n"
        "    p = _pixels(32, seed=9)\n"
        "    theirs = int8(_normalized(p)).double()\n"
        "print(engine, torch.equal(ref.dequantize(ref.run(p)[0]), theirs))\n"
    )
    # x86 sends convs to oneDNN where the CPU has VNNI (even with its ISA capped) and to fbgemm
    # where it has not: the engine is asked where it adds the zero point (stage=integer does too)
    env = dict(os.environ, PYTHONWARNINGS="ignore", **AVX2_ONLY,
               PYTHONPATH=f"{ROOT / 'tests'}:{ROOT}")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["x86", "True"]


def test_non_po2_scales_and_shifts_out_of_range_are_refused(tmp_path, use_engine):
    use_engine("fbgemm")
    int8 = _int8(build_resnet20, kind="torch")
    with pytest.raises(QlabError, match=r"tensor 'quant' has scale .* not a power of two.*"
                                        r"quant=po2"):
        to_integer(int8, mean=MEAN, std=STD, image_size=32)
    int8 = _int8(build_resnet20)
    with pytest.raises(QlabError, match=r"outside the configured range 2\^-2 .. 2\^2 "
                                        r"\(quant.max_shift=2\)"):
        to_integer(int8, mean=MEAN, std=STD, image_size=32, max_shift=2)


def test_damaged_files_get_clear_errors(tmp_path, use_engine):
    use_engine("fbgemm")
    int8 = _int8(build_resnet20)
    _export(int8, tmp_path)
    weights = tmp_path / "weights.npz"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(QlabError, match="sha256 .* the file was changed or is corrupted"):
        IntegerModel.load(tmp_path)
    spec = json.loads((tmp_path / "model.json").read_text())
    spec.pop("weights_sha256")
    (tmp_path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(QlabError, match="not a readable .npz file"):
        IntegerModel.load(tmp_path)
    with np.load(_resave(good, tmp_path)) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["fc.weight"] = arrays["fc.weight"][:, :5]  # wrong shape, a consistent file
    arrays.pop("layers.0.conv1.bias")
    np.savez(weights, **arrays)
    with pytest.raises(QlabError, match="no array 'layers.0.conv1.bias'"):
        IntegerModel.load(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(QlabError, match="model.json: not valid JSON"):
        IntegerModel.load(tmp_path)
    with pytest.raises(QlabError, match="does not exist"):
        IntegerModel.load(tmp_path / "nowhere")


def _resave(data: bytes, folder):
    path = folder / "copy.npz"
    path.write_bytes(data)
    return path
