"""The PT2E flow: po2 scales in the converted graph, .pt2 and ONNX artifacts that load without
qlab and score what metrics.json says, refusals."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from qlab.errors import QlabError
from qlab.models import build_resnet20

from conftest import ROOT, read_metrics, run_cli

QUANT = OmegaConf.load(ROOT / "conf" / "quant" / "po2.yaml")


def _scales(graph_module) -> list[float]:
    """Every scale argument of a quantize/dequantize op in the converted graph."""
    found = []
    for node in graph_module.graph.nodes:
        name = str(node.target)
        if node.op != "call_function" or "quantize_per_" not in name:
            continue
        scale = node.args[1]
        if isinstance(scale, torch.fx.Node):  # per-channel scales are graph constants
            found += getattr(graph_module, scale.target).flatten().tolist()
        else:
            found.append(float(scale))
    return found


@pytest.mark.parametrize("per_channel", [False, True])
def test_every_scale_in_the_converted_graph_is_a_clamped_power_of_two(per_channel):
    from qlab.quant.flows import get_flow

    flow = get_flow("pt2e")
    quant = OmegaConf.merge(QUANT, {"per_channel": per_channel})
    torch.manual_seed(0)
    model = build_resnet20(num_classes=10)
    example = torch.zeros(1, 3, 32, 32)
    prepared = flow.prepare_ptq(model, quant, example)
    with torch.inference_mode():
        prepared(torch.randn(16, 3, 32, 32) * 3)
    int8 = flow.convert(prepared, example)
    scales = _scales(int8)
    assert len(scales) > 40
    for s in scales:
        mantissa, exp = math.frexp(s)
        assert mantissa == 0.5 and -8 <= exp - 1 <= 8, s
    assert flow.weight_max(int8) <= 64  # quant.target=portable
    weights = [n for n in int8.graph.nodes if "dequantize_per_channel" in str(n.target)]
    assert len(weights) == 22  # per-tensor too: the per-channel form inductor lowers
    shared = [bool((s == s[0]).all()) for s in (getattr(int8, n.args[1].target) for n in weights)]
    assert all(shared) if not per_channel else not all(shared)
    rows = flow.scale_table(prepared)
    assert {r["tensor"] for r in rows} == {"weight", "activation"}
    assert sum(r["channels"] for r in rows if r["tensor"] == "weight") == (
        794 if per_channel else 22)
    with torch.inference_mode():
        x = torch.randn(4, 3, 32, 32)
        assert int8(x).shape == (4, 10)


@pytest.mark.parametrize("residual_add", ["int8", "fused"])
def test_residual_add_inputs_are_int8_or_fused_as_configured(residual_add):
    """int8: both inputs of every residual add come out of a dequantize (the eager flow's
    placement); fused: X86InductorQuantizer leaves the convolution output in float."""
    from qlab.quant.flows import get_flow

    flow = get_flow("pt2e")
    quant = OmegaConf.merge(QUANT, {"pt2e": {"residual_add": residual_add}})
    torch.manual_seed(0)
    example = torch.zeros(1, 3, 32, 32)
    prepared = flow.prepare_ptq(build_resnet20(num_classes=10), quant, example)
    with torch.inference_mode():
        prepared(torch.randn(8, 3, 32, 32))
    int8 = flow.convert(prepared, example)
    adds = [n for n in int8.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert len(adds) == 9
    dequantized = [all("dequantize" in str(a.target) for a in n.args[:2]) for n in adds]
    assert all(dequantized) if residual_add == "int8" else not any(dequantized)


@pytest.mark.slow  # several torch.export graphs: tens of seconds
def test_float_islands_in_the_pt2e_flow():
    """quant.float_layers: the named conv/linear read float weights and inputs; every other
    conv keeps its int8 weights; the graph still runs, and a wrong name is explained."""
    from qlab.quant.flows import get_flow
    from qlab.quant.pt2e import GEMM_OPS

    flow = get_flow("pt2e")
    torch.manual_seed(0)
    example = torch.zeros(1, 3, 32, 32)
    model = build_resnet20(num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)

    def convert(float_layers):
        quant = OmegaConf.merge(QUANT, {"float_layers": float_layers})
        prepared = flow.prepare_ptq(copy.deepcopy(model), quant, example)
        with torch.inference_mode():
            prepared(x)
        return flow.convert(prepared, example)

    def quantized_inputs(gm) -> dict[str, bool]:
        """module path of each conv/linear -> whether its input and weight are dequantized."""
        return {list(n.meta["nn_module_stack"].values())[-1][0]:
                all("dequantize" in str(a.target) for a in n.args[:2])
                for n in gm.graph.nodes if n.target in GEMM_OPS}

    plain, mixed = convert([]), convert(["conv1", "layers.4.conv2", "fc"])
    assert all(quantized_inputs(plain).values()) and len(quantized_inputs(plain)) == 22
    floats = [n for n, q in quantized_inputs(mixed).items() if not q]
    assert floats == ["conv1", "layers.4.conv2", "fc"]
    with torch.inference_mode():
        assert torch.isfinite(mixed(x)).all() and mixed(x).shape == (8, 10)
    assert flow.weight_max(mixed) <= 64
    with pytest.raises(QlabError, match="layers.0.conv9 is not a conv or linear op.*conv1"):
        convert(["layers.0.conv9"])

    # QAT: a conv island (followed by BN) trains in float and stays float after convert
    from types import SimpleNamespace

    holder = SimpleNamespace(model=copy.deepcopy(model))
    quant = OmegaConf.merge(QUANT, {"float_layers": ["layers.4.conv2"]})
    flow.qat_callback(quant, None, example).setup(None, holder, "fit")
    qat = holder.model
    loss = torch.nn.functional.cross_entropy(qat(x), torch.randint(0, 10, (8,)))
    loss.backward()
    qat.eval()
    int8 = flow.convert(qat, example)
    assert [n for n, q in quantized_inputs(int8).items() if not q] == ["layers.4.conv2"]
    with torch.inference_mode():
        assert torch.isfinite(int8(x)).all()


def test_pt2e_refuses_what_it_cannot_do():
    from qlab.quant.flows import get_flow
    from qlab.quant.pt2e import po2_quantization_config

    with pytest.raises(QlabError, match="quant.flow=pt2e takes quant=po2"):
        po2_quantization_config(OmegaConf.merge(QUANT, {"kind": "torch"}), qat=False)
    with pytest.raises(QlabError, match="uint8 affine"):
        po2_quantization_config(OmegaConf.merge(QUANT, {"reduce_range": True}), qat=False)
    with pytest.raises(QlabError, match="quant.pt2e.residual_add='float'"):
        get_flow("pt2e").prepare_ptq(build_resnet20(num_classes=10), OmegaConf.merge(
            QUANT, {"pt2e": {"residual_add": "float"}}), torch.zeros(1, 3, 32, 32))
    with pytest.raises(QlabError, match="quant.flow='tflite' is not known"):
        get_flow("tflite")


def _bn_training_flags(gm) -> set:
    from qlab.quant.pt2e import _BATCH_NORMS

    return {n.args[5] for n in gm.graph.nodes if n.target in _BATCH_NORMS}


@pytest.mark.slow  # export, fake-quant training and conversion: tens of seconds
def test_qat_pt2e_trains_freezes_on_schedule_and_converts_to_po2():
    """The PT2E QAT callback on a LightningModule-like holder: fake-quant training steps move
    the weights, BN freezing survives train()/eval() switches, frozen observers stop moving the
    scales, and convert_pt2e folds BN and leaves po2 scales that match the fake-quant model."""
    from types import SimpleNamespace

    from qlab.quant.flows import get_flow

    flow = get_flow("pt2e")
    torch.manual_seed(0)
    holder = SimpleNamespace(model=build_resnet20(num_classes=10))
    cb = flow.qat_callback(QUANT, None, torch.zeros(1, 3, 32, 32))
    cb.setup(None, holder, "fit")
    cb.setup(None, holder, "fit")  # idempotent: a second setup (e.g. test) changes nothing
    qat = holder.model
    assert isinstance(qat, torch.fx.GraphModule) and _bn_training_flags(qat) == {True}
    opt = torch.optim.SGD(qat.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    before = qat.conv1.weight.detach().clone()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(qat(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, qat.conv1.weight)
    epoch = SimpleNamespace(current_epoch=QUANT.qat.freeze_bn_epoch)  # BN frozen, observers not
    cb.on_train_epoch_start(epoch, holder)
    assert _bn_training_flags(qat) == {False}
    mean = qat.bn1.running_mean.clone()
    qat(x)
    assert torch.equal(mean, qat.bn1.running_mean)  # frozen: running stats not updated
    qat.eval()
    qat.train()  # Lightning switches around validation: BN must stay frozen
    assert _bn_training_flags(qat) == {False}
    cb.on_train_epoch_start(SimpleNamespace(current_epoch=QUANT.qat.freeze_observer_epoch),
                            holder)
    scales = {k: v.clone() for k, v in qat.state_dict().items() if k.endswith(".scale")}
    assert len(scales) > 40
    qat(x * 4)  # a wider input would widen a live observer
    assert all(torch.equal(v, qat.state_dict()[k]) for k, v in scales.items())
    qat.eval()
    with torch.no_grad():
        fake = qat(x)
    int8 = flow.convert(qat, torch.zeros(1, 3, 32, 32))
    assert not _bn_training_flags(int8)  # BN folded into the convolutions
    for s in _scales(int8):
        mantissa, exp = math.frexp(s)
        assert mantissa == 0.5 and -8 <= exp - 1 <= 8, s
    assert flow.weight_max(int8) <= 64
    rows = flow.scale_table(qat)
    assert sum(r["tensor"] == "weight" for r in rows) == 22  # 21 convs + fc
    with torch.inference_mode():
        real = int8(x)
    assert (real.argmax(1) == fake.argmax(1)).float().mean() >= 0.9


TINY20 = ["data=synthetic", "data.num_train=96", "data.num_test=64", "data.batch_size=32",
          "data.eval_batch_size=64", "model=resnet20", "trainer.max_epochs=1",
          "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "bench.runs=5",
          "bench.warmup=1", "scheduler=cosine", "quant.calib_batches=2"]


def _check_artifacts(out, metrics: dict, x, y) -> None:
    """A PT2E stage's model_int8.pt2 (plain torch), model_int8_pt2e.pt2 (with torchao) and
    model_int8.onnx (onnxruntime) score what its metrics.json says on the test images, and every
    runtime the stage measured agrees with the converted model."""
    import subprocess
    import sys

    import onnxruntime as ort

    assert {"torch.export", "inductor", "onnxruntime"} <= set(metrics["runtimes"])
    lowered = metrics["int8"]["inductor_int8_kernels"]  # int8 kernels, not float convs
    assert lowered["conv"] == 21 and lowered["linear"] == 1, lowered
    assert metrics["runtimes"]["torch.export"]["agrees_with_torch"] is True  # same graph
    # exact integer math; ResNet-20's adds feed a ReLU (output zero point 0), so ONNX Runtime's
    # zero point before rounding (test below) cannot show
    assert metrics["runtimes"]["onnxruntime"]["agrees_with_torch"] is True
    # inductor's oneDNN kernels add the output zero point before rounding (the reference after):
    # ties with an odd zero point land one step apart, so an image may flip, no more here
    assert abs(metrics["runtimes"]["inductor"]["accuracy"] - metrics["accuracy"]) <= 100 / 64
    # plain torch, nothing else imported: the portable program
    code = ("import sys, torch; x = torch.load(sys.argv[2]); "
            "m = torch.export.load(sys.argv[1]).module(); "
            "torch.save(m(x).detach(), sys.argv[3]); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('qlab', 'torchao')))")
    torch.save(x.float() / 255, out / "x.pt")
    proc = subprocess.run([sys.executable, "-c", code, str(out / "model_int8.pt2"),
                           str(out / "x.pt"), str(out / "logits.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
    logits = torch.load(out / "logits.pt")
    assert 100.0 * (logits.argmax(1) == y).float().mean().item() == pytest.approx(
        metrics["accuracy"])
    import torchao  # noqa: F401  (registers the quantized_decomposed ops of the q/dq program)

    extra = {"qlab.json": ""}
    program = torch.export.load(str(out / "model_int8_pt2e.pt2"), extra_files=extra)
    assert json.loads(extra["qlab.json"])["flow"] == "pt2e"
    with torch.inference_mode():
        assert torch.equal(program.module()(x.float() / 255), logits)  # the same numbers
    session = ort.InferenceSession(str(out / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(None, {"image": (x.float() / 255).numpy()})[0])
    assert torch.equal(onnx_logits.argmax(1), logits.argmax(1))


@pytest.mark.slow
def test_pt2e_ptq_and_qat_write_artifacts_that_load_without_qlab(tmp_path):
    run_cli("train.py", "stage=fp32", "name=p", *TINY20, outputs=tmp_path)
    fp32 = read_metrics(tmp_path / "p" / "fp32" / "metrics.json")
    assert (tmp_path / "p" / "fp32" / "model_fp32.pt2").is_file()
    # FP32 under ONNX Runtime: float sums in another order, so equal accuracy is expected
    # within a flipped image or two, not required bit for bit
    for runtime in ("onnxruntime", "inductor"):
        assert abs(fp32["runtimes"][runtime]["accuracy"] - fp32["accuracy"]) <= 2 * 100 / 64
    run_cli("quantize.py", "stage=ptq", "name=p", "quant.flow=pt2e", "tag=-pt2e", *TINY20,
            outputs=tmp_path, timeout=900)
    out = tmp_path / "p" / "ptq-pt2e"
    m = read_metrics(out / "metrics.json")
    assert m["int8"]["flow"] == "pt2e" and m["int8"]["weight_max"] <= 64
    assert m["runtimes"]["onnxruntime"]["agrees_with_torch"] is True
    from qlab.data import synthetic_split

    x, y = synthetic_split(num_images=64, num_classes=10, image_size=32, noise=0.1, seed=42,
                           split="test")
    _check_artifacts(out, m, x, y)
    # QAT down the same path: the exported graph fine-tuned under Lightning, then converted
    run_cli("train.py", "stage=qat", "name=p", "quant.flow=pt2e", "tag=-pt2e", *TINY20,
            outputs=tmp_path, timeout=900)
    mq = read_metrics(tmp_path / "p" / "qat-pt2e" / "metrics.json")
    assert mq["int8"]["flow"] == "pt2e" and mq["scales"]["weight"]["scales"] == 22
    assert mq["runtimes"]["onnxruntime"]["agrees_with_torch"] is True
    _check_artifacts(tmp_path / "p" / "qat-pt2e", mq, x, y)
    # the outside baseline: ONNX Runtime's quantize_static on the same calibration batches
    import onnxruntime as ort

    run_cli("quantize.py", "stage=ptq", "name=p", "quant.flow=ort", "tag=-ort", *TINY20,
            outputs=tmp_path, timeout=900)
    mo = read_metrics(tmp_path / "p" / "ptq-ort" / "metrics.json")
    assert mo["int8"]["kind"] == "onnxruntime-minmax" and mo["int8"]["weight_max"] <= 64
    session = ort.InferenceSession(str(tmp_path / "p" / "ptq-ort" / "model_int8.onnx"),
                                   providers=["CPUExecutionProvider"])
    ort_logits = torch.from_numpy(session.run(None, {"image": (x.float() / 255).numpy()})[0])
    assert 100.0 * (ort_logits.argmax(1) == y).float().mean().item() == pytest.approx(
        mo["accuracy"])
    proc = run_cli("quantize.py", "stage=ptq", "name=p", "quant.flow=ort", "quant.target=vnni",
                   "tag=-ort8", *TINY20, outputs=tmp_path, check=False)
    assert proc.returncode == 2 and "only quant.target=portable" in proc.stderr
    # the integer export reads eager models only, and says so
    proc = run_cli("quantize.py", "stage=integer", "name=p", "from=ptq-pt2e", *TINY20,
                   outputs=tmp_path, check=False)
    assert proc.returncode == 2 and "quant.flow=pt2e" in proc.stderr
    # peers in one report: every runtime of every stage, timed in one process
    run_cli("quantize.py", "stage=ptq", "name=p", *TINY20, outputs=tmp_path)
    run_cli("quantize.py", "stage=report", "name=p", *TINY20, outputs=tmp_path, timeout=900)
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    rows = {(r["model"], r["runtime"]): r for r in report["runtimes"]}
    assert {("FP32", "eager"), ("FP32", "torchscript-frozen"), ("FP32", "torch.export"),
            ("FP32", "inductor"), ("FP32", "onnxruntime"), ("PTQ", "torchscript-frozen"),
            ("PTQ-PT2E", "torch.export"), ("PTQ-PT2E", "inductor"), ("PTQ-PT2E", "onnxruntime"),
            ("QAT-PT2E", "inductor"), ("PTQ-ORT", "onnxruntime")} <= set(rows)
    assert rows[("PTQ-ORT", "onnxruntime")]["accuracy"] == mo["accuracy"]
    assert rows[("PTQ-PT2E", "onnxruntime")]["accuracy"] == m["runtimes"]["onnxruntime"]["accuracy"]
    # the FP32 stage's accuracy is the float32 test (re-run so after bf16 training): the
    # float32 forms claim it, whatever trainer.precision resolved to on this CPU
    assert fp32["precision"].startswith("32") or "accuracy_autocast" in fp32
    assert rows[("FP32", "eager")]["accuracy"] == fp32["accuracy"]
    assert rows[("FP32", "torchscript-frozen")]["accuracy"] == fp32["accuracy"]
    assert rows[("FP32", "onnxruntime")]["accuracy"] == fp32["runtimes"]["onnxruntime"]["accuracy"]
    fastest_fp32 = min(r["latency_ms"] for (model, _), r in rows.items() if model == "FP32")
    for r in rows.values():
        assert r["latency_ms"] > 0
        assert r["speedup"] == pytest.approx(fastest_fp32 / r["latency_ms"])
    text = (tmp_path / "p" / "report.md").read_text()
    assert "## Runtimes" in text and "| PTQ-PT2E | inductor |" in text


def test_a_large_model_exports_to_one_self_contained_onnx_file(tmp_path):
    """ResNet-50's 94 MB of weights once went to a side file named after the temporary file;
    every .onnx is one file that loads from its bytes alone."""
    from qlab import artifacts
    from qlab.runtimes import OnnxRuntime

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8192),
                                torch.nn.Linear(8192, 10)).eval()
    artifacts.save_exported(tmp_path, "big", model, torch.zeros(1, 3, 32, 32), {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.pt2"]
    x = torch.rand(3, 3, 32, 32)
    got = OnnxRuntime.from_bytes((tmp_path / "big.onnx").read_bytes())(x)
    with torch.inference_mode():
        assert torch.allclose(got, model(x), atol=1e-4)


def test_onnx_biases_become_int32_on_their_grid_with_identical_outputs(tmp_path):
    """The QDQ file's float biases rewritten as DequantizeLinear(int32, s_x * s_w): ONNX
    Runtime's outputs unchanged bit for bit; a bias off its grid is refused."""
    import copy

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from qlab import artifacts
    from qlab.quant.flows import get_flow
    from qlab.quant.onnx_qdq import int32_biases
    from qlab.runtimes import OnnxRuntime

    flow = get_flow("pt2e")
    torch.manual_seed(0)
    model = build_resnet20(num_classes=10)
    for m in model.modules():  # non-trivial biases after BN folding
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.3, 0.3)
    example = torch.zeros(1, 3, 32, 32)
    prepared = flow.prepare_ptq(model, QUANT, example)
    with torch.inference_mode():
        prepared(torch.randn(16, 3, 32, 32))
    int8 = flow.convert(prepared, example)
    ex2 = torch.zeros(2, 3, 32, 32)
    artifacts.save_onnx(artifacts.export_program(int8, ex2), ex2, tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    fixed, changed = int32_biases(copy.deepcopy(proto))
    assert changed == 22  # 21 convolutions and the classifier
    ints = [i for i in fixed.graph.initializer if i.name.endswith("_int32")]
    assert len(ints) == 22 and all(i.data_type == onnx.TensorProto.INT32 for i in ints)
    x = torch.rand(32, 3, 32, 32)
    before = OnnxRuntime.from_bytes(proto.SerializeToString())(x)
    after = OnnxRuntime.from_bytes(fixed.SerializeToString())(x)
    assert torch.equal(before, after)
    bias = next(i for i in proto.graph.initializer if i.name.endswith("weight_bias"))
    off = numpy_helper.to_array(bias).copy()
    off[0] += np.float32(1e-7)  # off the grid
    bias.CopyFrom(numpy_helper.from_array(off, bias.name))
    with pytest.raises(QlabError, match="not on its int32 grid"):
        int32_biases(proto)


def test_flows_keep_no_state_between_calls(tmp_path):
    """Each flow call returns what the next one needs: two models prepared by one ORT flow with
    other options convert each with its own, and export returns the runtimes and what it found."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from qlab.quant.flows import get_flow
    from qlab.quant.flows.base import Exported

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 4)).eval()
    example = torch.zeros(1, 3, 8, 8)
    flow = get_flow("ort")
    quant = OmegaConf.merge(QUANT, {"per_channel": True})
    per_channel = flow.prepare_ptq(net, quant, example)
    per_tensor = flow.prepare_ptq(net, OmegaConf.merge(QUANT, {"per_channel": False}), example)
    for prepared in (per_channel, per_tensor):
        prepared(torch.randn(16, 3, 8, 8))
    assert vars(flow) == {}

    def weight_scales(int8) -> list[int]:
        inits = {i.name: numpy_helper.to_array(i) for i in int8.proto.graph.initializer}
        return sorted(np.size(inits[n.input[1]]) for n in int8.proto.graph.node
                      if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                      and inits[n.input[0]].dtype == np.int8)

    assert weight_scales(flow.convert(per_channel, example)) == [4, 8]  # one per output channel
    int8 = flow.convert(per_tensor, example)
    assert weight_scales(int8) == [1, 1]
    exported = flow.export(int8, (0.5,) * 3, (0.25,) * 3, tmp_path, meta={}, example=example)
    assert isinstance(exported, Exported) and exported.runtimes == {} and exported.info == {}
    x = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(exported.deployable(x), int8((x - 0.5) / 0.25))
    assert onnx.load(str(tmp_path / "model_int8.onnx")).graph.input[0].name == "image"
    assert vars(flow) == {}
