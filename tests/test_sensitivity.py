"""stage=sensitivity: the per-op pairing of INT8 and fused FP32, SQNR, clipping, the simulation
that the accuracy sweeps run on, and the stage through quantize.py."""

import copy
import json
import math
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from qlab.hardware import quantized_engine
from qlab.models import build_mobilenet_v2, build_resnet20, randomize_batchnorm
from qlab.quant.flows.eager import EagerFlow
from qlab.quant.ptq import calibrate, prepare_ptq
from qlab.quant.qconfig import build_qconfig
from qlab.quant.sensitivity import (
    QuantOp,
    Simulation,
    accuracy,
    fake_quantize,
    find_cuts,
    find_ops,
    output_stats,
    per_op_accuracy,
    sqnr_db,
    sweeps,
)

from conftest import read_metrics, run_cli

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


def _normalized(n, seed):
    x = _images(n, seed).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def resnet20_int8():
    with quantized_engine("x86"):  # for the module's tests that use it, restored after them
        torch.manual_seed(0)
        model = randomize_batchnorm(build_resnet20()).eval()
        fused = copy.deepcopy(model)
        fused.fuse_model(is_qat=False)
        prepared = prepare_ptq(model, build_qconfig(backend="x86", per_channel=True))
        calibrate(prepared, [(_images(32, 1), None)], batches=1, mean=MEAN, std=STD)
        int8 = EagerFlow().convert(prepared, torch.zeros(1, 3, 32, 32))
        yield fused, int8


def test_sqnr_db():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == math.inf and sqnr_db(0.0, 1.0) == -math.inf


def test_every_quantized_op_is_found_in_execution_order(resnet20_int8):
    fused, int8 = resnet20_int8
    ops = find_ops(int8, fused, torch.zeros(1, 3, 32, 32))
    kinds = [op.kind for op in ops]
    # the input, 19 3x3 convs + 2 projections, 9 residual adds, the linear head
    assert kinds.count("input") == 1 and kinds.count("conv") == 21
    assert kinds.count("add") == 9 and kinds.count("linear") == 1
    assert ops[0].kind == "input" and ops[-1].kind == "linear" and ops[-1].name == "fc"
    for op in ops:
        assert op.scale > 0 and math.log2(op.scale) == round(math.log2(op.scale))  # po2
        if op.kind in ("conv", "linear"):
            assert op.weight.shape == op.float_weight.shape
    # a residual add sits after its block's second conv
    names = [op.name for op in ops]
    add = next(op.name for op in ops if op.kind == "add")
    assert names.index(add) > names.index(add.rsplit(".", 1)[0] + ".conv2")


@pytest.mark.parametrize("scale", [2.0 ** -5, 2.0 ** 3, 0.0123457, 0.3])
@pytest.mark.parametrize("qmin,qmax,zero_point", [(0, 255, 0), (0, 255, 131), (-128, 127, 0),
                                                  (-64, 64, 0), (-8, 7, 0)])
def test_fake_quantize_is_torchs_bit_for_bit(scale, qmin, qmax, zero_point):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4100, generator=g) * scale * 40,  # inside and outside the range
                   (torch.arange(-300, 300) + 0.5) * scale,     # ties: half to even
                   torch.tensor([0.0, -0.0, scale / 2, -scale / 2])])
    for t in (x, x.reshape(-1, 4, 2, 2).contiguous(memory_format=torch.channels_last)):
        expect = torch.fake_quantize_per_tensor_affine(t, scale, zero_point, qmin, qmax)
        assert torch.equal(fake_quantize(t, scale, zero_point, qmin, qmax), expect)
    y = fake_quantize(x, scale, zero_point, qmin, qmax)  # both ends of the range are reached
    assert float(y.max()) == pytest.approx((qmax - zero_point) * scale)
    assert float(y.min()) == pytest.approx((qmin - zero_point) * scale)


def test_simulation_is_the_fused_model_or_the_converted_one(resnet20_int8):
    fused, int8 = resnet20_int8
    ops = find_ops(int8, fused, torch.zeros(1, 3, 32, 32))
    sim = Simulation(fused, ops)
    x = _normalized(64, 2)
    with torch.no_grad():
        torch.testing.assert_close(sim.set_quantized(())(x), fused(x))
        simulated = sim.set_quantized(op.name for op in ops)(x)
        converted = int8(x)
    # the same integer codes (float sums of po2-scaled integers are exact but for a rare tie
    # broken the other way), the average pool's rounding included
    step = ops[-1].scale
    assert (simulated - converted).abs().max() <= step + 1e-6
    assert (simulated == converted).float().mean() > 0.99
    # switching everything off again restores the FP32 weights exactly (the simulation runs
    # in channels_last, which sums in another order than the NCHW model: the same layout then)
    last = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(sim.set_quantized(())(x),
                                   last(x.contiguous(memory_format=torch.channels_last)),
                                   rtol=0, atol=0)


def test_output_stats_and_sweeps(resnet20_int8):
    fused, int8 = resnet20_int8
    ops = find_ops(int8, fused, torch.zeros(1, 3, 32, 32))
    output_stats(ops, fused, int8, [_normalized(32, 3)])
    for op in ops:
        assert math.isfinite(op.stats["output_sqnr_db"]) and op.stats["output_sqnr_db"] > 0
        assert 0.0 <= op.stats["clipped_fraction"] < 0.5
        if op.weight is not None:
            w, wq = op.float_weight.double(), op.weight.double()
            expect = 10 * math.log10(float(w.pow(2).sum() / (w - wq).pow(2).sum()))
            assert op.stats["weight_sqnr_db"] == pytest.approx(expect)
            assert op.stats["weight_sqnr_db"] > 15  # 7-bit (portable) po2 per-channel weights
    # errors accumulate: the head's output is noisier than the first conv's
    assert ops[-1].stats["output_sqnr_db"] < ops[1].stats["output_sqnr_db"]

    # labels the fused FP32 model predicts: it scores 100 %, and a clipping scale hurts
    x = _normalized(64, 4)
    with torch.no_grad():
        y = fused(x).argmax(1)
    sim = Simulation(fused, ops)
    result = sweeps(sim, [(x, y)])
    assert result["float"] == 100.0 and result["quantized"] == accuracy(sim, [(x, y)])
    # an op whose output scale clips almost everything: alone it ruins the accuracy
    first = ops[1]
    first.scale /= 256
    try:
        clipped = Simulation(fused, ops)
        assert accuracy(clipped.set_quantized([first.name]), [(x, y)]) < 60
        output_stats([first], fused, int8, [x])  # against the INT8 model's real scale: clipped
        assert first.stats["clipped_fraction"] > 0.3  # all but the ReLU zeros
    finally:
        first.scale *= 256


def test_sweeps_run_from_cuts_give_the_whole_passes_accuracies(resnet20_int8):
    fused, int8 = resnet20_int8
    ops = find_ops(int8, fused, torch.zeros(1, 3, 32, 32))
    x = _normalized(64, 5)
    with torch.no_grad():
        y = fused(x).argmax(1)
    saved = [(op, op.scale) for op in ops[1::6]]
    for k, (op, scale) in enumerate(saved):  # output scales that clip, each op its own amount
        op.scale = scale / 2 ** (3 + k)
    try:
        sim = Simulation(fused, ops)
        cuts = find_cuts(sim, x[:8])
        # the stem's modules and each residual block of the three stages
        assert len(cuts.modules) >= 12 and cuts.of[0] is not None
        assert [c for c in cuts.of if c is not None] == sorted(c for c in cuts.of if c is not None)
        batches = [(x[:32], y[:32]), (x[32:], y[32:])]
        cut, whole = per_op_accuracy(sim, batches), per_op_accuracy(sim, batches, cut=False)
        assert cut == whole
        assert len({a["accuracy_only_this_quantized"] for a in cut.values()}) >= 3  # not trivial
        assert len({a["accuracy_only_this_float"] for a in cut.values()}) >= 2
        gemms = [op.name for op in ops if op.kind == "conv"][:5]
        some = per_op_accuracy(sim, batches, only_quantized=False, names=gemms)
        assert list(some) == gemms
        assert all(some[n] == {"accuracy_only_this_float": cut[n]["accuracy_only_this_float"]}
                   for n in gemms)
    finally:
        for op, scale in saved:
            op.scale = scale


class _Chain(nn.Module):
    def __init__(self, leak: bool):
        super().__init__()
        self.leak = leak
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.body(x).mean((2, 3))
        return self.fc(h + x.mean() if self.leak else h)  # the input read after every cut


@pytest.mark.parametrize("leak", [False, True])
def test_a_pass_is_only_cut_where_nothing_else_crosses(leak):
    torch.manual_seed(0)
    op = QuantOp(name="body.2", kind="conv", scale=0.05, zero_point=0, qmin=-128, qmax=127)
    sim = Simulation(_Chain(leak).eval(), [op])
    cuts = find_cuts(sim, torch.randn(8, 3, 8, 8))
    if leak:  # the input's mean from one image where the whole batch's is read: no cut holds
        assert cuts.of == [None] and cuts.modules == []
    else:
        assert cuts.modules == [sim.modules["body.2"]] and cuts.of == [0]


R20 = ["model=resnet20", "data=synthetic", "data.num_train=160", "data.num_test=64",
       "data.batch_size=32", "data.eval_batch_size=64", "trainer.max_epochs=1",
       "trainer.enable_progress_bar=false", "bench.runs=5", "bench.warmup=1",
       "bench.inductor=false", "export.pt2=false", "export.onnx=false",
       "quant.calib_batches=2"]
SENS = ["sensitivity.images=48", "sensitivity.calib_images=40"]


@pytest.mark.slow
def test_sensitivity_stage_and_report(tmp_path):
    run_cli("train.py", "stage=fp32", "name=s", *R20, outputs=tmp_path)
    run_cli("quantize.py", "stage=ptq", "name=s", *R20, outputs=tmp_path)
    run_cli("quantize.py", "stage=sensitivity", "name=s", "from=ptq", *R20, *SENS,
            outputs=tmp_path)
    out = tmp_path / "s" / "ptq" / "sensitivity"
    for f in ("sensitivity.json", "sensitivity.md", "sensitivity.png"):
        assert (out / f).is_file(), f
    result = json.loads((out / "sensitivity.json").read_text())
    assert result["flow"] == "eager" and result["subset"] == {"split": "test", "images": 48,
                                                              "seed": 42}
    assert result["calibration_images"] == 40 and len(result["ops"]) == 32
    for op in result["ops"]:
        for key in ("output_sqnr_db", "accuracy_only_this_quantized", "accuracy_only_this_float",
                    "clipped_fraction", "output_scale_exponent", "output_rounding"):
            assert op[key] is not None, (op["name"], key)
        assert (op["weight_sqnr_db"] is None) == (op["kind"] in ("input", "add"))
        if op["kind"] == "conv":
            assert op["weight_rounding"] is not None
    # the simulation stands for the converted model
    acc = result["accuracy"]
    assert acc["agreement"] > 0.9 and abs(acc["quantized"] - acc["converted"]) < 10
    ptq = read_metrics(tmp_path / "s" / "ptq" / "metrics.json")
    assert acc["converted"] == pytest.approx(ptq["accuracy"], abs=15)  # a 48-image subset of 64
    worst = result["worst"]
    assert len(worst) == 5 and worst == [op["name"] for op in result["worst_first"][:5]]
    md = (out / "sensitivity.md").read_text()
    assert md.index(f"| 1 | {worst[0]} |") < md.index(f"| 2 | {worst[1]} |")

    run_cli("quantize.py", "stage=report", "name=s", *R20, outputs=tmp_path)
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["sensitivity"] == {"ptq": worst}
    text = (tmp_path / "s" / "report.md").read_text()
    assert f"- ptq (48 test images): {worst[0]} (" in text

    # an FP32 folder is not an INT8 stage: a clear error, status 2
    proc = run_cli("quantize.py", "stage=sensitivity", "name=s", "from=fp32", *R20,
                   outputs=tmp_path, check=False)
    assert proc.returncode == 2 and "not an INT8 stage" in proc.stderr


def _model_fused_and_gemms(build):
    """A seeded random model, it fused for eval, and its conv/linear ops (float island names)."""
    from qlab.quant.mixed import weighted_ops

    torch.manual_seed(0)
    model = randomize_batchnorm(build()).eval()
    fused = copy.deepcopy(model)
    fused.fuse_model(is_qat=False)
    return model, fused, weighted_ops(fused)


def _calibrated(model, float_layers, qconfig=None):
    """A copy of `model` fused, prepared with those float islands and calibrated on 32 images."""
    prepared = prepare_ptq(copy.deepcopy(model), qconfig or build_qconfig(backend="x86"),
                           float_layers=float_layers)
    calibrate(prepared, [(_images(32, 1), None)], batches=1, mean=MEAN, std=STD)
    return prepared


def test_float_islands_stay_float_and_the_rest_int8(resnet20_int8):
    from torch.ao.quantization import convert

    from qlab.errors import QlabError
    from qlab.quant.mixed import (
        FloatIsland,
        boundaries_record,
        float_islands,
        float_regions,
        input_readers,
        make_float_islands,
    )

    model, fused, names = _model_fused_and_gemms(build_resnet20)
    assert len(names) == 22 and names[0] == "conv1" and names[-1] == "fc"
    assert "layers.3.downsample.0" in names and "conv1.0" not in names  # not inside ConvReLU
    assert input_readers(fused, torch.zeros(1, 3, 32, 32)) == ["conv1"]

    def quantize(float_layers):
        return EagerFlow().convert(_calibrated(model, float_layers), torch.zeros(1, 3, 32, 32))

    x = _normalized(16, 5)
    with torch.no_grad():
        ref = fused(x)
        all_int8 = quantize([])(x)
        mixed = quantize(["conv1", "fc"])
        assert float_islands(mixed) == ["conv1", "fc"]
        assert type(mixed.fc.op) is nn.Linear and type(mixed.conv1.op).__name__ == "ConvReLU2d"
        assert "quantized" in type(mixed.layers[0].conv1).__module__  # the rest is INT8
        island_out = mixed(x)
        every = quantize(names)
        # every weighted op in float: only activation rounding is left, closer to FP32
        assert not any("quantized" in type(m).__module__ and hasattr(m, "weight")
                       for m in every.modules())
        err = [(y - ref).norm() / ref.norm() for y in (all_int8, every(x))]
        assert err[1] < err[0]
        scripted = torch.jit.script(mixed)
        torch.testing.assert_close(scripted(x), island_out)
        # float regions: only conv1 (read by layers.0's INT8 conv and add) requantizes; the
        # input (read by conv1 only) and fc's output (read by the dequantize) stay float
        assert boundaries_record(mixed) == {"input_quantized": False, "requantized": ["conv1"]}
        assert isinstance(mixed.quant, nn.Identity) and isinstance(mixed.fc.quant, nn.Identity)
        assert boundaries_record(every)["input_quantized"] is False
        # every island: the blocks' first convs pass float to their second; the second convs
        # requantize for the INT8 adds. Dropping those roundings brings the model closer to FP32
        assert boundaries_record(every)["requantized"] == [
            n for n in names if n == "conv1" or n.endswith(("conv2", "downsample.0"))]
        kept = convert(_calibrated(model, names))  # torch convert alone: every island requantizes
        assert len(boundaries_record(kept)["requantized"]) == 22
        assert float_regions(every, x[:1]) == []  # nothing left to drop
        err_kept = (kept(x) - ref).norm() / ref.norm()
        assert err[1] < err_kept
    with pytest.raises(QlabError, match="not a conv or linear op"):
        make_float_islands(copy.deepcopy(fused), ["layers.0.add_relu"])
    with pytest.raises(QlabError, match="is not in this model.*conv1, layers.0.conv1"):
        make_float_islands(copy.deepcopy(fused), ["layers.0.conv9"])
    assert isinstance(FloatIsland(nn.Linear(2, 2)).op, nn.Linear)


def test_a_saved_islanded_model_is_rebuilt_with_the_quantizes_it_holds(tmp_path):
    # stage=sensitivity rebuilds a stage's INT8 model from metrics.json + its state_dict: the
    # quantizes float_regions dropped are dropped again; a model saved with every island
    # requantizing (before float regions) keeps them, and both compute what was saved
    from torch.ao.quantization import convert

    from qlab.quant.mixed import boundaries_record
    from qlab.stages.integer import rebuild_int8

    model, _, _ = _model_fused_and_gemms(build_resnet20)
    quant = {"backend": "x86", "float_layers": ["conv1", "fc"]}
    prepared = _calibrated(model, quant["float_layers"])
    metrics = {"model": {"_target_": "qlab.models.build_resnet20"}, "classes": list("0123456789"),
               "quant": quant, "mean": list(MEAN), "image_size": 32}
    x = _normalized(8, 3)
    with quantized_engine("x86"), torch.no_grad():
        for saved in (EagerFlow().convert(prepared, x[:1]), convert(copy.deepcopy(prepared))):
            torch.save(saved.state_dict(), tmp_path / "model_int8_state_dict.pt")
            rebuilt = rebuild_int8(tmp_path, metrics)
            assert boundaries_record(rebuilt) == boundaries_record(saved)
            assert torch.equal(rebuilt(x), saved(x))


@pytest.mark.parametrize("build", [build_resnet20, build_mobilenet_v2])
def test_islands_made_after_calibration_are_the_islands_calibrated_again(build):
    # what makes quant.mixed.max_drop's greedy steps cheap: one calibration serves every step
    from qlab.errors import QlabError
    from qlab.quant.mixed import float_islands, input_readers, islands_after_calibration

    model, fused, names = _model_fused_and_gemms(build)
    qconfig = build_qconfig(backend="x86", per_channel=True)

    def calibrated(float_layers):
        return _calibrated(model, float_layers, qconfig)

    x = _normalized(16, 5)
    start = calibrated(names[-1:])  # an island given from the start stays one
    with quantized_engine("x86"), torch.no_grad():
        for chosen in (names[1:2], names[2::7], names):
            every = set(chosen) | set(names[-1:])
            again = EagerFlow().convert(calibrated([n for n in names if n in every]), x[:1])
            reused = EagerFlow().convert(islands_after_calibration(start, fused, chosen), x[:1])
            assert float_islands(reused) == float_islands(again) == [n for n in names if n in every]
            assert torch.equal(reused(x), again(x))
        assert float_islands(start) == names[-1:]  # the calibrated model is left as it was
        assert input_readers(fused, x[:1]) == names[:1]  # the stem conv reads the input
    with pytest.raises(QlabError, match="not a conv or linear op"):
        islands_after_calibration(start, fused, ["nonexistent.op"])


@pytest.mark.slow
def test_float_islands_and_the_automatic_mode_through_the_cli(tmp_path):
    run_cli("train.py", "stage=fp32", "name=m", *R20, outputs=tmp_path)
    run_cli("quantize.py", "stage=ptq", "name=m", "tag=-fl", "quant.float_layers=[fc,conv1]",
            *R20, outputs=tmp_path)
    fl = read_metrics(tmp_path / "m" / "ptq-fl" / "metrics.json")
    assert fl["int8"]["float_layers"] == ["fc", "conv1"] == fl["quant"]["float_layers"]
    scripted = torch.jit.load(str(tmp_path / "m" / "ptq-fl" / "model_int8.pt"))
    graph = str(scripted.inlined_graph)  # a float head among INT8 convs
    assert "aten::linear" in graph and "quantized::linear" not in graph and "quantized::conv" in graph
    # the integer model has integer ops only: a clear refusal
    proc = run_cli("quantize.py", "stage=integer", "name=m", "from=ptq-fl", *R20,
                   outputs=tmp_path, check=False)
    assert proc.returncode == 2 and "keeps fc, conv1 in float" in proc.stderr
    # sensitivity of a model with islands: their requantization is an op, their conv is not
    run_cli("quantize.py", "stage=sensitivity", "name=m", "from=ptq-fl", *R20, *SENS,
            outputs=tmp_path)
    sens = json.loads((tmp_path / "m" / "ptq-fl" / "sensitivity" / "sensitivity.json").read_text())
    names = [op["name"] for op in sens["ops"]]
    # conv1's output is read by INT8 ops and requantized; the input and fc's output stay float
    assert "conv1.quant" in names and "fc" not in names and "conv1" not in names
    assert "fc.quant" not in names and "quant" not in names
    assert fl["int8"]["float_boundaries"] == {"input_quantized": False, "requantized": ["conv1"]}
    assert sens["accuracy"]["agreement"] > 0.9

    # the PT2E flow keeps them too (the ONNX file's head is a float Gemm), the ORT flow refuses
    run_cli("quantize.py", "stage=ptq", "name=m", "tag=-pt2e-fl", "quant.flow=pt2e",
            "quant.float_layers=[fc]", *R20, outputs=tmp_path)
    pt2e = read_metrics(tmp_path / "m" / "ptq-pt2e-fl" / "metrics.json")
    assert pt2e["int8"]["float_layers"] == ["fc"] and pt2e["int8"]["flow"] == "pt2e"
    assert all(r["agrees_with_torch"] for r in pt2e["runtimes"].values())
    graph = onnx.load(str(tmp_path / "m" / "ptq-pt2e-fl" / "model_int8.onnx")).graph
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    heads = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    # the head reads a float weight; every conv reads a dequantized one
    assert heads and all(made_by.get(n.input[1]) != "DequantizeLinear" for n in heads)
    assert convs and all(made_by.get(n.input[1]) == "DequantizeLinear" for n in convs)
    proc = run_cli("quantize.py", "stage=ptq", "name=m", "tag=-x", "quant.flow=ort",
                   "quant.float_layers=[fc]", *R20, outputs=tmp_path, check=False)
    assert proc.returncode == 2 and "quant.float_layers does not work with quant.flow=ort" in proc.stderr
    assert "(quant.flow=eager, quant.flow=pt2e)" in proc.stderr

    # automatic: coarse scales (max_shift=2) cost accuracy; ops go back to float, the most
    # helpful first, until the validation drop is within 0 points
    run_cli("quantize.py", "stage=ptq", "name=m", "tag=-auto", "quant.mixed.max_drop=0",
            "quant.max_shift=2", "quant.mixed.images=32", *R20, outputs=tmp_path)
    auto = read_metrics(tmp_path / "m" / "ptq-auto" / "metrics.json")
    mixed = auto["mixed"]
    steps = mixed["steps"]
    assert mixed["val_images"] == 16 and steps[0]["float_layers"] == []
    # met: the last step; not met (every op tried): the step that came closest, fewest islands
    chosen = steps[-1] if steps[-1]["drop"] <= 0 else \
        min(steps, key=lambda st: (st["drop"], len(st["float_layers"])))
    assert mixed["met"] == (steps[-1]["drop"] <= 0) and mixed["val_drop"] == chosen["drop"]
    assert auto["int8"]["float_layers"] == mixed["float_layers"] == chosen["float_layers"]
    if steps[0]["drop"] <= 0:  # all-INT8 already met it (a barely trained net, another CPU)
        assert len(steps) == 1 and mixed["float_layers"] == [] and mixed["ranking"] == []
        return
    assert len(steps) >= 2 and all(s["drop"] > 0 for s in steps[:-1])  # stops when it is met
    # candidates: the 22 conv/linear ops and the input (made float by making conv1, which
    # reads it, an island); a candidate whose islands are all taken already adds no step
    weighted = _model_fused_and_gemms(build_resnet20)[2]
    assert sorted(r["name"] for r in mixed["ranking"]) == sorted(["quant", *weighted])
    assert next(r for r in mixed["ranking"] if r["name"] == "quant")["float_layers"] == ["conv1"]
    layers = []
    for r in mixed["ranking"]:
        new = [n for n in r["float_layers"] if n not in layers]
        if new:
            layers.extend(new)
            if len(layers) == len(steps[-1]["float_layers"]):
                break
    assert steps[-1]["float_layers"] == layers
    assert mixed["met"] or len(steps) == 23  # not met only once every op was tried
    gains = [r["accuracy_only_this_float"] for r in mixed["ranking"]]
    assert gains == sorted(gains, reverse=True)


@pytest.fixture(scope="module")
def resnet20_pt2e():
    from omegaconf import OmegaConf

    from qlab.quant.flows.pt2e import Pt2eFlow

    with quantized_engine("x86"):  # for the module's tests that use it, restored after them
        torch.manual_seed(0)
        quant = OmegaConf.load(Path(__file__).parents[1] / "conf" / "quant" / "po2.yaml")
        quant.backend, quant.per_channel = "x86", True
        model = randomize_batchnorm(build_resnet20()).eval()
        flow, example = Pt2eFlow(), torch.zeros(1, 3, 32, 32)
        prepared = flow.prepare_ptq(model, quant, example)
        calibrate(prepared, [(_images(32, 1), None)], batches=1, mean=MEAN, std=STD)
        yield prepared, flow.convert(prepared, example)


def test_pt2e_graph_simulation_is_the_converted_graph_or_the_float_one(resnet20_pt2e):
    from qlab.quant.sensitivity import GraphSimulation

    prepared, int8 = resnet20_pt2e
    sim = GraphSimulation(int8, prepared)
    kinds = [op.kind for op in sim.ops]
    # one op per quantize node (the input, 21 convs with their ReLU looked through, the adds
    # whose output PT2E quantizes, the pooled features) and the head, which has int8 weights only
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    q_nodes = [n for n in int8.graph.nodes if n.target == quantize]
    assert sum(op.scale > 0 for op in sim.ops) == len(q_nodes) == len(sim.ops) - 1
    assert kinds.count("conv") == 21 and kinds.count("add") >= 8 and kinds.count("pool") == 1
    assert kinds.count("input") == 1 and kinds[-1] == "linear" and sim.ops[-1].scale == 0
    names = [op.name for op in sim.ops]
    assert names[:3] == ["input", "conv1", "layers.0.conv1"] and "layers.3.downsample.0" in names
    x = _normalized(16, 6)
    with torch.no_grad():
        torch.testing.assert_close(sim.set_quantized(names)(x), int8(x), rtol=0, atol=0)
        torch.testing.assert_close(sim.set_quantized(())(x), prepared(x))  # observers: identity
    sim.output_stats([x])
    head = sim.ops[-1]
    assert head.kind == "linear" and head.stats["clipped_fraction"] is None
    assert head.stats["weight_sqnr_db"] > 15 and math.isfinite(head.stats["output_sqnr_db"])
    assert all(op.stats["output_sqnr_db"] > 0 for op in sim.ops)
    with torch.no_grad():  # output_stats leaves the switches as it found them (all off)
        torch.testing.assert_close(sim(x), prepared(x))


@pytest.mark.slow
def test_sensitivity_of_a_pt2e_stage(tmp_path):
    run_cli("train.py", "stage=fp32", "name=p", *R20, outputs=tmp_path)
    run_cli("quantize.py", "stage=ptq", "name=p", "quant.flow=pt2e", "tag=-pt2e", *R20,
            outputs=tmp_path)
    run_cli("quantize.py", "stage=sensitivity", "name=p", "from=ptq-pt2e", *R20, *SENS,
            outputs=tmp_path)
    result = json.loads(
        (tmp_path / "p" / "ptq-pt2e" / "sensitivity" / "sensitivity.json").read_text())
    assert result["flow"] == "pt2e" and result["pt2e_reproduced"] is True
    assert len(result["ops"]) > 30 and result["accuracy"]["agreement"] == 1.0
    assert result["accuracy"]["quantized"] == result["accuracy"]["converted"]
    for op in result["ops"]:
        assert op["accuracy_only_this_quantized"] is not None and op["output_sqnr_db"] is not None
