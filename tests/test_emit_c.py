"""The integer model as portable C (qlab.integer.emit_c): bit-exact with the reference executor,
clean under -Wall -Wextra -Werror and the sanitizers, and free of float, malloc and division."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from test_integer import MEAN, STD, _int8, _normalized, _pixels
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules

from qlab.errors import QlabError
from qlab.integer.emit_c import build_c, emit_c, find_cc, run_c
from qlab.integer.export import snap_biases, to_integer, write_integer
from qlab.integer.reference import ROUNDINGS, IntegerModel
from qlab.models import build_resnet20

from conftest import TINY, read_metrics, run_cli

CC = find_cc()
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler here ($CC, cc, gcc or clang): "
                                                  "the emitted C cannot be built")
SOURCES = ("qlab_model.c", "qlab_model.h", "qlab_weights.h", "main.c")


class _Tiny(nn.Module):
    """Every op of the format in a few channels: conv-BN-ReLU; a dilated depthwise conv-BN and a
    pointwise conv-BN added to it without ReLU (MobileNet's residual); a padded 3x3 max pool; a
    strided grouped conv-BN-ReLU (2 groups) plus a strided 1x1 shortcut with a bias, added with
    ReLU; 8x8 -> 2x2 average pooling (4x4 windows); flatten of 12x2x2; linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), \
            nn.BatchNorm2d(8), nn.ReLU()
        self.dw, self.bn_dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False), \
            nn.BatchNorm2d(8)
        self.pw, self.bn_pw = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.add = FloatFunctional()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.g, self.bn_g, self.relu_g = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2,
                                                   bias=False), nn.BatchNorm2d(12), nn.ReLU()
        self.skip = nn.Conv2d(8, 12, 1, stride=2)
        self.add_relu = FloatFunctional()
        self.avg = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.add.add(x, self.bn_pw(self.pw(self.bn_dw(self.dw(x)))))
        x = self.pool(x)
        x = self.add_relu.add_relu(self.relu_g(self.bn_g(self.g(x))), self.skip(x))
        return self.dequant(self.fc(self.avg(x).flatten(1)))

    def fuse_model(self, is_qat: bool | None = None) -> None:
        fuse_modules(self, [["conv1", "bn1", "relu1"], ["dw", "bn_dw"], ["pw", "bn_pw"],
                            ["g", "bn_g", "relu_g"]], inplace=True)


def _export_tiny(folder, *, per_channel=False):
    int8 = _int8(_Tiny, per_channel=per_channel)
    snap_biases(int8, torch.zeros(1, 3, 32, 32))
    spec, arrays = to_integer(int8, mean=MEAN, std=STD, image_size=32, max_shift=8)
    write_integer(folder, spec, arrays)
    return int8, spec, arrays


def _strip(text: str) -> str:
    """C source without comments and string/character literals."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r'"(\\.|[^"\\\n])*"|\'(\\.|[^\'\\\n])*\'', '""', text)


@needs_cc
@pytest.mark.parametrize("per_channel", [False, True])
def test_every_op_in_c_equals_the_reference(tmp_path, per_channel):
    int8, spec, arrays = _export_tiny(tmp_path, per_channel=per_channel)
    kinds = {op["op"] for op in spec["ops"]}
    assert kinds == {"quantize_input", "conv", "add", "maxpool", "avgpool", "flatten", "linear"}
    groups = [op["groups"] for op in spec["ops"] if op["op"] == "conv"]
    assert 8 in groups and 2 in groups  # depthwise and grouped
    cdir = emit_c(tmp_path, spec, arrays)
    assert cdir == tmp_path / "c"
    if shutil.which("make"):  # the Makefile itself, with its default CFLAGS
        proc = subprocess.run(["make", "-C", str(cdir), "qlab_run", f"CC={' '.join(CC)}"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        binary = cdir / "qlab_run"
    else:
        binary = build_c(cdir)
    pixels = _pixels(32, seed=21)
    ref = IntegerModel.load(tmp_path)
    codes, _ = ref.run(pixels)
    with torch.inference_mode():  # the reference is torch's model here, so C is too
        assert torch.equal(ref.dequantize(codes), int8(_normalized(pixels)).double())
    mine = run_c(binary, pixels)
    assert mine.shape == (32, 10)
    np.testing.assert_array_equal(mine, codes.numpy())
    # a file argument reads the same bytes; a truncated image is an error, not a guess
    raw = tmp_path / "images.raw"
    raw.write_bytes(np.ascontiguousarray(pixels.numpy().transpose(0, 2, 3, 1)).tobytes())
    out = subprocess.run([str(binary), str(raw)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[5] == ",".join(map(str, codes[5].tolist()))
    raw.write_bytes(raw.read_bytes()[:-1])
    bad = subprocess.run([str(binary), str(raw)], capture_output=True, text=True)
    assert bad.returncode == 1 and "image 31 has 3071 of 3072 bytes" in bad.stderr
    summary = json.loads((cdir / "summary.json").read_text())
    header = (cdir / "qlab_model.h").read_text()
    assert f"#define QLAB_ARENA_BYTES {summary['arena_bytes']}" in header
    assert f"#define QLAB_OUT_ZERO_POINT {spec['output']['zero_point']}" in header
    assert "#define QLAB_NUM_CLASSES 10" in header and "#define QLAB_IMAGE_W 32" in header
    assert 0 < summary["arena_bytes"] < summary["activation_bytes_without_reuse"]
    assert summary["weight_bytes"] == 3 * 256 + sum(
        a.size * a.itemsize for k, a in arrays.items() if k != "input.lut") + 4 * sum(
        len(op["shift"]) for op in spec["ops"] if isinstance(op.get("shift"), list)
        and op["op"] in ("conv", "linear"))


def _hand_built(folder):
    """Int8 and uint8 tensors with odd zero points, per-channel shifts from -20 (an int64
    accumulator, a left shift) to 3, a strided depthwise conv, add with align shifts, max pool
    padded with -128, average pooling, a 9x7 image: what a torch model rarely produces."""
    rng = np.random.default_rng(5)

    def t(shape, dtype, zp, exp=0):
        return {"shape": shape, "dtype": dtype, "exp": exp, "zero_point": zp}

    tensors = {"x": t([3, 9, 7], "uint8", 0), "a": t([8, 9, 7], "int8", -3),
               "b": t([8, 5, 4], "uint8", 5), "c": t([8, 5, 4], "int8", 1),
               "s": t([8, 5, 4], "int8", 3), "m": t([8, 6, 5], "int8", 3),
               "p": t([8, 3, 2], "int8", 3), "f": t([48], "int8", 3), "y": t([10], "int8", -1)}
    conv = {"op": "conv", "dilation": [1, 1], "relu": False}
    ops = [
        {"op": "quantize_input", "name": "x", "inputs": [], "output": "x", "lut": "lut"},
        conv | {"name": "ca", "inputs": ["x"], "output": "a", "weight": "ca.w", "bias": "ca.b",
                "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "groups": 1,
                "in_zero_point": 0, "out_zero_point": -3, "shift": [3, 1, 0, -1, 2, 1, 4, 1],
                "clamp": [-128, 127]},
        conv | {"name": "cb", "inputs": ["a"], "output": "b", "weight": "cb.w", "bias": "cb.b",
                "kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "groups": 8,
                "in_zero_point": -3, "out_zero_point": 5, "shift": 2, "relu": True,
                "clamp": [5, 255]},
        conv | {"name": "cc", "inputs": ["a"], "output": "c", "weight": "cc.w", "bias": "cc.b",
                "kernel": [1, 1], "stride": [2, 2], "padding": [0, 0], "groups": 1,
                "in_zero_point": -3, "out_zero_point": 1, "shift": 1, "clamp": [-128, 127]},
        {"op": "add", "name": "s", "inputs": ["b", "c"], "output": "s", "in_zero_points": [5, 1],
         "align": [1, 0], "shift": 1, "out_zero_point": 3, "relu": False, "clamp": [-128, 127]},
        {"op": "maxpool", "name": "m", "inputs": ["s"], "output": "m", "kernel": [2, 2],
         "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "ceil_mode": False},
        {"op": "avgpool", "name": "p", "inputs": ["m"], "output": "p", "kernel": [2, 2],
         "stride": [2, 2], "shift": 2, "out_zero_point": 3, "clamp": [-128, 127]},
        {"op": "flatten", "name": "f", "inputs": ["p"], "output": "f"},
        {"op": "linear", "name": "fc", "inputs": ["f"], "output": "y", "weight": "fc.w",
         "bias": "fc.b", "in_zero_point": 3, "out_zero_point": -1, "relu": False,
         "shift": [1, 2, 0, -1, 3, 2, 1, 2, -20, 1], "clamp": [-128, 127]},
    ]

    def w(*shape):
        return rng.integers(-128, 128, shape).astype(np.int8)

    def b(n, scale=200):
        return rng.integers(-scale, scale, n).astype(np.int32)

    arrays = {"lut": rng.integers(0, 256, (3, 256)).astype(np.uint8),
              "ca.w": w(8, 3, 3, 3) // 8, "ca.b": b(8), "cb.w": w(8, 1, 3, 3) // 4, "cb.b": b(8),
              "cc.w": w(8, 8, 1, 1) // 4, "cc.b": b(8), "fc.w": w(10, 48) // 16, "fc.b": b(10)}
    # the channels with a shift <= 0 get tiny sums, so that they do not all saturate
    arrays["ca.w"][2:4] = 0
    arrays["ca.w"][2:4, :, 1, 1] = [[-1, 1, 0], [0, -1, 1]]
    arrays["ca.b"][2:4] = [40, -30]
    arrays["fc.w"][2:4] = 0
    arrays["fc.w"][2:4, :6] = [[1, -1, 1, -1, -1, 0], [-1, 0, 1, 0, -1, 1]]
    arrays["fc.b"][2:4] = [-20, 10]
    spec = {"format": "qlab-integer-model", "version": 1, "rounding": "half_even",
            "input": {"tensor": "x", "shape": [3, 9, 7]}, "tensors": tensors,
            "output": {"tensor": "y", **tensors["y"]}, "ops": ops}
    write_integer(folder, spec, arrays)
    return spec, arrays


@needs_cc
@pytest.mark.parametrize("order", ["after", "before"])
def test_each_rounding_rule_and_zero_point_order_in_c(tmp_path, order):
    spec, arrays = _hand_built(tmp_path)
    pixels = torch.randint(0, 256, (24, 3, 9, 7), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(4))
    results = {}
    for rounding in ROUNDINGS:
        ref = IntegerModel.load(tmp_path, rounding=rounding, zero_point=order)
        codes, env = ref.run(pixels, keep=True)
        cdir = emit_c(tmp_path, rounding=rounding, zero_point=order)
        layers = json.loads((cdir / "summary.json").read_text())["layers"]
        assert {r["op"]: r["accumulator"] for r in layers}["fc"] == "int64"
        np.testing.assert_array_equal(run_c(build_c(cdir), pixels), codes.numpy(),
                                      err_msg=f"{rounding}, zero point {order}")
        results[rounding] = env
    # the rules really disagree on this data (ties happen), so each was tested on its own ties
    for rounding in ("half_up", "half_away", "floor"):
        assert any(not torch.equal(results[rounding][t], results["half_even"][t])
                   for t in ("a", "b", "c", "s", "p", "y")), rounding


@needs_cc
def test_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    _export_tiny(tmp_path, per_channel=True)
    cdir = emit_c(tmp_path)
    try:
        binary = build_c(cdir, output="qlab_run_san", cflags="-std=c99 -Wall -Wextra -Werror "
                         "-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all")
    except Exception as exc:  # a compiler without the sanitizer runtimes
        pytest.skip(f"the compiler cannot build with -fsanitize=address,undefined: {exc}")
    pixels = _pixels(8, seed=2)
    np.testing.assert_array_equal(run_c(binary, pixels),
                                  IntegerModel.load(tmp_path).run(pixels)[0].numpy())
    spec_dir = tmp_path / "hand"
    _hand_built(spec_dir)  # int8 tensors, left shifts, int64 accumulators
    cdir = emit_c(spec_dir, rounding="half_away", zero_point="before")
    binary = build_c(cdir, output="qlab_run_san", cflags="-std=c99 -Wall -Wextra -Werror -O1 -g "
                     "-fsanitize=address,undefined -fno-sanitize-recover=all")
    pixels = torch.randint(0, 256, (8, 3, 9, 7), dtype=torch.uint8)
    ref = IntegerModel.load(spec_dir, rounding="half_away", zero_point="before")
    np.testing.assert_array_equal(run_c(binary, pixels), ref.run(pixels)[0].numpy())


def test_no_float_no_malloc_no_division_no_libm(tmp_path):
    _export_tiny(tmp_path, per_channel=True)
    cdir = emit_c(tmp_path)
    _hand_built(tmp_path / "hand")
    hand = emit_c(tmp_path / "hand", rounding="half_away", zero_point="before")
    for folder in (cdir, hand):
        for name in SOURCES:
            text = (folder / name).read_text()
            code = _strip(text)
            for word in ("float", "double", "malloc", "calloc", "realloc", "free", "alloca",
                         "long double", "_Complex"):
                assert not re.search(rf"\b{word}\b", code), f"{word} in {name}"
            assert "/" not in code, f"a division in {name}"  # comments and strings are stripped
            assert "%" not in code, f"a remainder in {name}"
            assert not re.search(r"#\s*include\s*<(math|tgmath|complex|stdlib)\.h>", text), name
        assert "-lm" not in (folder / "Makefile").read_text()
    if CC is not None and shutil.which("nm"):
        subprocess.run([*CC, "-std=c99", "-O2", "-c", "-o", "qlab_model.o", "qlab_model.c"],
                       cwd=cdir, check=True)
        nm = subprocess.run(["nm", "-u", "qlab_model.o"], cwd=cdir, capture_output=True,
                            text=True, check=True).stdout.split()
        # the compiler may call memset/memcpy for a loop; nothing else from any library
        assert set(nm) - {"U"} <= {"memset", "memcpy", "memmove"}, nm


def test_without_a_compiler_the_sources_are_written_and_the_warning_says_how_to_build(
        tmp_path, monkeypatch, caplog):
    from qlab.integer.emit_c import check_c

    _hand_built(tmp_path)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert find_cc() is None
    ref = IntegerModel.load(tmp_path)
    with caplog.at_level("WARNING"):
        block = check_c(tmp_path, ref, loader=[], limit=4)
    assert block["built"] is False and block["arena_bytes"] > 0 and block["weight_bytes"] > 0
    assert set(SOURCES) | {"Makefile"} <= set(block["files"])
    assert all((tmp_path / "c" / f).is_file() for f in block["files"])
    assert "no C compiler was found" in caplog.text and "make -C" in caplog.text
    with pytest.raises(QlabError, match="integer.emit=.rust."):
        check_c(tmp_path, ref, loader=[], emit="rust")


@needs_cc
@pytest.mark.skipif(shutil.which("size") is None, reason="binutils' size is not installed")
def test_code_bytes_are_the_text_sections_as_binutils_counts_them(tmp_path):
    from qlab.integer.emit_c import code_bytes, elf_section_sizes

    _hand_built(tmp_path)
    cdir = emit_c(tmp_path)
    subprocess.run([*CC, "-O2", "-c", "-o", "m.o", "qlab_model.c"], cwd=cdir, check=True)
    listed = subprocess.run(["size", "-A", "m.o"], cwd=cdir, capture_output=True, text=True,
                            check=True).stdout.split("\n")
    theirs = {p[0]: int(p[1]) for p in (line.split() for line in listed[2:]) if len(p) == 3}
    mine = elf_section_sizes(cdir / "m.o")
    assert {k: mine[k] for k in theirs} == theirs
    # the weights are .rodata, not code: the code of this small model is a few kB at most
    assert 0 < code_bytes(cdir, cflags="-std=c99 -O2") < mine[".rodata"] + 20_000
    with pytest.raises(QlabError, match="not an ELF"):
        elf_section_sizes(cdir / "qlab_model.c")


def test_what_c_cannot_hold_is_refused(tmp_path):
    spec, arrays = _hand_built(tmp_path)
    fc = next(op for op in spec["ops"] if op["name"] == "fc")
    fc["shift"] = [1] * 9 + [-50]  # int64 would overflow after this left shift
    with pytest.raises(QlabError, match="'fc': its shifts could carry a value past 2\\^62"):
        emit_c(tmp_path, spec, arrays)
    fc["shift"], fc["clamp"] = 1, [-200, 127]
    with pytest.raises(QlabError, match=r"clamp \[-200, 127\] is outside (the )?int8"):
        emit_c(tmp_path, spec, arrays)


@needs_cc
@pytest.mark.slow
def test_resnet20_in_c_equals_the_reference(tmp_path):
    int8 = _int8(build_resnet20)
    snap_biases(int8, torch.zeros(1, 3, 32, 32))
    spec, arrays = to_integer(int8, mean=MEAN, std=STD, image_size=32, max_shift=8)
    write_integer(tmp_path, spec, arrays)
    binary = build_c(emit_c(tmp_path))
    pixels = _pixels(64, seed=13)
    codes, _ = IntegerModel.load(tmp_path).run(pixels)
    np.testing.assert_array_equal(run_c(binary, pixels), codes.numpy())
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["weight_bytes"] > 270_000 and summary["arena_bytes"] < 64 * 1024


@pytest.mark.slow
def test_stage_integer_emit_c(tmp_path):
    """stage=integer integer.emit=c: the sources in integer/c/, and where a compiler exists the
    build checked against the reference in verify.json's "c" block."""
    quick = [*(o for o in TINY if not o.startswith("model.")), "model=resnet20",
             "quant.calib_batches=2"]
    run_cli("train.py", "stage=fp32", "name=e", *quick, outputs=tmp_path)
    run_cli("quantize.py", "stage=ptq", "name=e", *quick, outputs=tmp_path)
    run_cli("quantize.py", "stage=integer", "name=e", "from=ptq", "integer.emit=c",
            "integer.limit_images=32", *quick, outputs=tmp_path)
    out = tmp_path / "e" / "ptq" / "integer"
    c = read_metrics(out / "verify.json")["c"]
    assert (out / "c" / "qlab_model.c").is_file() and c["arena_bytes"] > 0
    assert c["weight_bytes"] > 270_000 and "qlab_weights.h" in c["files"]
    if CC is None:
        assert c["built"] is False
    else:
        assert c["built"] and c["images"] == 32 and c["identical_fraction"] == 1.0
        assert c["flash_bytes"] == c["weight_bytes"] + c["code_bytes"] and c["code_bytes"] > 1000
        assert c["ram_bytes"] == c["arena_bytes"] and c["ms_per_image"] > 0
    # stage=report states the integer model and its C build
    run_cli("quantize.py", "stage=report", "name=e", "bench.inductor=false", *quick,
            outputs=tmp_path)
    report = read_metrics(tmp_path / "e" / "report.json")["integer"]["ptq"]
    assert report["images"] == 32 and report["identical_logits_fraction"] == 1.0
    text = (tmp_path / "e" / "report.md").read_text()
    assert "## The integer model" in text and "- ptq: identical logits on 32 of 32" in text
    if CC is not None:
        assert report["c"]["flash_bytes"] == c["flash_bytes"] and "flash" in text
    proc = run_cli("quantize.py", "stage=integer", "name=e", "from=ptq", "integer.emit=rust",
                   "integer.limit_images=32", *quick, outputs=tmp_path, check=False)
    assert proc.returncode == 2 and "integer.emit='rust'" in proc.stderr
