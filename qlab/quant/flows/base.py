"""The interface every quantization flow implements (see qlab.quant.flows)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from torch import Tensor, nn


class Flow(ABC):
    """prepare_ptq / qat_callback -> (calibrate or fine-tune) -> convert -> export."""

    name: str
    kernels: str | None = None  # the INT8 kernels its models run on; None: quant.backend's
    kind: str | None = None     # its scales when not quant.kind's
    deployed_form: str | None = None  # the runtime export() returns when it is not the converted
                                      # model itself (its test accuracy is then measured too)

    def __init__(self) -> None:
        self.export_info: dict = {}  # what export() found out, recorded in metrics.json "int8"

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
               meta: dict, example: Tensor) -> nn.Module:
        """Write the INT8 artifacts into `out`; return the deployable form whose latency counts
        (float [0,1] NCHW in, logits out)."""

    def runtimes(self, out: Path) -> dict[str, nn.Module]:
        """Other runtimes of the exported artifacts in `out` (float [0,1] NCHW in, logits out)
        whose test accuracy the stage also records; none by default."""
        return {}
