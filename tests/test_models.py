import pytest
import torch

from qlab.models import Deployable, build_mobilenet_v2, build_resnet18, build_resnet20, build_resnet50

FUSABLE = {
    "resnet50-cifar": lambda: build_resnet50(stem="cifar", maxpool=True),
    "resnet50-cifar-nomaxpool": lambda: build_resnet50(stem="cifar", maxpool=False),
    "resnet50-imagenet": lambda: build_resnet50(stem="imagenet", maxpool=True),
    "resnet20": build_resnet20, "mobilenet_v2": build_mobilenet_v2, "resnet18": build_resnet18,
}


@pytest.mark.parametrize("name", FUSABLE)
def test_fused_and_unfused_agree_in_eval(name):
    torch.manual_seed(0)
    model = FUSABLE[name]()
    # give BN non-trivial statistics so fusion actually folds something
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model.fuse_model(is_qat=False)
        fused = model(x)
    assert ref.shape == (4, 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(fused, ref, rtol=1e-3, atol=1e-4)


def test_stems_and_maxpool_shape_the_feature_map():
    seen = {}
    for stem, maxpool in [("cifar", True), ("cifar", False), ("imagenet", True)]:
        m = build_resnet50(stem=stem, maxpool=maxpool).eval()
        with torch.no_grad():
            h = m.maxpool(m.relu(m.bn1(m.conv1(torch.zeros(1, 3, 32, 32)))))
        seen[(stem, maxpool)] = h.shape[-1]
    assert seen == {("cifar", True): 16, ("cifar", False): 32, ("imagenet", True): 8}
    assert build_resnet50(stem="cifar").conv1.kernel_size == (3, 3)
    assert build_resnet50(stem="imagenet").conv1.kernel_size == (7, 7)


def test_default_state_dict_is_the_reference_size(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(build_resnet50(num_classes=10).state_dict(), path)
    assert 94.3 <= path.stat().st_size / 1e6 <= 94.5


def test_quantizable_parts_are_present():
    m = build_resnet50()
    block = m.layer1[0]
    assert hasattr(m, "quant") and hasattr(m, "dequant")
    assert isinstance(block.skip_add_relu, torch.ao.nn.quantized.FloatFunctional)
    assert block.relu1 is not block.relu2 and not block.relu1.inplace


def test_bad_model_options_say_what_to_use():
    with pytest.raises(ValueError, match="cifar, imagenet"):
        build_resnet50(stem="vit")
    with pytest.raises(ValueError, match="at least 2"):
        build_resnet50(num_classes=1)


def test_deployable_normalizes_inside():
    torch.manual_seed(0)
    model = build_resnet50(stem="imagenet").eval()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = torch.rand(2, 3, 32, 32)
    manual = model((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    scripted = torch.jit.script(Deployable(model, mean, std).eval())
    torch.testing.assert_close(scripted(x), manual)
