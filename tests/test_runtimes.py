"""The runtime registry: every runtime of a stage folder's files comes from RUNTIMES, and the
report times whatever it lists."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from qlab import artifacts, runtimes
from qlab.models import Deployable
from qlab.runtimes import RUNTIMES, StageFiles, load_runtimes
from qlab.stages.report import remeasure_latency

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _fp32_stage(folder):
    """A stage folder as stage=fp32 writes it: TorchScript, .pt2 and .onnx of one tiny net."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 2)).eval()
    folder.mkdir(parents=True)
    artifacts.save_torchscript(folder / "model_fp32.pt", artifacts.torchscript_of(net, MEAN, STD))
    deployable = Deployable(net, MEAN, STD).eval()
    artifacts.save_exported(folder, "model_fp32", deployable, torch.zeros(1, 3, 8, 8), {})
    return deployable, {"stage": "fp32", "image_size": 8, "mean": MEAN, "std": STD}


def test_every_runtime_of_a_stage_folder_comes_from_the_registry(tmp_path, monkeypatch):
    deployable, metrics = _fp32_stage(tmp_path / "run" / "fp32")
    files = StageFiles(tmp_path / "run" / "fp32", metrics, engine="x86", compile=False)
    loaded = load_runtimes(files)
    # no state_dict and model config: no eager model; compile=False: no inductor
    assert list(loaded) == ["torchscript-frozen", "torch.export", "onnxruntime"]
    x = torch.rand(3, 3, 8, 8)
    with torch.inference_mode():
        want = deployable(x)
        for name, run in loaded.items():
            torch.testing.assert_close(run(x), want, rtol=1e-4, atol=1e-5, msg=name)

    # a new runtime is one entry: the loader sees the runtimes loaded before it
    seen = []

    def doubled(files: StageFiles, before: dict):
        seen.append(list(before))
        return lambda x: 2 * before["torch.export"](x)

    monkeypatch.setitem(RUNTIMES, "doubled", doubled)
    assert list(load_runtimes(files)) == [*loaded, "doubled"]
    assert seen == [list(loaded)]
    cfg = OmegaConf.create({"bench": {"runs": 2, "warmup": 1, "threads": None, "inductor": False},
                            "quant": {"backend": "x86"}})
    latency = remeasure_latency(tmp_path / "run", {"fp32": metrics}, cfg)
    assert set(latency["fp32"]["forms"]) == {*loaded, "doubled"}


def test_a_folder_without_files_has_no_runtimes(tmp_path):
    files = StageFiles(tmp_path, {"stage": "ptq"}, engine="x86")
    assert files.kind == "int8" and files.image_size == 32
    assert load_runtimes(files) == {}
    assert runtimes.RUNTIMES["inductor"](files, {}) is None  # no convert_pt2e program to compile
