"""The PT2E flow (torchao.quantization.pt2e): torch.export the FP32 model, X86InductorQuantizer
with the po2 config, calibrate (PTQ) or fine-tune (QAT), convert_pt2e; artifacts model_int8.pt2
(portable: plain torch loads it), model_int8_pt2e.pt2 (the q/dq graph inductor lowers) and
model_int8.onnx (QDQ, run by ONNX Runtime); CPU latency under ONNX Runtime."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import onnx
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchao.quantization.pt2e import allow_exported_model_train_eval
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from qlab import artifacts
from qlab.errors import QlabError
from qlab.integer.bias import bias_grid
from qlab.models import Deployable
from qlab.quant.flows.base import Exported, Flow
from qlab.quant.observer import _Po2Mixin
from qlab.quant.onnx_qdq import int32_biases
from qlab.quant.pt2e import GEMM_OPS, Pt2eQATCallback, x86_quantizer
from qlab.quant.scales import po2_row
from qlab.runtimes import OnnxRuntime, inductor, int8_kernels_lowered, load_pt2

log = logging.getLogger(__name__)


def observer_rows(prepared: nn.Module) -> list[tuple[str, str, _Po2Mixin]]:
    """(layer, weight|activation, observer) for every po2 observer PT2E inserted. A weight is
    named by the parameter it reads (in a QAT graph through the conv-BN scale factor, so the
    int8 dtype of its observer decides), an activation by the graph node it observes."""
    observed = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.args:
            observed[str(node.target)] = node.args[0]
    rows = []
    for name, mod in prepared.named_modules():
        obs = getattr(mod, "activation_post_process", mod)
        if isinstance(obs, _Po2Mixin) and name in observed:
            src = observed[name]
            if obs.dtype == torch.int8:
                rows.append((_parameter_read_by(src), "weight", obs))
            else:
                rows.append((src.name, "activation", obs))
    return rows


def _parameter_read_by(node: torch.fx.Node) -> str:
    """The get_attr (parameter) nearest upstream of `node`, first argument first."""
    queue = [node]
    while queue:
        n = queue.pop(0)
        if n.op == "get_attr":
            return n.name
        queue += [a for a in n.args if isinstance(a, torch.fx.Node)]
    return node.name


class Pt2eFlow(Flow):
    name = "pt2e"
    float_islands = True  # keep_in_float drops the named ops' annotations
    # inductor lowers the x86 quantizer's patterns to oneDNN qconv/qlinear (the deployed ONNX
    # file runs on ONNX Runtime's MLAS); the exactness check is oneDNN's
    kernels = "onednn"
    deployed_form = "onnxruntime"

    def prepare_ptq(self, model: nn.Module, quant: DictConfig, example: Tensor) -> nn.Module:
        quantizer = x86_quantizer(quant, qat=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.eval()
            prepared = prepare_pt2e(artifacts.export_program(model, example).module(), quantizer)
        allow_exported_model_train_eval(prepared)
        return prepared

    def qat_callback(self, quant: DictConfig, fp32_weights: Path | None,
                     example: Tensor) -> L.Callback:
        return Pt2eQATCallback(quant=quant, example=example, fp32_weights=fp32_weights,
                               freeze_observer_epoch=quant.qat.freeze_observer_epoch,
                               freeze_bn_epoch=quant.qat.freeze_bn_epoch)

    def scale_table(self, prepared: nn.Module) -> list[dict]:
        return [po2_row(layer, tensor, obs) for layer, tensor, obs in observer_rows(prepared)]

    def convert(self, prepared: nn.Module, example: Tensor) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8 = convert_pt2e(copy.deepcopy(prepared))
        snap_graph_biases(int8)
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
               meta: dict, example: Tensor) -> Exported:
        deployable = Deployable(int8, mean, std).eval()
        program = artifacts.save_exported(out, "model_int8", deployable, example, meta)
        # int32 biases in the ONNX file, as integer runtimes add them (exact: snapped at convert)
        qdq, _ = int32_biases(onnx.load(str(out / "model_int8.onnx")))
        artifacts.atomic_write(out / "model_int8.onnx", lambda tmp: onnx.save(qdq, str(tmp)))
        # the convert_pt2e graph itself: what torch.compile lowers to oneDNN int8 kernels
        artifacts.save_program(out / "model_int8_pt2e.pt2", program, meta)
        before = int8_kernels_lowered()
        compiled = inductor(deployable, example.shape[-1], example.shape[1])
        after = int8_kernels_lowered()
        lowered = {k: after[k] - before[k] for k in after}
        if not any(lowered.values()):  # (a compile served from inductor's cache counts none)
            log.warning("inductor lowered no convolution of the INT8 graph to int8 kernels in "
                        "this process: its latency may be a float model's.")
        # the runtime whose latency the stage records: ONNX Runtime, the fastest PT2E runtime
        # measured (README, "Two flows"); inductor's accuracy is measured as another runtime
        return Exported(OnnxRuntime(out / "model_int8.onnx"),
                        runtimes={"torch.export": load_pt2(out / "model_int8.pt2"),
                                  "inductor": compiled},
                        info={"inductor_int8_kernels": lowered})


_DEQUANTIZE = ("dequantize_per_tensor", "dequantize_per_channel")


def _dq_scale(gm: torch.fx.GraphModule, node: object) -> Tensor | None:
    """The scale(s) of a dequantize node (a literal or a graph constant), None otherwise."""
    if not isinstance(node, torch.fx.Node) or not any(
            d in str(node.target) for d in _DEQUANTIZE):
        return None
    scale = node.args[1]
    if isinstance(scale, torch.fx.Node):
        return getattr(gm, scale.target).detach().double()
    return torch.tensor(float(scale), dtype=torch.float64)


def snap_graph_biases(gm: torch.fx.GraphModule) -> int:
    """Every conv/linear bias of a converted PT2E graph on its accumulator grid s_in * s_w, as
    the eager flow's snap_biases: integer kernels (ONNX Runtime's QLinearConv, oneDNN) add an
    int32 bias, the reference graph a float one; on the grid, with po2 scales, they add the same
    number. Returns how many biases moved."""
    moved = 0
    for node in gm.graph.nodes:
        if node.target not in GEMM_OPS or len(node.args) < 3 or node.args[2] is None:
            continue
        s_in, s_w = _dq_scale(gm, node.args[0]), _dq_scale(gm, node.args[1])
        bias = node.args[2]
        if s_in is None or s_w is None or bias.op != "get_attr":
            continue
        owner, _, attr = str(bias.target).rpartition(".")
        holder = gm.get_submodule(owner) if owner else gm
        b = getattr(holder, attr)
        codes, step = bias_grid(b, s_in, s_w)
        snapped = (codes * step).to(b.dtype)
        if not torch.equal(snapped, b.detach()):
            with torch.no_grad():
                b.copy_(snapped)
            moved += 1
    return moved


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
