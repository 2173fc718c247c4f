import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch.ao.quantization import FakeQuantize, FusedMovingAvgObsFakeQuantize, convert

from qlab.checkpoint import load_fp32_weights, read_state_dict
from qlab.errors import QlabError
from qlab.hardware import quantized_weight_max
from qlab.models import build_resnet50
from qlab.quant.observer import _Po2Mixin
from qlab.quant.ptq import calibrate, prepare_ptq, quantize_ptq
from qlab.quant.qat import QATCallback, fake_quant_scales
from qlab.quant.qconfig import build_qconfig
from qlab.quant.scales import is_power_of_two, scale_table, summarize
from qlab.stages.int8 import require_cpu

from conftest import ROOT

MEAN, STD = (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)


def loader(n=16, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return list(zip(x.split(batch), torch.randint(0, 10, (n,), generator=g).split(batch)))


def quantized_scales(int8: torch.nn.Module) -> list[torch.Tensor]:
    scales = []
    for m in int8.modules():
        if hasattr(m, "scale") and isinstance(m.scale, float):
            scales.append(torch.tensor([m.scale]))
        w = getattr(m, "weight", None)
        if callable(w):
            w = w()
            if w.is_quantized:
                scales.append(w.q_per_channel_scales() if w.qscheme() in (
                    torch.per_channel_affine, torch.per_channel_symmetric) else torch.tensor([w.q_scale()]))
    return scales


@pytest.mark.parametrize("per_channel", [False, True])
def test_ptq_makes_every_int8_scale_a_power_of_two(per_channel, use_engine):
    use_engine("x86")
    torch.manual_seed(0)
    model = build_resnet50(stem="imagenet").eval()
    fp32 = copy.deepcopy(model)
    prepared = prepare_ptq(model, build_qconfig(per_channel=per_channel))
    assert calibrate(prepared, loader(), batches=2, mean=MEAN, std=STD) == 16
    table = scale_table(prepared)
    int8 = convert(copy.deepcopy(prepared))
    scales = quantized_scales(int8)
    assert len(scales) > 100  # every conv/linear output and weight, the stubs and adds
    assert all(is_power_of_two(s) for s in scales)
    assert all(-8 <= e <= 8 for s in scales for e in s.log2().tolist())
    # the table lists the same exponents the INT8 weights carry
    fc_row = next(r for r in table if r["layer"] == "fc" and r["tensor"] == "weight")
    fc_weight = int8.fc.weight()
    if per_channel:  # one scale per output class, each exactly 2^n, n spanning the row's range
        fc_scales = fc_weight.q_per_channel_scales().double()
        mantissa, exponent = torch.frexp(fc_scales)
        assert (mantissa == 0.5).all() and fc_scales.numel() == fc_row["channels"] == 10
        exponent = exponent - 1  # frexp: scale = 0.5 * 2^exponent
        assert torch.equal(fc_scales, torch.pow(2.0, exponent.double()))
        assert (int(exponent.min()), int(exponent.max())) == (fc_row["exp_min"], fc_row["exp_max"])
    else:
        assert fc_row["exp_min"] == fc_row["exp_max"]
        assert fc_weight.q_scale() == 2.0 ** fc_row["exp_max"]
    s = summarize(table)
    assert s["weight"]["scales"] == (26_570 if per_channel else 54)  # 53 convs + fc
    # the INT8 model still computes roughly what the FP32 one does
    x = (torch.rand(4, 3, 32, 32) - 0.45) / 0.2
    with torch.no_grad():
        a, b = fp32(x), int8(x)
    assert torch.isfinite(b).all() and b.shape == a.shape


def test_one_eager_pipeline_fuses_calibrates_converts_and_snaps(use_engine):
    """quantize_ptq is the eager flow's prepare -> calibrate -> convert, biases on their grid."""
    from qlab.integer.export import snap_biases
    from qlab.models import build_resnet20, randomize_batchnorm
    from qlab.quant.flows.eager import EagerFlow

    use_engine("x86")
    quant = OmegaConf.load(ROOT / "conf" / "quant" / "po2.yaml")
    quant.backend = "x86"
    torch.manual_seed(0)
    model = randomize_batchnorm(build_resnet20()).eval()
    steps, example = [], torch.zeros(1, 3, 32, 32)
    int8 = quantize_ptq(copy.deepcopy(model), build_qconfig(backend="x86"), loader(24), batches=2,
                        mean=MEAN, std=STD, example=example, on_step=steps.append)
    assert steps == ["fuse+prepare", "calibrate", "convert"]
    assert snap_biases(int8, example) == 0  # already on the int32 grid
    assert all(is_power_of_two(s) for s in quantized_scales(int8))
    flow = EagerFlow()
    prepared = flow.prepare_ptq(copy.deepcopy(model), quant, example)
    calibrate(prepared, loader(24), batches=2, mean=MEAN, std=STD)
    by_flow = flow.convert(prepared, example)
    x = (torch.rand(4, 3, 32, 32) - 0.45) / 0.2
    with torch.inference_mode():
        assert torch.equal(int8(x), by_flow(x))  # the flow runs the same pipeline
    with pytest.raises(QlabError, match="at least one batch"):
        quantize_ptq(copy.deepcopy(model), build_qconfig(), loader(), batches=0, mean=MEAN,
                     std=STD, example=example)


def test_calibration_needs_batches():
    prepared = prepare_ptq(build_resnet50(stem="imagenet"), build_qconfig())
    with pytest.raises(QlabError, match="at least one batch"):
        calibrate(prepared, loader(), batches=0, mean=MEAN, std=STD)
    with pytest.raises(QlabError, match="no images"):
        calibrate(prepared, [], batches=4, mean=MEAN, std=STD)


def test_quantized_models_refuse_cuda():
    with pytest.raises(QlabError, match="CPU only"):
        require_cpu("cuda")
    require_cpu("cpu")


def _train(model: torch.nn.Module, lr: float, n: int) -> None:
    """SGD steps on n synthetic images, batches of 8."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in loader(n=n, batch=8):
        loss = torch.nn.functional.cross_entropy(model((x.float() / 255 - 0.5) / 0.25), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_qat_runs_the_po2_observer_inside_fake_quant(use_engine):
    use_engine("x86")
    torch.manual_seed(0)
    model = build_resnet50(stem="imagenet")
    cb = QATCallback(qconfig=build_qconfig(qat=True, per_channel=True), fp32_weights=None,
                     freeze_observer_epoch=1, freeze_bn_epoch=1)
    lit = type("Lit", (), {"model": model})()
    cb.setup(None, lit, "fit")
    fqs = [m for m in model.modules() if isinstance(m, FakeQuantize)]
    assert fqs and not any(isinstance(m, FusedMovingAvgObsFakeQuantize) for m in model.modules())
    assert all(isinstance(m.activation_post_process, _Po2Mixin) for m in fqs)
    _train(model, lr=0.01, n=16)
    scales = fake_quant_scales(model)
    assert len(scales) == len(fqs)
    for name, s in scales.items():
        assert is_power_of_two(s), (name, s)
        assert s.log2().abs().max() <= 8
    # frozen on schedule: observers off, BN statistics frozen
    trainer = type("T", (), {"current_epoch": 1})()
    cb.on_train_epoch_start(trainer, lit)
    assert all(not bool(m.observer_enabled) for m in fqs)
    assert all(m.freeze_bn for m in model.modules() if hasattr(m, "freeze_bn"))
    int8 = convert(copy.deepcopy(model).eval())
    assert all(is_power_of_two(s) for s in quantized_scales(int8))
    # quant.target=portable: training already sees the +-64 weight grid the INT8 model keeps
    assert all((m.quant_min, m.quant_max) == (-64, 64) for n, m in model.named_modules()
               if n.endswith("weight_fake_quant"))
    assert 32 < quantized_weight_max(int8) <= 64


@pytest.mark.parametrize("kind", ["po2", "torch"])
@pytest.mark.parametrize("target,limit", [("portable", 64), ("vnni", 128)])
def test_target_bounds_the_integer_weights(kind, target, limit, use_engine):
    use_engine("x86")
    torch.manual_seed(0)
    prepared = prepare_ptq(build_resnet50(stem="imagenet").eval(),
                           build_qconfig(kind=kind, backend="x86", target=target))
    calibrate(prepared, loader(), batches=1, mean=MEAN, std=STD)
    biggest = quantized_weight_max(convert(prepared))
    assert limit // 2 < biggest <= limit


def test_weights_load_through_prefixes_and_bad_files_are_explained(tmp_path):
    model = build_resnet50(stem="imagenet")
    sd = model.state_dict()
    # a LitClassifier checkpoint: the network under model., the module's own normalize buffers
    lit = {f"model.{k}": v for k, v in sd.items()} | {"normalize.mean": torch.zeros(1, 3, 1, 1),
                                                      "normalize.std": torch.ones(1, 3, 1, 1)}
    torch.save({"state_dict": lit, "epoch": 3}, tmp_path / "l.ckpt")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    for f in ("l.ckpt", "ddp.pt"):
        fresh = build_resnet50(stem="imagenet")
        load_fp32_weights(fresh, tmp_path / f)
        assert torch.equal(fresh.fc.weight, model.fc.weight)
    with pytest.raises(QlabError, match="trained for 10 classes, but this run has 5"):
        load_fp32_weights(build_resnet50(stem="imagenet", num_classes=5), tmp_path / "ddp.pt")
    with pytest.raises(QlabError, match="another architecture"):
        load_fp32_weights(build_resnet50(stem="cifar"), tmp_path / "ddp.pt")
    blob = (tmp_path / "ddp.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(QlabError, match="truncated or corrupt"):
        read_state_dict(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(QlabError, match="truncated or corrupt"):
        read_state_dict(tmp_path / "junk.pt")
    with pytest.raises(QlabError, match="does not exist"):
        read_state_dict(tmp_path / "none.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(QlabError, match="holds no state_dict"):
        read_state_dict(tmp_path / "list.pt")


def test_torch_qconfig_and_unknown_options():
    q = build_qconfig(kind="torch", backend="x86")
    assert "HistogramObserver" in repr(q.activation())
    with pytest.raises(QlabError, match="quant=po2 or quant=torch"):
        build_qconfig(kind="lsq")
    for key, bad in (("weight_averaging_constant", 0), ("averaging_constant", 1.5),
                     ("averaging_constant", True)):
        with pytest.raises(QlabError, match=rf"quant.{key}={bad}: a moving-average constant is in"):
            build_qconfig(qat=True, **{key: bad})


def _observed(cb: QATCallback, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every activation observer's running range and its fake-quant's scale."""
    out = {}
    for i, m in enumerate(cb.activation_fake_quants(model)):
        out[f"{i}.scale"] = m.scale.detach().clone()
        for key in ("min_val", "max_val"):
            out[f"{i}.{key}"] = getattr(m.activation_post_process, key).detach().clone()
    return out


@pytest.mark.parametrize("flow_name", ["eager", "pt2e"])
def test_qat_observers_watch_training_images_only(flow_name, use_engine):
    """Validation and test passes leave every observer as training left it (their images are
    4x wider, so a live observer would widen), also before freeze_observer_epoch; training
    after a mid-epoch validation observes again."""
    import lightning as L

    from qlab.models import build_resnet20
    from qlab.quant.flows import get_flow

    use_engine("x86")
    torch.manual_seed(0)
    quant = OmegaConf.load(ROOT / "conf" / "quant" / "po2.yaml")
    cb = get_flow(flow_name).qat_callback(quant, None, torch.zeros(1, 3, 32, 32))
    snaps: dict[str, dict] = {}

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_resnet20(num_classes=10)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, i):
            snaps[f"train{i}-start"] = _observed(cb, self.model)
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def on_train_batch_end(self, outputs, batch, i):
            snaps[f"train{i}-end"] = _observed(cb, self.model)

        def validation_step(self, batch, i):
            self(batch[0] * 4)

        def test_step(self, batch, i):
            self(batch[0] * 4)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 32, 32, generator=g),
                                          torch.randint(0, 10, (64,), generator=g))
    batches = torch.utils.data.DataLoader(data, batch_size=16)
    trainer = L.Trainer(max_epochs=1, val_check_interval=2, num_sanity_val_steps=1,
                        limit_val_batches=1, callbacks=[cb], accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    net = Net()
    trainer.fit(net, batches, batches)
    assert quant.qat.freeze_observer_epoch > 0  # observers live all through this run
    # training moves the ranges, after the sanity check and after the mid-epoch validation
    for i in range(4):
        before, after = snaps[f"train{i}-start"], snaps[f"train{i}-end"]
        assert any(not torch.equal(before[k], after[k]) for k in before), i
    # the validation after batch 1 (and the one ending the epoch) changed nothing
    # the weights' fake-quants (21 convs and the head) are not among those switched off
    acts = cb.activation_fake_quants(net.model)
    every = [m for m in net.model.modules() if hasattr(m, "observer_enabled")]
    assert len(every) - len(acts) == 22 and len(acts) >= 31
    for k, v in snaps["train1-end"].items():
        assert torch.equal(v, snaps["train2-start"][k]), k
    trainer.test(net, batches)
    for k, v in snaps["train3-end"].items():
        assert torch.equal(v, _observed(cb, net.model)[k]), k


@pytest.mark.parametrize("constant,ships_what_it_trained", [(1.0, True), (0.01, False)])
def test_qat_weights_are_quantized_as_conversion_will(constant, ships_what_it_trained, use_engine):
    """quant.weight_averaging_constant=1 (the default): every weight fake-quant scales the
    weights it is given (BN folded in) by their own range, so after training moved them the
    converted INT8 weights are exactly the fake-quantized ones the network last ran with. An
    averaged range (torch's 0.01) lags behind them: conversion then ships other integers."""
    from qlab.models import build_resnet20

    use_engine("x86")
    torch.manual_seed(0)
    model = build_resnet20(num_classes=10)
    cb = QATCallback(qconfig=build_qconfig(qat=True, per_channel=True, weight_bits=4,
                                           rounding="ceil", max_shift=12,
                                           weight_averaging_constant=constant),
                     fp32_weights=None, freeze_observer_epoch=9, freeze_bn_epoch=9)
    lit = type("Lit", (), {"model": model})()
    cb.setup(None, lit, "fit")
    _train(model, lr=0.5, n=32)
    seen = {}
    weight_fqs = {n: m for n, m in model.named_modules() if n.endswith("weight_fake_quant")}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n, m in weight_fqs.items()]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    int8 = convert(copy.deepcopy(model))
    ops = {n: m for n, m in int8.named_modules() if callable(getattr(m, "weight", None))}
    assert len(ops) == len(weight_fqs) == 22
    same = []
    for name, fq in weight_fqs.items():
        w, fake = seen[name]
        q = ops[name.removesuffix(".weight_fake_quant")].weight()
        same.append(torch.equal(q.q_per_channel_scales().float(), fq.scale)
                    and torch.allclose(q.dequantize(), fake, rtol=0, atol=1e-6))
        if constant == 1.0:  # the scale is that of the weights' own range, as PTQ would set it
            top = w.abs().amax(dim=(1, 2, 3) if w.dim() == 4 else 1)
            assert torch.equal(fq.scale, fq.activation_post_process.po2_qparams(-top, top)["scale"])
    assert all(same) if ships_what_it_trained else not all(same)
