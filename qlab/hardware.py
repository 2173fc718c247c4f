"""The machine a stage runs on, and the settings qlab resolves from it.

Three things depend on the CPU and GPU, not on the model:
- training precision (`trainer.precision=auto`): bf16 autocast only where bf16 is native;
  on an AVX2-only CPU it is emulated and about 10x slower than fp32;
- the INT8 engine (`quant.backend=auto`): fbgemm where the int8 kernels use VNNI, x86 elsewhere
  on x86-64, qnnpack on ARM;
- whether INT8 results are exact: without VNNI, the fbgemm / x86 / onednn kernels add u8 x s8
  products in pairs (VPMADDUBSW) that saturate at int16. `int8_saturates` asks the kernels
  themselves, so it also sees an ISA limited by FBGEMM_ENABLE_INSTRUCTIONS / ONEDNN_MAX_CPU_ISA.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from qlab.errors import QlabError


@contextmanager
def quantized_engine(engine: str) -> Iterator[str]:
    """torch.backends.quantized.engine set to `engine` inside the block, restored after it: the
    one place qlab sets the engine. `auto` picks one (resolve_engine); one this torch build
    lacks is refused. Yields the engine set."""
    engine = resolve_engine(engine)
    supported = [e for e in _engines() if e != "none"]
    if engine not in supported:
        raise QlabError(f"quant.backend={engine!r} is not available in this torch build; "
                        f"use one of {', '.join(supported)}.")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield engine
    finally:
        torch.backends.quantized.engine = previous


# A pair of u8 x s8 products is exact in int16 when 2 * 255 * max|w| <= 32767, so |w| <= 64.
PORTABLE_WEIGHT_MAX = 64
TARGETS = ("portable", "vnni")
FLAGS = ("avx2", "avx512_f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_tile",
         "amx_int8")
# Environment variables that make the kernels use less of the CPU than it has (how an AVX2-only
# CPU is reproduced on a newer one); recorded so such a run never passes for the real thing.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS")
# oneDNN ISA names below which it has no native bf16 (its `max_cpu_isa` values).
_ONEDNN_NO_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                   "AVX512_CORE_VNNI")


def _proc_cpuinfo() -> tuple[str, set[str]]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "", set()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return model, set(flags)


@functools.cache
def cpu_flags() -> dict[str, bool]:
    """The CPU features that decide precision and INT8 exactness (cpuinfo, as torch sees them)."""
    get = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.10
    if get is not None:
        caps = get()
        return {f: bool(caps.get(f, False)) for f in FLAGS}
    _, flags = _proc_cpuinfo()
    alias = {"avx512_f": "avx512f"}
    return {f: alias.get(f, f) in flags for f in FLAGS}


@functools.cache
def cpu_model() -> str:
    """The CPU's marketing name, e.g. 'AMD EPYC' or 'Intel(R) Xeon(R) ...'."""
    get = getattr(torch.cpu, "get_capabilities", None)
    name = get().get("cpu_name", "") if get is not None else ""
    return name or _proc_cpuinfo()[0] or platform.processor() or "unknown CPU"


def isa_limits() -> dict[str, str]:
    """The ISA-limiting environment variables set for this process."""
    return {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)}


def native_cpu_bf16() -> bool:
    """True when bf16 matmuls/convs run natively (AVX512_BF16 or AMX) and oneDNN may use them."""
    flags = cpu_flags()
    if not (flags["avx512_bf16"] or flags["amx_bf16"]):
        return False
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() not in _ONEDNN_NO_BF16


def _engines() -> list[str]:
    return list(torch.backends.quantized.supported_engines)


def _is_arm() -> bool:
    return platform.machine().lower() in ("arm64", "aarch64") or platform.machine().lower().startswith("arm")


def gpus() -> list[dict]:
    """Name and compute capability of every visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [{"name": torch.cuda.get_device_name(i),
             "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
            for i in range(torch.cuda.device_count())]


def uses_cuda(accelerator: str) -> bool:
    """Whether Lightning's accelerator setting will train on CUDA here."""
    return str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str:
    """`auto` -> bf16-mixed (Ampere+ or a CPU with native bf16), 16-mixed (older GPUs), 32-true.

    An explicit value is kept; bf16 on a CPU that only emulates it warns (about 10x slower)."""
    precision = str(precision)
    cuda = uses_cuda(accelerator)
    if precision != "auto":
        if "bf16" in precision and not cuda and not native_cpu_bf16():
            warnings.warn(
                f"trainer.precision={precision} on {cpu_model()}, which has no native bf16 "
                f"(AVX512_BF16/AMX){' within ONEDNN_MAX_CPU_ISA' if isa_limits() else ''}: "
                f"bf16 is emulated here and about 10x slower than fp32. "
                f"Use trainer.precision=auto (32-true on this CPU).", stacklevel=2)
        return precision
    if cuda:
        return "bf16-mixed" if torch.cuda.get_device_capability() >= (8, 0) else "16-mixed"
    return "bf16-mixed" if native_cpu_bf16() else "32-true"


@functools.cache
def int8_saturates(engine: str) -> bool:
    """Whether this CPU's `engine` kernels saturate u8 x s8 pair sums at int16 (no VNNI path).

    Asks the kernels: a 1x1 quantized conv and a linear whose every product pair is
    255 * 127 * 2 = 64,770; exact kernels return it, saturating ones at most 32,767."""
    from torch.ao.nn.quantized import Conv2d, Linear

    with quantized_engine(engine), warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated upstream
        exact = 255 * 127 * 8  # 8 input channels
        x = torch.quantize_per_tensor(torch.full((1, 8, 4, 4), 255.0), 1.0, 0, torch.quint8)
        w = torch.quantize_per_tensor(torch.full((1, 8, 1, 1), 127.0), 1.0, 0, torch.qint8)
        conv = Conv2d(8, 1, 1, bias=False)
        conv.set_weight_bias(w, None)
        conv.scale, conv.zero_point = 1024.0, 0  # the exact sum, 259,080, is 253 in these units
        fc = Linear(8, 1, bias_=False)
        fc.set_weight_bias(w.reshape(1, 8), None)
        fc.scale, fc.zero_point = 1024.0, 0
        got = [int(conv(x).int_repr().max()), int(fc(x[:, :, 0, 0]).int_repr().max())]
        return any(g != round(exact / 1024) for g in got)


def resolve_engine(backend: str) -> str:
    """`auto` -> qnnpack on ARM, fbgemm where its int8 kernels use VNNI, x86 elsewhere.

    Measured one image, frozen TorchScript (README, Performance): fbgemm is fastest with VNNI
    (1.68 vs 2.07-2.87 ms), x86 without (10.6 vs 11.4 ms on an AVX2-only EPYC)."""
    if backend != "auto":
        return backend
    supported = _engines()
    if _is_arm() and "qnnpack" in supported:
        return "qnnpack"
    if "fbgemm" in supported and not int8_saturates("fbgemm"):
        return "fbgemm"
    return "x86" if "x86" in supported else "fbgemm"


def quantized_weight_max(model: torch.nn.Module) -> int:
    """The largest |integer weight| of any quantized conv or linear in an eager INT8 model."""
    biggest = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if callable(w) and type(m).__module__.startswith("torch.ao.nn.quantized"):
            w = w()
            if isinstance(w, torch.Tensor) and w.is_quantized:
                biggest = max(biggest, int(w.int_repr().abs().max()))
    return biggest


def quantized_for(weight_max: int) -> str:
    """What an INT8 model with this weight range is exact on."""
    if weight_max <= PORTABLE_WEIGHT_MAX:
        return (f"every CPU: integer weights within +-{PORTABLE_WEIGHT_MAX}, so u8 x s8 pair sums "
                f"fit int16 even without VNNI")
    return ("CPUs whose int8 kernels accumulate in int32 (x86 with AVX512_VNNI/AVX_VNNI, "
            "qnnpack): without VNNI its u8 x s8 pair sums saturate at int16")


def check_int8_exact(weight_max: int, engine: str, what: str) -> None:
    """Refuse to run an INT8 model whose results would be silently wrong on this CPU."""
    if weight_max <= PORTABLE_WEIGHT_MAX or not int8_saturates(engine):
        return
    raise QlabError(
        f"{what} has integer weights up to +-{weight_max} (quantized with quant.target=vnni), "
        f"and the {engine} int8 kernels on this CPU ({cpu_model()}, "
        f"{torch.backends.cpu.get_cpu_capability()}, no VNNI) saturate u8 x s8 pair sums at "
        f"32,767: its outputs would be silently wrong here. Quantize it again with "
        f"quant.target=portable (weights within +-{PORTABLE_WEIGHT_MAX}: exact on every CPU), "
        f"or run it on a CPU with AVX512_VNNI or AVX_VNNI."
    )


def hardware(**resolved) -> dict:
    """The `hardware` block of every metrics.json, report.json and benchmark JSON.

    `resolved` adds the settings resolved for this run (precision, engine, reduce_range, ...)."""
    info = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpus": gpus(),
    }
    if limits := isa_limits():
        info["isa_limits"] = limits
    engine = resolved.get("engine")
    if engine in _engines():
        info["int8_saturates"] = int8_saturates(engine)
    return info | resolved


def resolve_config(cfg, *, trains: bool):
    """The run's config with its `auto` settings resolved (trainer.precision when the stage
    trains, quant.backend), as a read-only copy: resolved once, before anything is built, and
    never written again. Returns (resolved config, the run's `hardware` block); `cfg` itself is
    left as given."""
    resolved = copy.deepcopy(cfg)
    precision = None
    if trains:
        precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
        resolved.trainer.precision = precision
    resolved.quant.backend = resolve_engine(cfg.quant.backend)
    OmegaConf.set_readonly(resolved, True)
    return resolved, hardware(precision=precision, engine=resolved.quant.backend,
                              reduce_range=bool(cfg.quant.reduce_range), int8_target=cfg.quant.target)
