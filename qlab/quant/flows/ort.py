"""The outside baseline: ONNX Runtime's own static quantization (`quantize_static`, QDQ, MinMax
calibration) of the exported FP32 model, calibrated on the same batches as PTQ. Not po2: its
scales are whatever ONNX Runtime picks; it is there to compare against."""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import onnx
import torch
from omegaconf import DictConfig
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import Tensor, nn

from qlab import artifacts
from qlab.errors import QlabError
from qlab.quant.flows.base import Exported, Flow
from qlab.runtimes import OnnxRuntime


class _Recorder(nn.Module):
    """The FP32 model, keeping every (normalized) calibration batch it is given, and how
    quantize_static is to quantize its weights."""

    def __init__(self, model: nn.Module, *, per_channel: bool) -> None:
        super().__init__()
        self.model = model.eval()
        self.per_channel = per_channel
        self.batches: list[np.ndarray] = []

    def forward(self, x: Tensor) -> Tensor:
        self.batches.append(x.detach().float().numpy().copy())
        return self.model(x)


class _Batches(CalibrationDataReader):
    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.items = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.items, None)


class OrtModel(nn.Module):
    """A quantized ONNX model (normalized float in, logits out) run by ONNX Runtime."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        self.proto = model
        self.runtime = OnnxRuntime.from_bytes(model.SerializeToString())

    def forward(self, x: Tensor) -> Tensor:
        return self.runtime(x)

    def state_dict(self, *args, **kwargs):  # what model_int8_state_dict.pt holds: the weights
        return {init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
                for init in self.proto.graph.initializer}


def with_normalization(model: onnx.ModelProto, mean: Sequence[float],
                       std: Sequence[float]) -> onnx.ModelProto:
    """The model with (image - mean) / std in front: [0, 1] images in, as every qlab artifact."""
    model = copy.deepcopy(model)
    graph = model.graph
    inp = graph.input[0]
    shape = [1, len(mean), 1, 1]
    graph.initializer.extend([
        numpy_helper.from_array(np.asarray(mean, np.float32).reshape(shape), "qlab_mean"),
        numpy_helper.from_array(np.asarray(std, np.float32).reshape(shape), "qlab_std")])
    image = copy.deepcopy(inp)
    image.name = "image"
    for node in graph.node:  # the old input becomes the normalized tensor
        for i, name in enumerate(node.input):
            if name == inp.name:
                node.input[i] = "qlab_normalized"
    nodes = [helper.make_node("Sub", ["image", "qlab_mean"], ["qlab_centered"]),
             helper.make_node("Div", ["qlab_centered", "qlab_std"], ["qlab_normalized"])]
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    graph.input.remove(inp)
    graph.input.insert(0, image)
    return model


class OrtStaticFlow(Flow):
    name = "ort"
    kernels = "onnxruntime"
    kind = "onnxruntime-minmax"  # its own scales, not po2

    def prepare_ptq(self, model: nn.Module, quant: DictConfig, example: Tensor) -> nn.Module:
        if quant.target != "portable":
            raise QlabError("quant.flow=ort runs ONNX Runtime's quantize_static with 7-bit "
                            "weights (its reduce_range: exact on every CPU); only "
                            "quant.target=portable is available with it.")
        return _Recorder(model, per_channel=bool(quant.per_channel))

    def qat_callback(self, quant: DictConfig, fp32_weights: Path | None,
                     example: Tensor) -> L.Callback:
        raise QlabError("quant.flow=ort is ONNX Runtime's post-training quantization; "
                        "stage=qat runs with quant.flow=eager.")

    def scale_table(self, prepared: nn.Module) -> list[dict]:
        return []  # ONNX Runtime's own scales: not po2, and not observed by qlab

    def convert(self, prepared: nn.Module, example: Tensor) -> nn.Module:
        if not prepared.batches:
            raise QlabError("quant.flow=ort saw no calibration batch.")
        with tempfile.TemporaryDirectory() as tmp:
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            program = artifacts.export_program(prepared.model, example)
            artifacts.save_onnx(program, example[:1].expand(2, *example.shape[1:]), fp32)
            # ONNX Runtime's recommended pre-processing: shape inference and graph optimization
            # (folds BatchNorm into Conv) before quantization
            pre = Path(tmp) / "pre.onnx"
            with contextlib.redirect_stdout(io.StringIO()):
                quant_pre_process(str(fp32), str(pre))
            name = onnx.load(str(pre)).graph.input[0].name
            quantize_static(str(pre), str(int8), _Batches(name, prepared.batches),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=prepared.per_channel,
                            reduce_range=True, calibrate_method=CalibrationMethod.MinMax)
            return OrtModel(onnx.load(str(int8)))

    def weight_max(self, int8: nn.Module) -> int:
        ints = [numpy_helper.to_array(i) for i in int8.proto.graph.initializer
                if i.data_type == onnx.TensorProto.INT8]
        if not ints:
            raise QlabError("quantize_static left no int8 weights in the model.")
        return max(int(np.abs(a.astype(np.int32)).max()) for a in ints)

    def export(self, int8: nn.Module, mean: Sequence[float], std: Sequence[float], out: Path,
               meta: dict, example: Tensor) -> Exported:
        model = with_normalization(int8.proto, mean, std)
        artifacts.atomic_write(out / "model_int8.onnx",
                               lambda tmp: onnx.save(model, str(tmp)))
        return Exported(OnnxRuntime(out / "model_int8.onnx"))
