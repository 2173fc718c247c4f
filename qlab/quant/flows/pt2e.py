"""The PT2E flow (torchao.quantization.pt2e): torch.export the FP32 model, X86InductorQuantizer
with the po2 config, calibrate, convert_pt2e; artifacts model_int8.pt2 (torch.export) and
model_int8.onnx (QDQ, run by ONNX Runtime); CPU latency of the inductor-compiled model."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchao.quantization.pt2e import allow_exported_model_train_eval
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

from qlab import artifacts
from qlab.errors import QlabError
from qlab.models import Deployable
from qlab.quant.flows.base import Flow
from qlab.quant.observer import _Po2Mixin
from qlab.quant.pt2e import po2_quantization_config
from qlab.quant.scales import po2_row
from qlab.runtimes import OnnxRuntime


def observer_rows(prepared: nn.Module) -> list[tuple[str, str, _Po2Mixin]]:
    """(layer, weight|activation, observer) for every po2 observer PT2E inserted, named by the
    graph node it observes."""
    observed = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.args:
            src = node.args[0]
            observed[str(node.target)] = (src.name, "weight" if src.op == "get_attr" else
                                          "activation")
    rows = []
    for name, mod in prepared.named_modules():
        obs = getattr(mod, "activation_post_process", mod)
        if isinstance(obs, _Po2Mixin) and name in observed:
            rows.append((*observed[name], obs))
    return rows


class Pt2eFlow(Flow):
    name = "pt2e"
    kernels = "onednn"  # inductor lowers the x86 quantizer's patterns to oneDNN qconv/qlinear

    def prepare_ptq(self, model: nn.Module, quant: DictConfig, example: Tensor) -> nn.Module:
        quantizer = X86InductorQuantizer()
        quantizer.set_global(po2_quantization_config(quant, qat=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.eval()
            prepared = prepare_pt2e(artifacts.export_program(model, example).module(), quantizer)
        allow_exported_model_train_eval(prepared)
        return prepared

    def qat_callback(self, quant: DictConfig, fp32_weights: Path | None,
                     example: Tensor) -> L.Callback:
        raise QlabError("stage=qat with quant.flow=pt2e is not available yet: fine-tune with the "
                        "eager flow (quant.flow=eager, the default); PTQ runs with either flow.")

    def scale_table(self, prepared: nn.Module) -> list[dict]:
        return [po2_row(layer, tensor, obs) for layer, tensor, obs in observer_rows(prepared)]

    def convert(self, prepared: nn.Module, example: Tensor) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8 = convert_pt2e(copy.deepcopy(prepared))
        _drop_unused_tensors(int8)
        allow_exported_model_train_eval(int8)
        int8.eval()
        return int8

    def weight_max(self, int8: nn.Module) -> int:
        tensors = [t for t in [*int8.parameters(), *int8.buffers()] if t.dtype == torch.int8]
        if not tensors:
            raise QlabError("convert_pt2e left no int8 weights in the graph.")
        return max(int(t.abs().max()) for t in tensors)

    def export(self, int8: nn.Module, mean: Sequence[float], std: Sequence[float], out: Path,
               meta: dict, example: Tensor) -> nn.Module:
        deployable = Deployable(int8, mean, std).eval()
        artifacts.save_exported(out, "model_int8", deployable, example, meta)
        example = torch.rand(2, *example.shape[1:])  # [0, 1] images
        compiled = torch.compile(deployable)
        with torch._inductor.config.patch(freezing=True), torch.inference_mode():
            compiled(example[:1])  # compile now, with weights frozen into the kernels
        return compiled

    def runtimes(self, out: Path) -> dict[str, nn.Module]:
        return {"onnxruntime": OnnxRuntime(out / "model_int8.onnx")}


def _drop_unused_tensors(gm: torch.fx.GraphModule) -> None:
    """convert_pt2e reads int8 copies (_frozen_param*) but leaves the folded float weights
    registered: drop every parameter/buffer no get_attr node reads, so the state_dict holds
    the INT8 model only."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k in gm.state_dict() if k not in used]:
        owner, _, attr = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if attr in mod._parameters:
            del mod._parameters[attr]
        elif attr in mod._buffers:
            del mod._buffers[attr]
