"""Settings resolved from the machine, and INT8 results equal to exact integer arithmetic."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub, convert, prepare
from torch.nn import functional as F

from qlab import hardware
from qlab.errors import QlabError
from qlab.hardware import (
    PORTABLE_WEIGHT_MAX,
    check_int8_exact,
    int8_saturates,
    quantized_engine,
    quantized_weight_max,
    resolve_config,
    resolve_engine,
)
from qlab.quant.qconfig import build_qconfig

from conftest import AVX2_ONLY, ROOT, X86

x86_only = pytest.mark.skipif(not X86, reason="the int8 saturation is an x86 matter")


class OneConv(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1, bias=False)

    def forward(self, x):
        return self.dequant(self.conv(self.quant(x)))


def conv_against_integer_math(target: str, engine: str) -> dict:
    """Quantize a 3x3 conv with qlab's qconfig; compare its INT8 output with exact integer math.

    Inputs sit mostly at the top of the calibrated range (u8 near 255) and weights mostly at
    +-max: with full 8-bit weights adjacent u8 x s8 products sum far past 32,767."""
    with quantized_engine(engine):  # restored afterwards: other tests keep their engine
        torch.manual_seed(0)
        model = OneConv().eval()
        with torch.no_grad():
            model.conv.weight.copy_(torch.where(torch.rand_like(model.conv.weight) < 0.5, 1.0, -1.0))
            model.conv.weight[:, :, 1, 1] = 1.0  # a same-sign run along the input channels
        model.qconfig = build_qconfig(backend=engine, target=target)
        prepare(model, inplace=True)
        x = torch.where(torch.rand(4, 16, 8, 8) < 0.9, 1.0, torch.rand(4, 16, 8, 8))
        model(x)
        int8 = convert(model)
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            xq = int8.quant(x)
            got = int8.conv(xq).int_repr().long()
        w = int8.conv.weight()
        wq = w.int_repr().double()
        a = (xq.int_repr().long() - xq.q_zero_point()).double()
        acc = F.conv2d(a, wq, padding=1)  # exact: every sum is far below 2^53
        mult = xq.q_scale() * w.q_scale() / int8.conv.scale  # a power of two: exact in float
        zp = int8.conv.zero_point
        # the exact accumulator, requantized by either engine's rule, which differ only at ties:
        # fbgemm rounds half to even then adds the zero point, oneDNN adds it first
        fbgemm_rule = (torch.round(acc * mult) + zp).clamp(0, 255).long()
        onednn_rule = torch.round(acc * mult + zp).clamp(0, 255).long()
        pairs = xq.int_repr().double()[:, 0::2, 4, 4].unsqueeze(1) * wq[:, 0::2, 1, 1].unsqueeze(0) \
            + xq.int_repr().double()[:, 1::2, 4, 4].unsqueeze(1) * wq[:, 1::2, 1, 1].unsqueeze(0)
        wrong = (got != fbgemm_rule) & (got != onednn_rule)
        return {"exact": not bool(wrong.any()), "mismatches": int(wrong.sum()),
                "largest_error": int((got - fbgemm_rule).abs().max()),
                "weight_max": quantized_weight_max(int8), "max_pair_sum": int(pairs.abs().max()),
                "saturates": int8_saturates(engine)}


@pytest.mark.parametrize("engine", ["auto", "fbgemm", "x86", "onednn", "qnnpack"])
def test_default_settings_give_exact_integer_results_on_this_cpu(engine):
    if hardware.resolve_engine(engine) not in torch.backends.quantized.supported_engines:
        pytest.skip(f"{engine} is not in this torch build")
    r = conv_against_integer_math("portable", hardware.resolve_engine(engine))
    assert r["weight_max"] == PORTABLE_WEIGHT_MAX and r["max_pair_sum"] <= 32767
    assert r["exact"], r
    # with full 8-bit weights the same conv's pair sums overflow int16: the case that matters
    full = conv_against_integer_math("vnni", hardware.resolve_engine(engine))
    assert full["max_pair_sum"] > 32767 and full["weight_max"] == 127
    assert full["exact"] == (not full["saturates"])


@x86_only
def test_on_an_avx2_only_cpu_full_weights_saturate_and_qlab_refuses_them():
    code = ("import json, test_hardware as t; from qlab import hardware as h; "
            "print(json.dumps({e: {g: t.conv_against_integer_math(g, e) for g in ('portable', 'vnni')} "
            "for e in ('fbgemm', 'x86', 'onednn')} | {'engine': h.resolve_engine('auto'), "
            "'precision': h.resolve_precision('auto', 'cpu'), 'hw': h.hardware()}))")
    env = dict(os.environ, **AVX2_ONLY, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["hw"]["cpu_capability"] == "AVX2" and r["hw"]["isa_limits"] == AVX2_ONLY
    for engine in ("fbgemm", "x86", "onednn"):
        assert r[engine]["portable"]["exact"], (engine, r[engine])  # qlab's default: exact
        assert r[engine]["vnni"]["saturates"] and not r[engine]["vnni"]["exact"], (engine, r[engine])
    assert r["engine"] == "x86" and r["precision"] == "32-true"


def test_check_refuses_full_weights_only_where_kernels_saturate(monkeypatch):
    monkeypatch.setattr(hardware, "int8_saturates", lambda engine: engine == "fbgemm")
    check_int8_exact(PORTABLE_WEIGHT_MAX, "fbgemm", "m")
    check_int8_exact(127, "qnnpack", "m")
    with pytest.raises(QlabError, match="quant.target=portable") as e:
        check_int8_exact(127, "fbgemm", "model.pt")
    assert "model.pt" in str(e.value) and "VNNI" in str(e.value)


def _machine(monkeypatch, *, cuda=None, bf16=False, vnni=True, arm=False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None)
    if cuda is not None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cuda)
    monkeypatch.setattr(hardware, "native_cpu_bf16", lambda: bf16)
    monkeypatch.setattr(hardware, "int8_saturates", lambda engine: not vnni)
    monkeypatch.setattr(hardware, "_is_arm", lambda: arm)


@pytest.mark.parametrize("machine,accelerator,want", [
    ({"cuda": (8, 0)}, "auto", "bf16-mixed"),       # A100
    ({"cuda": (7, 0)}, "auto", "16-mixed"),         # V100
    ({"cuda": (7, 5)}, "gpu", "16-mixed"),          # T4
    ({"cuda": (9, 0)}, "cpu", "32-true"),           # a GPU is there, the run asked for the CPU
    ({"bf16": True}, "auto", "bf16-mixed"),         # AVX512_BF16 / AMX
    ({"bf16": False}, "auto", "32-true"),           # AVX2 only
])
def test_precision_auto(monkeypatch, machine, accelerator, want):
    _machine(monkeypatch, **machine)
    assert hardware.resolve_precision("auto", accelerator) == want


def test_explicit_precision_is_kept_and_emulated_bf16_warns(monkeypatch):
    _machine(monkeypatch, bf16=False)
    assert hardware.resolve_precision(32) == "32"
    with pytest.warns(UserWarning, match="emulated"):
        assert hardware.resolve_precision("bf16-mixed") == "bf16-mixed"
    _machine(monkeypatch, bf16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hardware.resolve_precision("bf16-mixed") == "bf16-mixed"


@pytest.mark.parametrize("machine,want", [({"vnni": True}, "fbgemm"), ({"vnni": False}, "x86")])
def test_engine_auto(monkeypatch, machine, want):
    _machine(monkeypatch, **machine)
    assert hardware.resolve_engine("auto") == want
    assert hardware.resolve_engine("onednn") == "onednn"


def test_engine_auto_on_arm(monkeypatch):
    _machine(monkeypatch, arm=True)
    monkeypatch.setattr(hardware, "_engines", lambda: ["qnnpack", "none"])
    assert hardware.resolve_engine("auto") == "qnnpack"


def test_the_engine_is_set_inside_the_block_and_restored_after_it():
    before = torch.backends.quantized.engine
    other = next(e for e in ("fbgemm", "x86", "qnnpack") if e in torch.backends.quantized.supported_engines
                 and e != before)
    with quantized_engine(other) as engine:
        assert engine == other == torch.backends.quantized.engine
    assert torch.backends.quantized.engine == before
    with pytest.raises(ValueError, match="inside"), quantized_engine(other):
        raise ValueError("inside")  # restored after an error too
    assert torch.backends.quantized.engine == before
    with quantized_engine("auto") as engine:
        assert engine == hardware.resolve_engine("auto") == torch.backends.quantized.engine
    with pytest.raises(QlabError, match=r"quant.backend='tpu' is not available in this torch build; "
                                        r"use one of "):
        quantized_engine("tpu").__enter__()
    assert torch.backends.quantized.engine == before


def test_hardware_block_names_the_machine():
    hw = hardware.hardware(precision="32-true", engine="x86", reduce_range=False)
    assert hw["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {"avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16"} <= set(hw["cpu_flags"])
    assert hw["cores"] >= 1 and hw["threads"] >= 1 and isinstance(hw["gpus"], list)
    assert hw["precision"] == "32-true" and hw["engine"] == "x86" and "int8_saturates" in hw


def test_bad_target_is_explained():
    with pytest.raises(QlabError, match="portable"):
        build_qconfig(target="everywhere")


def test_config_is_resolved_once_into_a_read_only_copy():
    """resolve_config answers `auto` once; the stages read the copy and can never write it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from omegaconf.errors import ReadonlyConfigError

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["quant.backend=auto", "trainer.precision=auto"])
    resolved, hw = resolve_config(cfg, trains=True)
    assert cfg.quant.backend == "auto" and cfg.trainer.precision == "auto"  # the input is kept
    assert resolved.quant.backend == hw["engine"] == resolve_engine("auto") != "auto"
    assert resolved.trainer.precision == hw["precision"] != "auto"
    assert OmegaConf.is_readonly(resolved)
    with pytest.raises(ReadonlyConfigError):
        resolved.quant.float_layers = ["fc"]
    quantize, hw = resolve_config(cfg, trains=False)  # a stage that does not train
    assert quantize.trainer.precision == "auto" and hw["precision"] is None
