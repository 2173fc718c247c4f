"""The runtimes of the exported artifacts: frozen TorchScript, the FP32 model in eager PyTorch,
torch.export (.pt2), inductor (torch.compile) and ONNX Runtime (.onnx). Each gives a callable:
float [0,1] NCHW in, logits out.

RUNTIMES is the one list of them: each entry loads its runtime from a stage folder's files, and
stage=report times every runtime whose files a stage wrote. A new runtime is one loader here
and one entry in RUNTIMES (docs/runtimes.md, "Adding a runtime").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qlab import artifacts
from qlab.checkpoint import load_fp32_weights
from qlab.hardware import check_int8_exact
from qlab.models import Deployable

log = logging.getLogger(__name__)


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


# ---- the registry: every runtime, loaded from one stage folder ----------------------------------

@dataclass(frozen=True)
class StageFiles:
    """One stage folder (outputs/NAME/STAGE) as a runtime loader reads it."""

    folder: Path
    metrics: dict  # the stage's metrics.json
    engine: str  # the quantized engine INT8 TorchScript runs on (quant.backend)
    compile: bool = True  # bench.inductor: compile with inductor (minutes for a large model)

    @property
    def kind(self) -> str:
        """fp32 or int8: the stage's files are model_<kind>.*"""
        return "fp32" if self.metrics["stage"] == "fp32" else "int8"

    @property
    def image_size(self) -> int:
        """The stage's input size (runs from before metrics.json recorded it: 32)."""
        return int(self.metrics.get("image_size") or 32)


Loaded = Callable[[Tensor], Tensor]


def load_scripted(path: Path, engine: str) -> torch.jit.ScriptModule:
    """An exported TorchScript model, frozen, refused if its INT8 results would be wrong on this
    CPU's `engine` kernels."""
    module, meta = artifacts.load_torchscript(path)
    # files from before the metadata existed: assume the full int8 weight range
    weight_max = meta.get("weight_max", 127 if path.name == "model_int8.pt" else 0)
    check_int8_exact(weight_max, engine, str(path))
    try:
        return artifacts.freeze(module)
    except RuntimeError:  # exported frozen already
        return module


def _torchscript_frozen(files: StageFiles, loaded: dict[str, Loaded]) -> Loaded | None:
    path = files.folder / f"model_{files.kind}.pt"
    return load_scripted(path, files.engine) if path.is_file() else None


def _eager(files: StageFiles, loaded: dict[str, Loaded]) -> Loaded | None:
    """The FP32 model as plain eager PyTorch, rebuilt from its config and state_dict."""
    # imported here, not wherever OnnxRuntime is: hydra, and Lightning through qlab.data
    from hydra.utils import instantiate

    from qlab.data import CIFAR_MEAN, CIFAR_STD

    m = files.metrics
    weights = files.folder / "model_fp32_state_dict.pt"
    if files.kind != "fp32" or not weights.is_file() or not m.get("model"):
        return None
    model = instantiate(m["model"], num_classes=len(m["classes"]))
    mean, std = m.get("mean", CIFAR_MEAN), m.get("std", CIFAR_STD)
    return Deployable(load_fp32_weights(model, weights), mean, std).eval()


def _torch_export(files: StageFiles, loaded: dict[str, Loaded]) -> Loaded | None:
    pt2 = files.folder / f"model_{files.kind}.pt2"
    if not pt2.is_file():
        return None
    try:
        return load_pt2(pt2)
    except RuntimeError as e:  # e.g. a q/dq program written before .pt2 files were portable
        log.warning("Skipping %s: plain torch cannot load it (%s); re-run its stage to "
                    "rewrite it.", pt2, str(e).splitlines()[0])
        return None


def _inductor(files: StageFiles, loaded: dict[str, Loaded]) -> Loaded | None:
    """FP32: the eager model (else the .pt2) compiled; INT8: the convert_pt2e graph, lowered to
    int8 kernels."""
    if not files.compile:
        return None
    if files.kind == "fp32":
        source = loaded.get("eager", loaded.get("torch.export"))
    elif (qdq := files.folder / "model_int8_pt2e.pt2").is_file():
        source = load_pt2e(qdq)
    else:
        source = None
    return inductor(source, files.image_size) if source is not None else None


def _onnxruntime(files: StageFiles, loaded: dict[str, Loaded]) -> Loaded | None:
    path = files.folder / f"model_{files.kind}.onnx"
    return OnnxRuntime(path) if path.is_file() else None


# name (as metrics.json "runtimes" and the report call it) -> loader: the runtime of a stage
# folder's files, or None where the stage wrote none for it. In this order; a loader sees the
# runtimes loaded before it (inductor compiles the eager model).
RUNTIMES: dict[str, Callable[[StageFiles, dict[str, Loaded]], Loaded | None]] = {
    "torchscript-frozen": _torchscript_frozen,
    "eager": _eager,
    "torch.export": _torch_export,
    "inductor": _inductor,
    "onnxruntime": _onnxruntime,
}


def load_runtimes(files: StageFiles) -> dict[str, Loaded]:
    """Every runtime in RUNTIMES of one stage folder's files, loaded (compiled for inductor)."""
    loaded: dict[str, Loaded] = {}
    for name, load in RUNTIMES.items():
        if (runtime := load(files, loaded)) is not None:
            loaded[name] = runtime
    return loaded
