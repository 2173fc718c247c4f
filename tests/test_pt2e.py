"""The PT2E flow: po2 scales in the converted graph, .pt2 and ONNX artifacts that load without
qlab and score what metrics.json says, refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from qlab.errors import QlabError
from qlab.models import build_resnet20

from conftest import read_metrics, run_cli

QUANT = OmegaConf.load("conf/quant/po2.yaml")


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
    rows = flow.scale_table(prepared)
    assert {r["tensor"] for r in rows} == {"weight", "activation"}
    assert sum(r["channels"] for r in rows if r["tensor"] == "weight") == (
        794 if per_channel else 22)
    with torch.inference_mode():
        x = torch.randn(4, 3, 32, 32)
        assert int8(x).shape == (4, 10)


def test_pt2e_refuses_what_it_cannot_do():
    from qlab.quant.flows import get_flow
    from qlab.quant.pt2e import po2_quantization_config

    with pytest.raises(QlabError, match="quant.flow=pt2e takes quant=po2"):
        po2_quantization_config(OmegaConf.merge(QUANT, {"kind": "torch"}), qat=False)
    with pytest.raises(QlabError, match="uint8 affine"):
        po2_quantization_config(OmegaConf.merge(QUANT, {"reduce_range": True}), qat=False)
    with pytest.raises(QlabError, match="quant.flow='tflite' is not known"):
        get_flow("tflite")
    with pytest.raises(QlabError, match="stage=qat with quant.flow=pt2e is not available yet"):
        get_flow("pt2e").qat_callback(QUANT, None, torch.zeros(1, 3, 32, 32))


TINY20 = ["data=synthetic", "data.num_train=96", "data.num_test=64", "data.batch_size=32",
          "data.eval_batch_size=64", "model=resnet20", "trainer.max_epochs=1",
          "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "bench.runs=5",
          "bench.warmup=1", "scheduler=cosine", "quant.calib_batches=2"]


@pytest.mark.slow
def test_ptq_pt2e_writes_artifacts_that_load_without_qlab(tmp_path):
    run_cli("train.py", "stage=fp32", "name=p", *TINY20, outputs=tmp_path)
    fp32 = read_metrics(tmp_path / "p" / "fp32" / "metrics.json")
    assert (tmp_path / "p" / "fp32" / "model_fp32.pt2").is_file()
    # FP32 under ONNX Runtime: float sums in another order, so equal accuracy is expected
    # within a flipped image or two, not required bit for bit
    assert abs(fp32["runtimes"]["onnxruntime"]["accuracy"] - fp32["accuracy"]) <= 2 * 100 / 64
    run_cli("quantize.py", "stage=ptq", "name=p", "quant.flow=pt2e", "tag=-pt2e", *TINY20,
            outputs=tmp_path, timeout=900)
    out = tmp_path / "p" / "ptq-pt2e"
    m = read_metrics(out / "metrics.json")
    assert m["int8"]["flow"] == "pt2e" and m["int8"]["weight_max"] <= 64
    assert m["runtimes"]["onnxruntime"]["agrees_with_torch"] is True
    from qlab.data import synthetic_split

    x, y = synthetic_split(num_images=64, num_classes=10, image_size=32, noise=0.1, seed=42,
                           split="test")
    import torchao  # noqa: F401  (registers the quantized_decomposed ops the program uses)

    extra = {"qlab.json": ""}
    program = torch.export.load(str(out / "model_int8.pt2"), extra_files=extra)
    assert json.loads(extra["qlab.json"])["flow"] == "pt2e"
    with torch.inference_mode():
        logits = program.module()(x.float() / 255)
    assert 100.0 * (logits.argmax(1) == y).float().mean().item() == pytest.approx(m["accuracy"])
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(None, {"image": (x.float() / 255).numpy()})[0])
    assert torch.equal(onnx_logits.argmax(1), logits.argmax(1))
    # a fresh process with only torch and torchao loads it (torchao registers the q/dq ops)
    import subprocess
    import sys

    pt2 = str(out / "model_int8.pt2")
    code = (f"import torch, torchao; m = torch.export.load({pt2!r}).module(); "
            f"print(tuple(m(torch.rand(3, 3, 32, 32)).shape))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "(3, 10)", proc.stderr[-2000:]
    # the outside baseline: ONNX Runtime's quantize_static on the same calibration batches
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
