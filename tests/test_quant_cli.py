"""fp32 -> ptq -> qat -> report through the real entry points, on tiny synthetic data."""

import json
import os
import shutil

import pytest
import torch

from qlab import artifacts
from qlab.hardware import resolve_engine

from conftest import AVX2_ONLY, TINY, X86, read_metrics, run_cli

QUICK = [*TINY, "quant.calib_batches=2"]


@pytest.fixture(scope="module")
def fp32_seed(tmp_path_factory):
    """One FP32 run for the module, never written to after it is made."""
    outputs = tmp_path_factory.mktemp("outputs")
    run_cli("train.py", "stage=fp32", "name=q", *TINY, outputs=outputs)
    return outputs


@pytest.fixture
def fp32_run(fp32_seed, tmp_path):
    """A private copy of that run: what one test writes there, no other test reads."""
    shutil.copytree(fp32_seed, tmp_path / "outputs")
    return tmp_path / "outputs"


@pytest.mark.slow  # end to end through the CLI: tens of seconds
def test_ptq_qat_report(fp32_run):
    run_cli("quantize.py", "stage=ptq", "name=q", *QUICK, outputs=fp32_run)
    ptq = fp32_run / "q" / "ptq"
    for f in ("metrics.json", "model_int8.pt", "model_int8_state_dict.pt", "confusion_matrix.png",
              "scales.csv", "scales.md"):
        assert (ptq / f).is_file(), f
    m = read_metrics(ptq / "metrics.json")
    assert m["stage"] == "ptq" and m["backend"] == resolve_engine("auto") and m["calib_images"] == 64
    hw = m["hardware"]
    assert hw["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and hw["precision"] is None
    assert hw["engine"] == m["backend"] and hw["reduce_range"] is False and hw["int8_target"] == "portable"
    assert m["int8"]["weight_max"] <= 64 and m["int8"]["quantized_for"].startswith("every CPU")
    assert 23.5 < m["size_mb"] < 24.3  # INT8 ResNet-50: about a quarter of 94.4 MB
    assert m["scales"]["weight"]["scales"] == 54 and m["quant"]["kind"] == "po2"
    # the exported INT8 file loads with plain torch.jit.load and reproduces metrics.json
    extra = {"qlab.json": ""}
    scripted = torch.jit.load(str(ptq / "model_int8.pt"), _extra_files=extra)
    assert json.loads(extra["qlab.json"])["weight_max"] == m["int8"]["weight_max"]
    from qlab.data import synthetic_split

    x, y = synthetic_split(num_images=64, num_classes=10, image_size=32, noise=0.1, seed=42,
                           split="test")
    with torch.no_grad():
        acc = 100.0 * (scripted(x.float() / 255).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(m["accuracy"])

    # QUICK carries the FP32 stage's optimizer.lr=0.05; QAT fine-tunes at quant.qat.lr all the same
    proc = run_cli("train.py", "stage=qat", "name=q", *QUICK, "quant.qat.lr=0.002",
                   outputs=fp32_run)
    assert "optimizer.lr=0.05 from the command line is the FP32 stage's" in proc.stdout + proc.stderr
    qat = fp32_run / "q" / "qat"
    mq = read_metrics(qat / "metrics.json")
    assert mq["lr"] == 0.002 and mq["quant"]["qat"]["lr"] == 0.002
    assert (qat / "curves.png").is_file() and (qat / "model_int8.pt").is_file()
    assert mq["stage"] == "qat" and 23.5 < mq["size_mb"] < 24.3
    assert "fake_quant_accuracy" in mq and mq["epochs"] == 1
    cfg = (qat / ".hydra" / "config.yaml").read_text()
    assert "precision: 32" in cfg and mq["precision"] == mq["hardware"]["precision"] == "32"

    # a tagged variant lands beside ptq/ without replacing it, and the report lists it too
    run_cli("quantize.py", "stage=ptq", "name=q", "quant=torch", "tag=-torch", *QUICK,
            outputs=fp32_run)
    mt = read_metrics(fp32_run / "q" / "ptq-torch" / "metrics.json")
    assert mt["quant"]["kind"] == "torch" and read_metrics(ptq / "metrics.json")["quant"]["kind"] == "po2"

    proc = run_cli("quantize.py", "stage=report", "name=q", *QUICK, outputs=fp32_run)
    report = json.loads((fp32_run / "q" / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["FP32", "PTQ", "QAT", "PTQ-TORCH"]
    assert not report["missing"]
    fp32_row, ptq_row = report["rows"][0], report["rows"][1]
    assert fp32_row["speedup"] == pytest.approx(1.0) and ptq_row["compression"] > 3.8
    assert ptq_row["accuracy_drop"] == pytest.approx(fp32_row["accuracy"] - ptq_row["accuracy"])
    assert "| Model | Size (MB) | Compression | Accuracy (%) | Loss |" in proc.stdout
    assert report["hardware"]["cpu_capability"] and report["made_on"]["ptq"] == hw
    assert (fp32_run / "q" / "report.png").is_file() and (fp32_run / "q" / "report.md").is_file()
    # where each figure was selected: FP32 and QAT on validation images carved from train
    assert report["selected_on"] == {"fp32": "val", "ptq": None, "qat": "val", "ptq-torch": None}
    text = (fp32_run / "q" / "report.md").read_text()
    n_val = read_metrics(fp32_run / "q" / "fp32" / "metrics.json")["num_val_images"]
    assert n_val > 0 and f"- fp32: checkpoint selected on {n_val} validation images" in text
    assert f"- ptq: calibrated on {read_metrics(ptq / 'metrics.json')['calib_images']}" in text


@pytest.mark.slow  # end to end through the CLI: tens of seconds
@pytest.mark.skipif(not X86, reason="x86 kernels")
def test_full_int8_weights_are_refused_where_the_kernels_saturate(fp32_run):
    # an AVX2-only CPU, reproduced here by the kernels' ISA switches: 8-bit weights would
    # overflow int16 pair sums, so PTQ with quant.target=vnni stops before writing a wrong model
    avx2 = AVX2_ONLY
    proc = run_cli("quantize.py", "stage=ptq", "name=q", "quant.target=vnni", "tag=-vnni", *QUICK,
                   outputs=fp32_run, env=avx2, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "quant.target=portable" in proc.stderr and "saturate" in proc.stderr
    assert not (fp32_run / "q" / "ptq-vnni" / "model_int8.pt").exists()
    run_cli("quantize.py", "stage=ptq", "name=q", "tag=-avx2", *QUICK, outputs=fp32_run, env=avx2)
    m = read_metrics(fp32_run / "q" / "ptq-avx2" / "metrics.json")
    assert m["backend"] == "x86" and m["hardware"]["int8_saturates"] is True
    assert m["hardware"]["isa_limits"] == avx2 and m["int8"]["weight_max"] <= 64


@pytest.mark.slow  # end to end through the CLI: tens of seconds
def test_report_marks_missing_stages(tmp_path):
    run_cli("train.py", "stage=fp32", "name=only", *TINY, outputs=tmp_path)
    proc = run_cli("quantize.py", "stage=report", "name=only", *QUICK, outputs=tmp_path)
    report = json.loads((tmp_path / "only" / "report.json").read_text())
    assert report["missing"] == ["ptq", "qat"]
    load = report["cpu_load"]  # read before timing, and said in report.md when the CPU was busy
    assert load["cores"] == os.cpu_count() and 0 <= load["busy_cores"] <= load["cores"]
    busy = "The CPU was busy when timing began" in (tmp_path / "only" / "report.md").read_text()
    assert busy == (load["busy_cores"] >= 0.5)
    assert "| PTQ | missing |" in proc.stdout


def test_report_figure_shows_every_variant_by_size_and_latency(tmp_path):
    """Each model a named point on both trade-off charts, names not on top of one another, even
    where variants lie close together; only FP32 trained here (QAT variants have no curves)."""
    from matplotlib.text import Text

    from qlab.stages.report import report_figure

    classes = ["a", "b"]
    found, rows = {}, []
    variants = [("fp32", 7.9, 89.88, 10.9, None), ("ptq", 2.01, 88.98, 9.9, None),
                ("ptq-s12", 2.01, 88.84, 1.57, None), ("ptq-s12-pt2e", 2.00, 88.88, 2.15, None),
                ("ptq-s12-ceil", 2.01, 89.60, 1.40, None), ("ptq-torch", 2.01, 89.78, 9.6, None),
                ("qat-s12-ceil-w4", 1.03, 89.28, 1.93, "4-bit weights"),
                ("ptq-s12-ceil-w4", 1.03, 87.88, 1.40, "4-bit weights")]
    for stage, size, acc, lat, prec in variants:
        found[stage] = {"confusion_matrix": [[3, 1], [0, 4]], "classes": classes, "accuracy": acc}
        rows.append({"model": stage.upper(), "missing": False, "size_mb": size, "accuracy": acc,
                     "latency_ms": lat, "precision": prec})
    rows.append({"model": "QAT", "missing": True})
    (tmp_path / "fp32" / "csv").mkdir(parents=True)
    (tmp_path / "fp32" / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss,train/acc,val/loss,val/acc\n0,9,1.5,0.4,,\n0,9,,,1.4,0.5\n"
        "1,19,1.2,0.6,,\n1,19,,,1.1,0.65\n")
    fig = report_figure(tmp_path, found, rows)
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert titles[:2] == ["FP32: loss", "FP32: accuracy"]
        charts = {ax.get_xlabel(): ax for ax in fig.axes if ax.get_title().startswith("accuracy vs")}
        assert set(charts) == {"size (MB)", "latency (ms, one image)"}
        fig.canvas.draw()  # as saved: the names' boxes where they are drawn
        renderer = fig.canvas.get_renderer()
        for ax in charts.values():
            assert ax.get_ylabel() == "test accuracy (%)" and ax.get_xscale() == "log"
            names = [t for t in ax.texts if t.get_text() in {r["model"] for r in rows}]
            assert sorted(t.get_text() for t in names) == sorted(v[0].upper() for v in variants)
            boxes = [Text.get_window_extent(t, renderer) for t in names]
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
            colours = {tuple(line.get_color()) if not isinstance(line.get_color(), str)
                       else line.get_color() for line in ax.lines if line.get_marker() == "o"}
            assert colours == {"tab:blue", "tab:orange"}  # mixed precision stands out
        confusion = [t for t in titles if "(" in t and "%" in t]
        assert len(confusion) == len(variants)
    finally:
        artifacts.plt.close(fig)


def test_saved_files_do_not_depend_on_the_temporary_name(tmp_path, monkeypatch):
    """size_mb is a file size: the same model saved by two processes gives the same bytes, and
    a failed write leaves neither a file nor a temporary folder behind."""
    import zipfile

    from qlab.models import build_resnet20

    model = build_resnet20(num_classes=10)
    sizes = []
    for pid, folder in ((7, "a"), (123456, "b")):
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        sizes.append(artifacts.save_state_dict(tmp_path / folder / "model.pt", model))
        names = zipfile.ZipFile(tmp_path / folder / "model.pt").namelist()
        assert all(n.startswith("model/") for n in names)  # the archive is named after the file
    assert sizes[0] == sizes[1]
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        artifacts.atomic_write(tmp_path / "a" / "model.pt", fail)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.pt"]
    assert zipfile.ZipFile(tmp_path / "a" / "model.pt").namelist()  # the old file is intact


def test_a_busy_cpu_is_named_beside_the_latency():
    from qlab.bench import load_warning

    assert load_warning({"busy_cores": 0.3, "cores": 2, "measured": "m"}) is None
    assert load_warning({"busy_cores": None, "cores": 2, "measured": "m"}) is None  # unknown
    busy = load_warning({"busy_cores": 1.9, "cores": 2, "measured": "/proc/stat over 1 s"})
    assert "1.9 of 2 cores in use by other work, /proc/stat over 1 s" in busy
    assert "idle CPU" in busy


def test_cpu_load_sees_other_work(tmp_path):
    import subprocess
    import sys

    from qlab.bench import cpu_load

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat: the load average is used instead")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        load = cpu_load(seconds=1.0)
    finally:
        spin.kill()
        spin.wait()
    assert load["measured"] == "/proc/stat over 1 s"
    assert 0.8 <= load["busy_cores"] <= load["cores"]  # one spinning process is a core's worth


@pytest.mark.parametrize("script,stage", [("quantize.py", "ptq"), ("train.py", "qat")])
def test_quantizing_without_an_fp32_run_says_how_to_make_one(tmp_path, script, stage):
    proc = run_cli(script, f"stage={stage}", "name=ghost", *QUICK, outputs=tmp_path, check=False,
                   timeout=180)
    assert proc.returncode == 2
    assert "python train.py stage=fp32 name=ghost" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # end to end through the CLI: tens of seconds
def test_ptq_bad_inputs(tmp_path):
    (tmp_path / "cut.pt").write_bytes(b"\x80\x02garbage")
    proc = run_cli("quantize.py", "stage=ptq", "name=x", f"fp32_ckpt={tmp_path}/cut.pt", *QUICK,
                   outputs=tmp_path, check=False, timeout=180)
    assert proc.returncode == 2 and "corrupt" in proc.stderr
    from qlab.models import build_resnet50

    torch.save(build_resnet50(num_classes=4, stem="imagenet").state_dict(), tmp_path / "four.pt")
    proc = run_cli("quantize.py", "stage=ptq", "name=x", f"fp32_ckpt={tmp_path}/four.pt", *QUICK,
                   outputs=tmp_path, check=False, timeout=180)
    assert proc.returncode == 2 and "trained for 4 classes" in proc.stderr
    torch.save(build_resnet50(stem="imagenet").state_dict(), tmp_path / "ok.pt")
    for bad, msg in (("quant.calib_batches=0", "at least one batch"),
                     ("quant.device=cuda", "CPU only"), ("quant.backend=tpu", "not available")):
        proc = run_cli("quantize.py", "stage=ptq", "name=x", f"fp32_ckpt={tmp_path}/ok.pt", *QUICK,
                       bad, outputs=tmp_path, check=False, timeout=180)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-1500:]


@pytest.mark.slow  # end to end through the CLI: tens of seconds
def test_integer_stage_from_ptq_and_qat(fp32_run):
    """stage=integer writes model.json/weights.npz/verify.json, bit-exact with model_int8.pt."""
    for stage, script in (("ptq", "quantize.py"), ("qat", "train.py")):
        if not (fp32_run / "q" / stage / "metrics.json").is_file():
            run_cli(script, f"stage={stage}", "name=q", *QUICK, outputs=fp32_run)
        proc = run_cli("quantize.py", "stage=integer", "name=q", f"from={stage}", *QUICK,
                       outputs=fp32_run)
        out = fp32_run / "q" / stage / "integer"
        v = read_metrics(out / "verify.json")
        assert v["images"] == 64 and v["identical_logits_fraction"] == 1.0, v["first_mismatch"]
        assert v["top1_agreement"] == 1.0 and v["first_mismatch"] is None
        assert v["accuracy"] == v["torch_accuracy"] == pytest.approx(
            read_metrics(fp32_run / "q" / stage / "metrics.json")["accuracy"])
        assert v["rounding"] == "half_even" and v["biases_off_grid"] == []
        assert all(0 < r["acc_bits"] <= 32 for r in v["layers"]) and v["seconds"] > 0
        spec = json.loads((out / "model.json").read_text())
        assert spec["source"]["stage"] == stage and spec["ops"][0]["op"] == "quantize_input"
        assert (out / "weights.npz").is_file() and "identical logits 1.0000" in proc.stdout
    # another rounding rule runs, and verify.json says how far it is from torch's kernels
    run_cli("quantize.py", "stage=integer", "name=q", "from=ptq", "integer.rounding=floor",
            *QUICK, outputs=fp32_run)
    v = read_metrics(fp32_run / "q" / "ptq" / "integer" / "verify.json")
    assert v["rounding"] == "floor" and v["identical_logits_fraction"] < 1.0
    assert v["first_mismatch"]["op"] is not None and v["first_mismatch"]["max_abs_diff"] >= 1


@pytest.mark.slow  # end to end through the CLI: tens of seconds
def test_integer_stage_refusals(fp32_run):
    if not (fp32_run / "q" / "ptq-torch" / "metrics.json").is_file():
        run_cli("quantize.py", "stage=ptq", "name=q", "quant=torch", "tag=-torch", *QUICK,
                outputs=fp32_run)
    for source, message in (("ptq-torch", "not a power of two"), ("nowhere", "from= must name"),
                            ("fp32", "is not an INT8 stage")):
        proc = run_cli("quantize.py", "stage=integer", "name=q", f"from={source}", *QUICK,
                       outputs=fp32_run, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert message in proc.stderr
    run_cli("quantize.py", "stage=ptq", "name=q", *QUICK, outputs=fp32_run)  # a stage to read
    proc = run_cli("quantize.py", "stage=integer", "name=q", "integer.rounding=nearest", *QUICK,
                   outputs=fp32_run, check=False)
    assert proc.returncode == 2 and "half_even, half_up, half_away, floor" in proc.stderr
