"""ResNet-20, MobileNetV2 and ResNet-18: po2 PTQ and QAT and size, through the same code
(fusion: tests/test_models.py)."""

import copy

import pytest
import torch
from torch import nn
from torch.ao.quantization import FakeQuantize, convert

from qlab.models import CIFAR_MOBILENET_V2, build_mobilenet_v2, build_resnet18, build_resnet20
from qlab.quant.ptq import calibrate, prepare_ptq
from qlab.quant.qat import QATCallback, fake_quant_scales
from qlab.quant.qconfig import build_qconfig
from qlab.quant.scales import is_power_of_two

MEAN, STD = (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)
# name -> (builder, state_dict MB (1 MB = 1e6 bytes) of the FP32 model for 10 classes)
MODELS = {"resnet20": (build_resnet20, 1.1), "mobilenet_v2": (build_mobilenet_v2, 9.1),
          "resnet18": (build_resnet18, 44.7)}


def batches(n=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g), None)
            for _ in range(n)]


def int8_scales(int8: nn.Module) -> list[torch.Tensor]:
    found = []
    for m in int8.modules():
        if isinstance(getattr(m, "scale", None), float):
            found.append(torch.tensor([m.scale]))
        w = getattr(m, "weight", None)
        if callable(w) and w().is_quantized:
            w = w()
            per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
            found.append(w.q_per_channel_scales() if per_channel else torch.tensor([w.q_scale()]))
    return found


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_size(name, tmp_path):
    torch.save(MODELS[name][0]().state_dict(), tmp_path / "sd.pt")
    assert (tmp_path / "sd.pt").stat().st_size / 1e6 == pytest.approx(MODELS[name][1], abs=0.1)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_ptq_gives_power_of_two_scales(name, per_channel, use_engine):
    use_engine("x86")
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    prepared = prepare_ptq(model, build_qconfig(backend="x86", per_channel=per_channel))
    assert calibrate(prepared, batches(), batches=2, mean=MEAN, std=STD) == 16
    int8 = convert(copy.deepcopy(prepared))
    scales = int8_scales(int8)
    assert len(scales) > 20 and all(is_power_of_two(s) for s in scales)
    assert all(-8 <= e <= 8 for s in scales for e in s.log2().tolist())
    x = (torch.rand(2, 3, 32, 32) - 0.45) / 0.2
    with torch.no_grad():
        assert int8(x).shape == (2, 10) and torch.isfinite(int8(x)).all()


@pytest.mark.parametrize("name", MODELS)
def test_qat_runs_po2_fake_quant(name, use_engine):
    use_engine("x86")
    torch.manual_seed(0)
    model = MODELS[name][0]()
    QATCallback(qconfig=build_qconfig(qat=True), fp32_weights=None, freeze_observer_epoch=9,
                freeze_bn_epoch=9).setup(None, type("Lit", (), {"model": model})(), "fit")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, _ in batches():
        loss = model((x.float() / 255 - 0.45) / 0.2).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    fq = fake_quant_scales(model)
    assert len(fq) > 20 and all(is_power_of_two(s) for s in fq.values())
    assert sum(isinstance(m, FakeQuantize) for m in model.modules()) == len(fq)
    int8 = convert(copy.deepcopy(model).eval())
    assert all(is_power_of_two(s) for s in int8_scales(int8))


def test_shapes_for_32x32_inputs():
    r20 = build_resnet20()
    assert len(r20.layers) == 9 and r20.fc.in_features == 64
    assert sum(isinstance(m, nn.Conv2d) for m in r20.modules()) == 19 + 2  # 19 3x3 + 2 projections
    mb = build_mobilenet_v2().eval()
    assert mb.features[0][0].stride == (1, 1) and CIFAR_MOBILENET_V2[1] == [6, 24, 2, 1]
    assert not any(isinstance(m, nn.ReLU6) for m in mb.modules())
    with torch.no_grad():
        assert mb.features(torch.zeros(1, 3, 32, 32)).shape[-1] == 4  # 8x down, not 32x
    with pytest.raises(ValueError, match="6n\\+2"):
        build_resnet20(depth=21)
