"""Loaders for the exported artifacts that need neither qlab nor TorchScript: torch.export
(.pt2) and ONNX Runtime (.onnx). Each gives a callable: float [0,1] NCHW in, logits out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class OnnxRuntime:
    """An ONNX file run by onnxruntime.InferenceSession on the CPU."""

    def __init__(self, path: Path | bytes, threads: int | None = None) -> None:
        import onnxruntime as ort  # an optional runtime: imported only when an .onnx is run

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        source = path if isinstance(path, bytes) else str(path)
        self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    @classmethod
    def from_bytes(cls, model: bytes, threads: int | None = None) -> OnnxRuntime:
        """A session on a serialized ModelProto."""
        return cls(model, threads)

    def __call__(self, x: Tensor) -> Tensor:
        out = self.session.run(None, {self.input: np.ascontiguousarray(x.float().numpy())})[0]
        return torch.from_numpy(out)


def load_pt2(path: Path) -> torch.nn.Module:
    """torch.export.load(path).module(), as a user would. An INT8 program holds torchao's
    quantized_decomposed ops, which `import torchao` registers (plain torch does not)."""
    import torchao  # noqa: F401  (an optional runtime: imported only when a .pt2 is loaded)

    return torch.export.load(str(path)).module()
