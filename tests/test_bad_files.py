"""Damaged or mismatched files give a QlabError that says what is wrong and how to fix it:
model.json / weights.npz of the integer model, an INT8 stage folder read by stage=integer, and
the checkpoint a training run resumes from. Each test damages one thing of a valid file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_integer import MEAN, STD, _int8
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, fuse_modules

from qlab.errors import QlabError
from qlab.integer.export import to_integer, write_integer
from qlab.integer.reference import IntegerModel
from qlab.integer.verify import stage_metrics
from qlab.models import build_resnet20
from qlab.stages.common import resume_path
from qlab.stages.integer import load_scripted, rebuild_int8

from conftest import run_cli

# ---- model.json and weights.npz ------------------------------------------------------------


class _Small(nn.Module):
    """conv-BN-ReLU, a grouped conv-BN added back to it, max pool, 4x4 average pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), \
            nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), \
            nn.BatchNorm2d(8)
        self.add = FloatFunctional()
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.pool(self.add.add(x, self.bn2(self.conv2(x))))
        return self.dequant(self.fc(self.avg(x).flatten(1)))

    def fuse_model(self, is_qat: bool | None = None) -> None:
        fuse_modules(self, [["conv1", "bn1", "relu1"], ["conv2", "bn2"]], inplace=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A valid model.json + weights.npz of _Small, never written to after it is made."""
    folder = tmp_path_factory.mktemp("integer")
    spec, arrays = to_integer(_int8(_Small), mean=MEAN, std=STD, image_size=32, max_shift=8)
    write_integer(folder, spec, arrays)
    return folder


@pytest.fixture
def model_dir(pristine, tmp_path):
    """A private copy of the valid model, for one test to damage."""
    return shutil.copytree(pristine, tmp_path / "integer")


def _op(spec: dict, kind: str) -> dict:
    return next(op for op in spec["ops"] if op["op"] == kind)


def _edit_json(folder, edit) -> None:
    spec = json.loads((folder / "model.json").read_text())
    edit(spec)
    (folder / "model.json").write_text(json.dumps(spec))


def _edit_weights(folder, edit) -> None:
    """Re-save weights.npz changed by `edit`, with model.json's sha256 updated to match: the one
    thing wrong is what `edit` did."""
    spec = json.loads((folder / "model.json").read_text())
    with np.load(folder / "weights.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    edit(arrays)
    write_integer(folder, spec, arrays)


def test_the_undamaged_model_loads_and_has_every_op_the_damage_needs(model_dir):
    ref = IntegerModel.load(model_dir)
    assert {"quantize_input", "conv", "add", "maxpool", "avgpool", "flatten", "linear"} == {
        op["op"] for op in ref.spec["ops"]}
    assert {"conv1.weight", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias",
            "input.lut"} <= set(ref.arrays)
    assert ref.run(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))[0].shape == (1, 10)


def test_an_unknown_op_type(model_dir):
    _edit_json(model_dir, lambda spec: _op(spec, "maxpool").update(op="softmax"))
    with pytest.raises(QlabError, match=r"has op='softmax', which is not an op of the "
                                        r"qlab-integer-model format.*Re-create model.json"):
        IntegerModel.load(model_dir)


def _dangle(spec):
    _op(spec, "add")["inputs"][1] = "conv3"


def _reorder(spec):  # the linear before the flatten that feeds it
    ops = spec["ops"]
    ops[-2], ops[-1] = ops[-1], ops[-2]


@pytest.mark.parametrize("edit", [_dangle, _reorder], ids=["unknown-tensor", "out-of-order"])
def test_an_input_that_no_earlier_op_writes(model_dir, edit):
    _edit_json(model_dir, edit)
    with pytest.raises(QlabError, match=r"reads '\w+', which no earlier op writes: every input "
                                        r"must be the output of an op above it"):
        IntegerModel.load(model_dir)


@pytest.mark.parametrize("edit, message", [
    (lambda spec: spec.pop("version"), "has no format version"),
    (lambda spec: spec.update(version=3), "is format version 3; this qlab reads versions 1, 2"),
    (lambda spec: spec.update(version="1"), "is format version '1'; this qlab reads versions 1"),
    (lambda spec: spec.update(format="onnx"), "not a qlab-integer-model file .*'onnx'"),
])
def test_a_wrong_or_missing_format_version(model_dir, edit, message):
    _edit_json(model_dir, edit)
    with pytest.raises(QlabError, match=rf"model.json: {message}.*Re-create it with"):
        IntegerModel.load(model_dir)


@pytest.mark.parametrize("name, dtype, want", [
    ("conv1.weight", np.float32, "int8"), ("fc.weight", np.uint8, "int8"),
    ("conv2.bias", np.int64, "int32"), ("input.lut", np.int16, "uint8"),
])
def test_a_weight_of_the_wrong_dtype(model_dir, name, dtype, want):
    _edit_weights(model_dir, lambda arrays: arrays.update({name: arrays[name].astype(dtype)}))
    with pytest.raises(QlabError, match=rf"array '{name}' .* has dtype {np.dtype(dtype)}, not "
                                        rf"{want}: the files do not belong together"):
        IntegerModel.load(model_dir)


def _resize(name, shape):
    def edit(arrays):
        arrays[name] = np.ones(shape, dtype=arrays[name].dtype)
    return edit


@pytest.mark.parametrize("edit, message", [
    (_resize("conv1.weight", (8, 3, 5, 5)), r"'conv1.weight' has shape \[8, 3, 5, 5\], but "
     r"model.json makes the weight of op 'conv1' \[8, 3, 3, 3\] \(\[out channels, in channels"),
    (_resize("conv2.weight", (8, 8, 3, 3)), r"'conv2.weight' has shape \[8, 8, 3, 3\], but "
     r"model.json makes the weight of op 'conv2' \[8, 4, 3, 3\]"),  # groups=2: 4 in per group
    (_resize("conv1.weight", (6, 3, 3, 3)), r"'conv1.weight' has shape \[6, 3, 3, 3\]"),
    (_resize("conv1.weight", (8, 3, 9)), r"'conv1.weight' has shape \[8, 3, 9\]"),
    (_resize("fc.weight", (10, 64)), r"'fc.weight' has shape \[10, 64\], but model.json makes "
     r"the weight of op 'fc' \[10, 128\] \(\[out features, in features\]\)"),
    (_resize("fc.bias", (9,)), r"'fc.bias' has shape \[9\], but model.json makes the bias"),
    (_resize("input.lut", (3, 255)), r"'input.lut' has shape \[3, 255\]"),
], ids=["kernel", "in-channels", "out-channels", "rank", "in-features", "bias", "lut"])
def test_a_weight_of_the_wrong_shape(model_dir, edit, message):
    _edit_weights(model_dir, edit)
    with pytest.raises(QlabError, match=message + r".*Re-create model.json and weights.npz"):
        IntegerModel.load(model_dir)


@pytest.mark.parametrize("name", ["conv2.bias", "fc.weight", "input.lut"])
def test_a_missing_weight(model_dir, name):
    _edit_weights(model_dir, lambda arrays: arrays.pop(name))
    with pytest.raises(QlabError, match=rf"weights.npz has no array '{name}' \(the \w+ of op "
                                        r"'[\w.]+'\): the file does not belong to this model.json"):
        IntegerModel.load(model_dir)


def _conv1(spec):
    return next(op for op in spec["ops"] if op["name"] == "conv1")


@pytest.mark.parametrize("edit, message", [
    (lambda spec: _conv1(spec).pop("stride"), r"op 1 \('conv1', conv\) has no stride field"),
    (lambda spec: _conv1(spec).update(kernel=3), r"kernel=3 must be a list of two integers"),
    (lambda spec: _conv1(spec).update(shift="2"), r"shift='2' must be an integer"),
    (lambda spec: _op(spec, "add").update(inputs=["conv1"]), r"must read 2 tensor\(s\) by name"),
    (lambda spec: spec["ops"].pop(0), r"the first op, and only the first, must be quantize_input"),
    (lambda spec: spec["tensors"].pop(_conv1(spec)["output"]), r"is missing from `tensors`"),
    (lambda spec: spec["tensors"][_conv1(spec)["output"]].update(shape=[8, 16, 16]),
     r"op 'conv1' \(conv\) makes a \[8, 32, 32\] tensor .* says '\w+' is \[8, 16, 16\]"),
    (lambda spec: _conv1(spec).update(clamp=[0, 300]), r"clamp \[0, 300\] is outside the uint8"),
    (lambda spec: spec["output"].update(tensor="logits"), r"`output.tensor` names no tensor"),
], ids=["no-field", "kernel", "shift", "arity", "first-op", "no-tensor", "shape", "clamp",
        "output"])
def test_other_model_json_damage(model_dir, edit, message):
    _edit_json(model_dir, edit)
    with pytest.raises(QlabError, match=message + r".*Re-create model.json and weights.npz"):
        IntegerModel.load(model_dir)


@pytest.mark.parametrize("text, message", [
    ("{\"format\": \"qlab-integer-model\", \"vers", "not valid JSON"),
    (b"\x89PNG\r\n\x1a\n\xff", "not valid JSON"),
    ("[1, 2]", "holds a JSON list, not a qlab-integer-model object"),
])
def test_a_model_json_that_is_not_a_model(model_dir, text, message):
    path = model_dir / "model.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(QlabError, match=rf"model.json: {message}.*Re-create it with"):
        IntegerModel.load(model_dir)


# ---- stage=integer reading an INT8 stage folder --------------------------------------------

R20 = ["model=resnet20", "data=synthetic", "data.num_train=160", "data.num_test=64",
       "data.batch_size=32", "data.eval_batch_size=64", "trainer.max_epochs=1",
       "trainer.enable_progress_bar=false", "bench.runs=5", "bench.warmup=1",
       "bench.inductor=false", "export.pt2=false", "export.onnx=false",
       "quant.calib_batches=2"]


@pytest.fixture(scope="module")
def ptq_run(tmp_path_factory):
    """outputs/b/ptq of a real PTQ run of a random ResNet-20 (no FP32 training), never written
    to after it is made."""
    outputs = tmp_path_factory.mktemp("outputs")
    torch.save(build_resnet20(num_classes=10).state_dict(), outputs / "r20.pt")
    run_cli("quantize.py", "stage=ptq", "name=b", f"fp32_ckpt={outputs / 'r20.pt'}", *R20,
            outputs=outputs, timeout=300)
    return outputs


def _copy_stage(ptq_run, tmp_path, source: str):
    """outputs/b/<source>: a copy of the PTQ folder under another name, for one test to damage."""
    return shutil.copytree(ptq_run / "b" / "ptq", tmp_path / "b" / source)


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_the_cli_refuses_a_truncated_state_dict_and_metrics_json(ptq_run, tmp_path):
    _truncate(_copy_stage(ptq_run, tmp_path, "ptq-cut") / "model_int8_state_dict.pt")
    _truncate(_copy_stage(ptq_run, tmp_path, "ptq-json") / "metrics.json")
    for source, message in (
        ("ptq-cut", "model_int8_state_dict.pt is not a readable PyTorch file (RuntimeError: "
                    "PytorchStreamReader failed reading zip archive"),
        ("ptq-json", "metrics.json is not valid JSON"),
    ):
        proc = run_cli("quantize.py", "stage=integer", "name=b", f"from={source}", *R20,
                       outputs=tmp_path, check=False, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
        assert "truncated or corrupt" in proc.stderr
        assert f"`python quantize.py stage=ptq name=b tag=-{source[4:]}`" in proc.stderr
        assert not (tmp_path / "b" / source / "integer" / "model.json").exists()


@pytest.mark.parametrize("source, damage, message", [
    ("ptq", lambda p: _truncate(p), r"metrics.json is not valid JSON \(.*\): the file is "
     r"truncated or corrupt .*`python quantize.py stage=ptq name=b`"),
    ("ptq-ceil", lambda p: p.write_text(""), r"not valid JSON .* tag=-ceil`"),
    ("qat", lambda p: p.write_bytes(b"\x00\xff\xfe\x80garbage"),
     r"not valid JSON .*`python train.py stage=qat name=b overwrite=true`"),
    ("ptq", lambda p: p.write_text("[]"), r"holds a JSON list, not a stage's metrics object"),
    ("ptq", lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                               if k not in ("classes", "mean")})),
     r"lacks classes, mean, which every INT8 stage writes"),
], ids=["truncated", "empty", "binary", "list", "keys"])
def test_a_damaged_metrics_json(ptq_run, tmp_path, source, damage, message):
    stage = _copy_stage(ptq_run, tmp_path, source)
    assert stage_metrics(stage)["int8"]["flow"] == "eager"  # the undamaged folder reads
    damage(stage / "metrics.json")
    with pytest.raises(QlabError, match=message):
        stage_metrics(stage)


def _save_list(p):
    torch.save([torch.zeros(3)], p)


def _save_fp32(p):
    torch.save(build_resnet20(num_classes=10).state_dict(), p)


@pytest.mark.parametrize("damage, message", [
    (lambda p: _truncate(p, 0.9), r"is not a readable PyTorch file \(RuntimeError: .*\): it is "
     r"truncated or corrupt"),
    (lambda p: p.write_bytes(b"\x80\x02garbage"), r"is not a readable PyTorch file"),
    (_save_list, r"holds a list, not a state_dict"),
    (_save_fp32, r"does not fit the INT8 model that metrics.json describes \(\w+Error: .*\): "
     r"the two files are from different runs or damaged"),
], ids=["truncated", "garbage", "list", "fp32-weights"])
def test_a_damaged_int8_state_dict(ptq_run, tmp_path, damage, message):
    stage = _copy_stage(ptq_run, tmp_path, "ptq")
    metrics = stage_metrics(stage)
    rebuild_int8(stage, metrics)  # the undamaged folder reads
    damage(stage / "model_int8_state_dict.pt")
    with pytest.raises(QlabError, match=message + r".*`python quantize.py stage=ptq name=b`"):
        rebuild_int8(stage, metrics)


def test_a_damaged_or_missing_torchscript_model(ptq_run, tmp_path):
    stage = _copy_stage(ptq_run, tmp_path, "ptq")
    load_scripted(stage)  # the undamaged folder reads
    _truncate(stage / "model_int8.pt")
    with pytest.raises(QlabError, match=r"model_int8.pt is not a readable TorchScript file .* "
                                        r"truncated or corrupt. Re-run that stage"):
        load_scripted(stage)
    (stage / "model_int8.pt").unlink()
    with pytest.raises(QlabError, match=r"model_int8.pt does not exist: the stage did not finish"):
        load_scripted(stage)


# ---- resuming from checkpoints/last.ckpt ---------------------------------------------------

def test_the_cli_refuses_to_resume_from_a_garbage_last_ckpt(tmp_path):
    ckpts = tmp_path / "r" / "fp32" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    proc = run_cli("train.py", "stage=fp32", "name=r", "resume=true", "model=resnet20",
                   "data=synthetic", "data.num_train=64", "data.num_test=32",
                   "trainer.max_epochs=1", outputs=tmp_path, check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"resume=true but {ckpts / 'last.ckpt'} is unreadable" in proc.stderr
    assert "drop resume=true and pass overwrite=true" in proc.stderr


def _cfg(**kw):
    return OmegaConf.create({"ckpt_path": None, "resume": False, "overwrite": False} | kw)


def _lightning_ckpt(path) -> None:
    """What Lightning saves, in small: a dict with the network's state_dict and the loop state."""
    torch.save({"epoch": 0, "global_step": 3, "pytorch-lightning_version": "2.6.6",
                "state_dict": {"model.fc.weight": torch.zeros(10, 64)},
                "optimizer_states": [{"state": {}, "param_groups": []}]}, path)


def test_resume_path_reads_the_checkpoint_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)
    out = tmp_path / "r" / "fp32"
    (out / "checkpoints").mkdir(parents=True)
    last = out / "checkpoints" / "last.ckpt"
    _lightning_ckpt(last)
    assert resume_path(_cfg(resume=True), out) == str(last)  # the undamaged checkpoint resumes
    _lightning_ckpt(out / "checkpoints" / "best-epoch000-acc0.5000.ckpt")
    _truncate(last, 0.6)
    with pytest.raises(QlabError, match=r"last.ckpt is unreadable \(.*\): the checkpoint is "
                                        r"truncated or corrupt.*ckpt_path=.*best-epoch000-acc0.5000"
                                        r".ckpt .*drop resume=true and pass overwrite=true"):
        resume_path(_cfg(resume=True), out)
    with pytest.raises(QlabError, match=r"ckpt_path=.*last.ckpt is unreadable .* Pass another"):
        resume_path(_cfg(ckpt_path=str(last)), out)
    torch.save([1, 2, 3], last)  # a readable file that is not a Lightning checkpoint
    with pytest.raises(QlabError, match=r"unreadable \(no Lightning state_dict in it\)"):
        resume_path(_cfg(resume=True), out)
    # the way out the message gives: overwrite=true starts over
    assert resume_path(_cfg(overwrite=True), out) is None
    assert not (out / "checkpoints").exists()
