"""The interface every quantization flow implements (see qlab.quant.flows)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch import Tensor, nn


@dataclass
class Exported:
    """What Flow.export made of the INT8 model, for the stage to measure and record."""

    deployable: nn.Module  # the form whose latency counts (float [0,1] NCHW in, logits out)
    # other runtimes of the written artifacts (same input and output) whose test accuracy the
    # stage also records
    runtimes: dict[str, nn.Module] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # what export found out: metrics.json "int8"


class Flow(ABC):
    """prepare_ptq / qat_callback -> (calibrate or fine-tune) -> convert -> export. A flow keeps
    no state between calls: each returns what the next one needs."""

    name: str
    kernels: str | None = None  # the INT8 kernels its models run on; None: quant.backend's
    kind: str | None = None     # its scales when not quant.kind's
    deployed_form: str | None = None  # the runtime export() returns when it is not the converted
                                      # model itself (its test accuracy is then measured too)
    float_islands: bool = False  # takes quant.float_layers (named ops kept in float)
    mixed_bits: bool = False    # takes 4-bit weights and the automatic quant.mixed modes

    @abstractmethod
    def prepare_ptq(self, model: nn.Module, quant: DictConfig, example: Tensor) -> nn.Module:
        """The FP32 model, fused, with observers attached, ready for calibration batches."""

    @abstractmethod
    def qat_callback(self, quant: DictConfig, fp32_weights: Path | None,
                     example: Tensor) -> L.Callback:
        """A Lightning callback that makes the module's network fake-quantized before training."""

    @abstractmethod
    def scale_table(self, prepared: nn.Module) -> list[dict]:
        """One row per observed tensor (qlab.quant.scales) of a prepared or QAT model."""

    @abstractmethod
    def convert(self, prepared: nn.Module, example: Tensor) -> nn.Module:
        """The INT8 model on CPU (normalized float in, logits out), biases on the int32 grid."""

    @abstractmethod
    def weight_max(self, int8: nn.Module) -> int:
        """The largest |integer weight| of the INT8 model (decides where it is exact)."""

    @abstractmethod
    def export(self, int8: nn.Module, mean: Sequence[float], std: Sequence[float], out: Path,
               meta: dict, example: Tensor) -> Exported:
        """Write the INT8 artifacts into `out`; return the deployable form, the other runtimes
        of those files and what the export found out."""
