"""One answer in every runtime: with even zero points, fbgemm, x86, oneDNN, qnnpack, ONNX Runtime,
inductor and the portable .pt2 compute the integer reference's numbers, ties included."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.ao.nn.quantized as nnq
from omegaconf import OmegaConf

from qlab import artifacts
from qlab.data import CIFAR_MEAN as MEAN
from qlab.data import CIFAR_STD as STD
from qlab.hardware import quantized_engine
from qlab.integer.export import to_integer, write_integer
from qlab.integer.reference import IntegerModel
from qlab.integer.verify import zero_point_order
from qlab.models import (
    Normalize,
    build_airnet,
    build_mobilenet_v2,
    build_resnet20,
    build_resnet50,
    randomize_batchnorm,
)
from qlab.quant.flows import get_flow
from qlab.quant.observer import Po2MinMaxObserver

from conftest import ROOT

# the x86 engines (qnnpack, the ARM engine, rounds its own way: see docs/runtimes.md)
ENGINES = [e for e in ("fbgemm", "x86", "onednn") if e in torch.backends.quantized.supported_engines]
QUANT = OmegaConf.load(ROOT / "conf" / "quant" / "po2.yaml")


def test_an_even_zero_point_is_exactly_what_makes_both_orders_agree():
    """round(t) + zp == round(t + zp) for every t (ties n + 1/2 included) iff zp is even,
    with round half to even, as every engine rounds."""
    t = torch.arange(-4096, 4096, dtype=torch.float64) / 8  # multiples of 1/8: ties at every .5
    for zp in range(-9, 10):
        same = torch.equal(torch.round(t) + zp, torch.round(t + zp))
        assert same == (zp % 2 == 0), zp


def _tie_codes(engine: str, kind: str, zp: int) -> list[int]:
    """acc = 1, 3, ..., 15 requantized to output scale 2 (every one a tie) with zero point zp."""
    with quantized_engine(engine):
        w = torch.quantize_per_tensor(torch.ones(1, 1), 1.0, 0, torch.qint8)
        x = torch.quantize_per_tensor(torch.arange(1.0, 17.0, 2.0).view(-1, 1), 1.0, 0,
                                      torch.quint8)
        mod = nnq.Conv2d(1, 1, 1) if kind == "conv" else nnq.Linear(1, 1)
        mod.set_weight_bias(w.view(1, 1, 1, 1) if kind == "conv" else w, None)
        mod.scale, mod.zero_point = 2.0, zp
        out = mod(x.view(-1, 1, 1, 1) if kind == "conv" else x)
        return out.int_repr().flatten().tolist()


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("zp", [1, 2, 3, 4, 128])
def test_ties_on_every_engine(kind, zp):
    acc = torch.arange(1.0, 17.0, 2.0, dtype=torch.float64)
    after = (torch.round(acc / 2) + zp).long().tolist()   # fbgemm: round, then add zp
    before = torch.round(acc / 2 + zp).long().tolist()   # oneDNN: add zp, then round
    got = {e: _tie_codes(e, kind, zp) for e in ENGINES}
    if zp % 2 == 0:
        assert after == before
        assert all(codes == after for codes in got.values()), got
    else:
        assert after != before
        for engine, codes in got.items():  # each engine one of the two: the probe names which
            assert codes == (before if zero_point_order(engine)[kind] == "before" else after)
        if "onednn" in got and "fbgemm" in got:
            assert got["onednn"] != got["fbgemm"]  # the disagreement an even zero point removes


def test_onnx_runtime_conv_and_add_agree_with_the_reference_on_ties_when_zp_is_even():
    """ONNX Runtime fuses QDQ conv into QLinearConv and add into QLinearAdd; with an odd output
    zero point it rounds after adding it, with an even one its codes are the reference's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def model(zp: int):
        inits = [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
                 numpy_helper.from_array(np.array(0, np.uint8), "z"),
                 numpy_helper.from_array(np.ones((1, 1, 1, 1), np.int8), "w"),
                 numpy_helper.from_array(np.array(1.0, np.float32), "sw"),
                 numpy_helper.from_array(np.array(0, np.int8), "zw"),
                 numpy_helper.from_array(np.array(2.0, np.float32), "s_out"),
                 numpy_helper.from_array(np.array(zp, np.uint8), "z_out")]
        nodes = [helper.make_node("DequantizeLinear", ["a", "s", "z"], ["fa"]),
                 helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["fw"]),
                 helper.make_node("Conv", ["fa", "fw"], ["conv"]),
                 helper.make_node("QuantizeLinear", ["conv", "s_out", "z_out"], ["qc"]),
                 helper.make_node("DequantizeLinear", ["b", "s", "z"], ["fb"]),
                 helper.make_node("Add", ["fa", "fb"], ["sum"]),
                 helper.make_node("QuantizeLinear", ["sum", "s_out", "z_out"], ["qa"])]
        shape = [1, 1, 2, 4]
        inputs = [helper.make_tensor_value_info(n, TensorProto.UINT8, shape) for n in "ab"]
        outputs = [helper.make_tensor_value_info(n, TensorProto.UINT8, shape) for n in ("qc", "qa")]
        graph = helper.make_graph(nodes, "ties", inputs, outputs, inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])

    a = np.arange(1, 17, 2, dtype=np.uint8).reshape(1, 1, 2, 4)  # sums 1, 3, ...: all ties at /2
    b = np.zeros_like(a)
    for zp in (1, 2, 3, 4):
        session = ort.InferenceSession(model(zp).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        conv, add = (o.astype(int) for o in session.run(None, {"a": a, "b": b}))
        after = np.round(a / 2).astype(int) + zp  # the reference (numpy rounds half to even)
        if zp % 2 == 0:
            assert (conv == after).all() and (add == after).all()
        else:
            assert (add != after).any()  # QLinearAdd: zero point before rounding


def test_po2_observers_choose_an_even_zero_point_without_clipping_when_there_is_room():
    def zero(lo, hi, even=True):
        obs = Po2MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                                even_zero_point=even)
        obs(torch.tensor([lo, hi]))
        return obs.calculate_qparams()

    # scale 2^-7; -3/128 sits 3 steps below zero: the nearest zero point is 3 (odd)
    scale, zp = zero(-3 / 128, 1.5, even=False)
    assert float(scale) == 2**-7 and int(zp) == 3
    scale, zp = zero(-3 / 128, 1.5)  # room above 1.5 (code 195 of 255): up to 4, nothing clips
    assert float(scale) == 2**-7 and int(zp) == 4 and 1.5 / float(scale) + 4 <= 255
    _, zp = zero(-3 / 128, 1.99)  # code 255 is 1.99's: down to 2, -3/128 clips by one step
    assert int(zp) == 2
    for lo, hi in [(-0.3, 0.7), (-1.1, 5.0), (-7.3, 0.2), (0.0, 3.0), (-2.0, -1.0)]:
        assert int(zero(lo, hi)[1]) % 2 == 0


def _calibrated(flow_name: str, build, per_channel: bool, seed: int = 0):
    """A po2 PTQ model from `flow_name`, random BN-realistic weights, calibrated on noise."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(build(num_classes=10).eval())
    flow = get_flow(flow_name)
    quant = OmegaConf.merge(QUANT, {"per_channel": per_channel})
    example = torch.zeros(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = flow.prepare_ptq(model, quant, example)
        with torch.inference_mode():
            for _ in range(2):
                prepared(torch.randn(32, 3, 32, 32) * 1.5)
        return flow, flow.convert(prepared, example)


def _pixels(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


# every engine, in a fresh process that imports nothing of qlab and sets only the engine
# (or, for "default", nothing at all): what a user who runs torch.jit.load gets
_LOAD_EVERYWHERE = """
import sys, torch
x = torch.load(sys.argv[2])
out = {}
for engine in ["default"] + sys.argv[4:]:
    if engine != "default":
        torch.backends.quantized.engine = engine
    with torch.inference_mode():
        out[engine] = torch.jit.load(sys.argv[1])(x)
torch.save(out, sys.argv[3])
assert not [k for k in sys.modules if k.split(".")[0] in ("qlab", "torchao")]
"""


SLOW = pytest.mark.slow


@pytest.mark.parametrize("build, per_channel", [
    (build_resnet20, False), (build_mobilenet_v2, False),
    pytest.param(build_mobilenet_v2, True, marks=SLOW), pytest.param(build_airnet, True, marks=SLOW),
    pytest.param(build_resnet50, False, marks=SLOW),
])
def test_eager_int8_gives_the_reference_logits_on_every_engine(tmp_path, build, per_channel):

    flow, int8 = _calibrated("eager", build, per_channel)
    spec, arrays = to_integer(int8, mean=MEAN, std=STD, image_size=32, max_shift=8)
    zero_points = {t["zero_point"] for t in spec["tensors"].values()}
    assert all(z % 2 == 0 for z in zero_points) and zero_points != {0}, zero_points
    write_integer(tmp_path, spec, arrays)
    pixels = _pixels(256)
    want = {}
    for order in ("after", "before"):  # with even zero points the order does not matter
        ref = IntegerModel.load(tmp_path, zero_point=order)
        want[order] = ref.dequantize(ref.run(pixels)[0]).float()
    assert torch.equal(want["after"], want["before"])
    flow.export(int8, MEAN, STD, tmp_path, meta={}, example=torch.zeros(1, 3, 32, 32))
    torch.save(pixels.float() / 255, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", _LOAD_EVERYWHERE, str(tmp_path / "model_int8.pt"),
                           str(tmp_path / "x.pt"), str(tmp_path / "out.pt"), *ENGINES],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert set(got) == {"default", *ENGINES}
    for engine, logits in got.items():
        identical = (logits == want["after"]).all(1).float().mean().item()
        assert identical == 1.0, (engine, identical)
    with torch.inference_mode():  # and the converted model in this process
        converted = int8(Normalize(MEAN, STD)(pixels.float() / 255))
    assert torch.equal(converted, want["after"])


def test_odd_zero_points_are_what_split_the_engines(tmp_path):
    """The control: MobileNetV2 with the nearest (odd) zero points gives other logits on oneDNN
    than on fbgemm; the same model with even zero points gives one answer."""
    if not {"fbgemm", "onednn"} <= set(ENGINES):
        pytest.skip("needs the fbgemm and onednn engines")
    quant = OmegaConf.merge(QUANT, {"even_zero_point": False})
    torch.manual_seed(0)
    model = randomize_batchnorm(build_mobilenet_v2(num_classes=10).eval())
    flow = get_flow("eager")
    prepared = flow.prepare_ptq(model, quant, torch.zeros(1, 3, 32, 32))
    with torch.inference_mode():
        for _ in range(2):
            prepared(torch.randn(32, 3, 32, 32) * 1.5)
    int8 = flow.convert(prepared, torch.zeros(1, 3, 32, 32))
    spec, _ = to_integer(int8, mean=MEAN, std=STD, image_size=32, max_shift=8)
    assert any(t["zero_point"] % 2 for t in spec["tensors"].values())
    scripted = artifacts.torchscript_of(int8, MEAN, STD)
    x = _pixels(256).float() / 255
    logits = {}
    for engine in ("fbgemm", "onednn"):
        with quantized_engine(engine), torch.inference_mode():
            logits[engine] = torch.jit.load(_save(scripted, tmp_path / f"{engine}.pt"))(x)
    assert not torch.equal(logits["fbgemm"], logits["onednn"])


def _save(scripted, path):
    torch.jit.save(scripted, str(path))
    return str(path)


@SLOW
@pytest.mark.parametrize("build, per_channel", [
    (build_resnet20, False), (build_mobilenet_v2, True), (build_airnet, False),
])
def test_pt2e_int8_gives_one_answer_in_every_runtime(tmp_path, build, per_channel):
    """PT2E: the q/dq program in torch (exact integer arithmetic: every product a po2 multiple
    far inside float32's 24 bits), ONNX Runtime, inductor and the portable .pt2 agree bit for
    bit."""
    from qlab.models import Deployable
    from qlab.runtimes import load_pt2

    flow, int8 = _calibrated("pt2e", build, per_channel)
    exported = flow.export(int8, MEAN, STD, tmp_path, meta={}, example=torch.zeros(1, 3, 32, 32))
    x = _pixels(256).float() / 255
    with torch.inference_mode():
        want = Deployable(int8, MEAN, STD).eval()(x)
        got = {"onnxruntime": exported.deployable(x),
               "torch.export": load_pt2(tmp_path / "model_int8.pt2")(x),
               "inductor": exported.runtimes["inductor"](x)}
    for runtime, logits in got.items():
        identical = (logits == want).all(1).float().mean().item()
        assert identical == 1.0, (runtime, identical)
