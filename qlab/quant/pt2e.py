"""The po2 qconfig for torchao's PT2E flow: the same observers on torchao's classes (its
prepare_pt2e / convert_pt2e refuse torch.ao ones), a QuantizationConfig for
X86InductorQuantizer, and the QAT callback that fine-tunes an exported, fake-quantized graph."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchao.quantization.pt2e import (
    FakeQuantize,
    allow_exported_model_train_eval,
    disable_observer,
    enable_observer,
    move_exported_model_to_eval,
    move_exported_model_to_train,
)
from torchao.quantization.pt2e import observer as ao_observer
from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    QUANT_ANNOTATION_KEY,
    X86InductorQuantizer,
    get_input_act_qspec,
)

from qlab.artifacts import export_program
from qlab.errors import QlabError
from qlab.quant.observer import _Po2Mixin
from qlab.quant.qat import QATCallback
from qlab.quant.qconfig import averaging_constants, weight_range


class Po2AoMinMaxObserver(_Po2Mixin, ao_observer.MinMaxObserver):
    """Per-tensor po2 observer (PT2E PTQ)."""


class Po2AoMovingAverageMinMaxObserver(_Po2Mixin, ao_observer.MovingAverageMinMaxObserver):
    """Per-tensor po2 observer over a moving-average min/max (PT2E QAT)."""


class Po2AoPerChannelMinMaxObserver(_Po2Mixin, ao_observer.PerChannelMinMaxObserver):
    """Per-channel po2 observer (PT2E weights)."""


class Po2AoMovingAveragePerChannelMinMaxObserver(
        _Po2Mixin, ao_observer.MovingAveragePerChannelMinMaxObserver):
    """Per-channel po2 observer over a moving-average min/max (PT2E QAT weights)."""


class _SharedScaleMixin:
    """quant.per_channel=false on a per-channel observer: one po2 scale for the whole weight,
    written once per output channel. Inductor's x86 int8 lowering matches per-channel weight
    dequantization only (a per-tensor one stays a float convolution between q/dq ops); every
    channel holding the same 2^n, the model is the per-tensor one. The scale table shows the one
    scale."""

    def po2_qparams(self, min_val: Tensor, max_val: Tensor) -> dict[str, Tensor]:
        if min_val.numel():
            min_val, max_val = min_val.min().reshape(1), max_val.max().reshape(1)
        return super().po2_qparams(min_val, max_val)

    def _calculate_qparams(self, min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
        scale, zero = super()._calculate_qparams(min_val, max_val)
        return scale.expand(min_val.shape).contiguous(), zero.expand(min_val.shape).contiguous()


class Po2AoSharedScaleObserver(_SharedScaleMixin, Po2AoPerChannelMinMaxObserver):
    """Per-tensor po2 weight scale in per-channel form (PT2E PTQ weights)."""


class Po2AoMovingAverageSharedScaleObserver(_SharedScaleMixin,
                                            Po2AoMovingAveragePerChannelMinMaxObserver):
    """Per-tensor po2 weight scale in per-channel form, moving-average (PT2E QAT weights)."""


def po2_quantization_config(quant: DictConfig, *, qat: bool) -> QuantizationConfig:
    """quant=po2 as a PT2E QuantizationConfig: uint8 affine activations, int8 symmetric weights
    bounded by quant.target, every scale 2^n within +-quant.max_shift."""
    if quant.kind != "po2":
        raise QlabError(f"quant.flow=pt2e takes quant=po2 (got quant.kind={quant.kind!r}); for "
                        f"torch's own x86 config use the eager flow with quant=torch.")
    if quant.activation_dtype != "quint8" or quant.activation_symmetric or quant.reduce_range:
        raise QlabError("quant.flow=pt2e quantizes activations as uint8 affine 0..255 (the x86 "
                        "inductor kernels' format): drop quant.activation_dtype, "
                        "activation_symmetric and reduce_range.")
    wmin, wmax = weight_range(quant.target)
    po2 = {"max_shift": quant.max_shift, "rounding": quant.rounding,
           "even_zero_point": quant.get("even_zero_point", True)}
    if qat:
        w_obs = (Po2AoMovingAveragePerChannelMinMaxObserver if quant.per_channel
                 else Po2AoMovingAverageSharedScaleObserver)
        act_c, weight_c = averaging_constants(quant.averaging_constant,
                                              quant.weight_averaging_constant)
        act_ctr = FakeQuantize.with_args(observer=Po2AoMovingAverageMinMaxObserver, **po2,
                                         averaging_constant=act_c)
        w_ctr = FakeQuantize.with_args(observer=w_obs, **po2, averaging_constant=weight_c)
    else:
        act_ctr = Po2AoMinMaxObserver.with_args(**po2)
        w_ctr = (Po2AoPerChannelMinMaxObserver if quant.per_channel else Po2AoSharedScaleObserver
                 ).with_args(**po2)
    act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255,
                           qscheme=torch.per_tensor_affine, is_dynamic=False,
                           observer_or_fake_quant_ctr=act_ctr)
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=wmin, quant_max=wmax,
        qscheme=torch.per_channel_symmetric,  # per-tensor too: see _SharedScaleMixin
        ch_axis=0, is_dynamic=False, observer_or_fake_quant_ctr=w_ctr)
    return QuantizationConfig(act, None, weight, None, is_qat=qat)


RESIDUAL_ADD = ("int8", "fused")
_ADDS = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)


GEMM_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


def gemm_layers(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """The conv/linear nodes of an exported graph by the module path they came from
    (layers.0.conv1, fc, ...: the names the eager flow and stage=sensitivity use)."""
    found = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.target in GEMM_OPS and stack:
            found.setdefault(str(list(stack.values())[-1][0]), node)
    return found


def keep_in_float(gm: torch.fx.GraphModule, names) -> list[str]:
    """Float islands in an annotated graph (after every annotation pass): the named conv/linear
    ops lose their annotation, so prepare puts no observer on their input or weight and QAT's
    conv-BN fusion leaves them unquantized. The ops that read an island's output quantize it
    as they would any input (see docs/sensitivity.md for where that differs from eager)."""
    names = list(dict.fromkeys(str(n) for n in names or ()))
    layers = gemm_layers(gm)
    for name in names:
        if name not in layers:
            raise QlabError(
                f"quant.float_layers: {name} is not a conv or linear op of this model. Float "
                f"islands are named by module path: {', '.join(list(layers)[:6])}"
                f"{' ...' if len(layers) > 6 else ''} (stage=sensitivity lists them all).")
        layers[name].meta.pop(QUANT_ANNOTATION_KEY, None)
    return names


class Po2X86Quantizer(X86InductorQuantizer):
    """X86InductorQuantizer's annotations, then two changes. With `int8_adds`, both inputs of
    every residual add it annotated are quantized: the convolution output that it leaves in
    float for inductor's conv+add fusion gets a q/dq pair, as the eager flow and ONNX Runtime's
    quantize_static place them. ONNX Runtime then runs those convolutions as QLinearConv and the
    adds as QLinearAdd; inductor still lowers every convolution to int8 kernels. And the ops
    named in `float_layers` are left in float (keep_in_float)."""

    def __init__(self, *, int8_adds: bool, float_layers=()) -> None:
        super().__init__()
        self.int8_adds, self.float_layers = int8_adds, list(float_layers)

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        model = super().annotate(model)
        act = get_input_act_qspec(self.global_config)
        for node in model.graph.nodes if self.int8_adds else ():
            annotation = node.meta.get(QUANT_ANNOTATION_KEY)
            if node.target in _ADDS and annotation is not None:
                for arg in node.args[:2]:
                    if isinstance(arg, torch.fx.Node) and arg not in annotation.input_qspec_map:
                        annotation.input_qspec_map[arg] = act
        keep_in_float(model, self.float_layers)
        return model


def x86_quantizer(quant: DictConfig, *, qat: bool) -> X86InductorQuantizer:
    """The PT2E quantizer with the po2 config on every supported op: quant.pt2e.residual_add
    int8 (both add inputs quantized) or fused (X86InductorQuantizer's own annotations), and
    quant.float_layers left in float."""
    residual = quant.get("pt2e", {}).get("residual_add", "int8")
    if residual not in RESIDUAL_ADD:
        raise QlabError(f"quant.pt2e.residual_add={residual!r}: use int8 (both add inputs "
                        f"quantized, as the eager flow) or fused (inductor's conv+add fusion).")
    quantizer = Po2X86Quantizer(int8_adds=residual == "int8",
                                float_layers=quant.get("float_layers") or ())
    quantizer.set_global(po2_quantization_config(quant, qat=qat))
    return quantizer


# the batch norm ops of an exported graph; args[5] is `training`
_BATCH_NORMS = (torch.ops.aten.batch_norm.default, torch.ops.aten._native_batch_norm_legit.default)


def freeze_batch_norm(gm: torch.fx.GraphModule) -> int:
    """Set training=False on every batch norm of an exported (train-mode) graph: BN then
    normalizes with its running statistics and stops updating them, as eager freeze_bn_stats.
    Returns how many nodes changed."""
    changed = 0
    for node in gm.graph.nodes:
        if node.target in _BATCH_NORMS and node.args[5] is True:
            node.args = (*node.args[:5], False, *node.args[6:])
            changed += 1
    if changed:
        gm.recompile()
    return changed


def _train_keeping_frozen_bn(gm: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
    """model.train(mode) for a prepared QAT graph: torchao's rewrite of the BN/dropout patterns,
    then BN frozen again if the schedule froze it."""
    if not mode:
        move_exported_model_to_eval(gm)
        return gm
    move_exported_model_to_train(gm)
    if getattr(gm, "qlab_bn_frozen", False):
        freeze_batch_norm(gm)
    return gm


class Pt2eQATCallback(QATCallback):
    """QAT on torchao's PT2E flow: torch.export the FP32 network in train mode, prepare_qat_pt2e
    with the po2 QAT config (conv-BN fused for training by the quantizer's patterns), and swap
    the exported graph in as the LightningModule's network. model.train()/eval() switch BN and
    dropout in the graph (torchao's move_exported_model_to_train/eval); frozen BN stays frozen
    through those switches."""

    def __init__(self, *, quant: DictConfig, example: Tensor, fp32_weights: Path | None,
                 freeze_observer_epoch: int, freeze_bn_epoch: int) -> None:
        super().__init__(qconfig=None, fp32_weights=fp32_weights,
                         freeze_observer_epoch=freeze_observer_epoch,
                         freeze_bn_epoch=freeze_bn_epoch)
        self.quantizer = x86_quantizer(quant, qat=True)
        self.example = example

    def prepare(self, model: nn.Module) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_qat_pt2e(export_program(model, self.example).module(),
                                        self.quantizer)
        allow_exported_model_train_eval(prepared)  # eval(): torchao's pattern rewrite
        prepared.train = types.MethodType(_train_keeping_frozen_bn, prepared)
        prepared.train()
        return prepared

    enable_observer = staticmethod(enable_observer)  # torchao's fake-quants, not torch.ao's
    disable_observer = staticmethod(disable_observer)

    def activation_fake_quants(self, model: nn.Module) -> list[nn.Module]:
        """The graph's fake-quants whose input depends on the model's input: not the weights'
        (a weight's fake-quant reads a parameter, or with conv-BN fused for training, the
        parameter scaled by BN's factor), so the input's own fake-quant is among them."""
        fed: set[torch.fx.Node] = set()
        found = []
        for node in model.graph.nodes:
            if node.op == "placeholder" or any(a in fed for a in node.all_input_nodes):
                fed.add(node)
                if node.op == "call_module" and isinstance(model.get_submodule(node.target),
                                                           FakeQuantize):
                    found.append(model.get_submodule(node.target))
        return found

    def freeze_bn(self, model: nn.Module) -> None:
        model.qlab_bn_frozen = True
        freeze_batch_norm(model)
