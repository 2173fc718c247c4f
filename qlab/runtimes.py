"""Runtimes for the exported artifacts that need neither qlab nor TorchScript: torch.export
(.pt2), inductor (torch.compile) and ONNX Runtime (.onnx). Each gives a callable: float [0,1]
NCHW in, logits out."""

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
    """torch.export.load(path).module(), as a user would: model_*.pt2 are portable programs
    (aten ops only) that plain torch loads."""
    return torch.export.load(str(path)).module()


def load_pt2e(path: Path) -> torch.nn.Module:
    """A convert_pt2e program (model_int8_pt2e.pt2): its quantize/dequantize ops are torchao's
    quantized_decomposed ops, which `import torchao` registers."""
    import torchao  # noqa: F401  (an optional runtime: imported only when such a file is loaded)

    return torch.export.load(str(path)).module()


def inductor(module: torch.nn.Module, image_size: int, channels: int = 3) -> torch.nn.Module:
    """torch.compile(module) with inductor's freezing (weights folded into the kernels; what
    lowers a PT2E INT8 graph to oneDNN int8 convolutions), compiled now on one image.

    Freezing is switched on for the whole process (torch._inductor.config.freezing), not per
    compile: a recompile for a new batch size must freeze too, and torch.compile's own
    options={"freezing": True} fails on the int8 weight prepacking (onednn.qconv_prepack under
    fake tensors, torch 2.14). It only changes compiles that run without autograd."""
    torch._inductor.config.freezing = True
    compiled = torch.compile(module)
    with torch.inference_mode():
        compiled(torch.rand(1, channels, image_size, image_size))
    return compiled


def int8_kernels_lowered() -> dict[str, int]:
    """How many int8 convolutions / linears inductor has lowered to oneDNN kernels in this
    process so far (its pattern-matcher counters): 0 means a graph ran as float ops between
    quantize/dequantize pairs."""
    from torch._dynamo.utils import counters

    c = counters["inductor"]
    return {"conv": int(c["qconv_unary_lower_count"] + c["qconv2d_binary_lower_count"]),
            "linear": int(c["qlinear_unary_lower_count"] + c["qlinear_binary_lower_count"])}
