"""Regression guard for quantization on a learned network: experiment=resnet20_cpu (ResNet-20)
trained until it has clearly learned the synthetic data; PTQ po2 and QAT must stay close to FP32."""

import json

import pytest

from conftest import read_metrics, run_cli

pytestmark = pytest.mark.slow

SYNTH = ["experiment=resnet20_cpu", "data=synthetic", "data.num_train=1024", "data.num_test=512",
         "data.batch_size=64", "trainer.max_epochs=3", "trainer.enable_progress_bar=false",
         "bench.runs=20", "bench.warmup=2", "quant.calib_batches=8", "quant.qat.epochs=1",
         "quant.qat.limit_train_batches=8"]


def test_testbed_quantizes_within_a_few_points_of_fp32(tmp_path):
    run_cli("train.py", "stage=fp32", "name=tb", *SYNTH, outputs=tmp_path)
    fp32 = read_metrics(tmp_path / "tb" / "fp32" / "metrics.json")
    assert fp32["model"]["_target_"] == "qlab.models.build_resnet20"
    assert 1.0 < fp32["size_mb"] < 1.2 and fp32["accuracy"] > 85.0  # clearly learned (chance 10%)
    run_cli("quantize.py", "stage=ptq", "name=tb", *SYNTH, outputs=tmp_path)
    run_cli("train.py", "stage=qat", "name=tb", *SYNTH, outputs=tmp_path)
    ptq = read_metrics(tmp_path / "tb" / "ptq" / "metrics.json")
    qat = read_metrics(tmp_path / "tb" / "qat" / "metrics.json")
    assert ptq["model"] == qat["model"] == fp32["model"]  # the FP32 run's architecture
    # the testbed steps its one-cycle schedule per batch; QAT's cosine must still go per epoch
    qat_cfg = (tmp_path / "tb" / "qat" / ".hydra" / "config.yaml").read_text()
    assert "scheduler_interval: epoch" in qat_cfg and "OneCycleLR" not in qat_cfg
    assert 0.25 < ptq["size_mb"] < 0.4 and 0.25 < qat["size_mb"] < 0.4
    assert ptq["accuracy"] > fp32["accuracy"] - 3.0, (ptq["accuracy"], fp32["accuracy"])
    assert qat["accuracy"] > fp32["accuracy"] - 3.0, (qat["accuracy"], fp32["accuracy"])
    run_cli("quantize.py", "stage=report", "name=tb", *SYNTH, outputs=tmp_path)
    report = json.loads((tmp_path / "tb" / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["FP32", "PTQ", "QAT"]
    assert report["rows"][1]["compression"] > 3.0
