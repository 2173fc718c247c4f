"""AirNet and airbench's training recipe: whitening init, the options it trains with (dirac init,
fixed BN weights, logit scale folded before quantization), lookahead, parameter freezing, the
BN-bias lr scale, test-time augmentation, and experiment=airnet through the CLI."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qlab.callbacks import FreezeParameters, Lookahead
from qlab.checkpoint import load_fp32_weights
from qlab.errors import QlabError
from qlab.evaluate import evaluate, tta_logits, tta_views
from qlab.models import build_airnet
from qlab.module import LitClassifier

from conftest import read_metrics, run_cli

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def test_whitening_decorrelates_the_strongest_patch_directions():
    torch.manual_seed(0)
    # correlated channels: patches whose covariance is far from identity
    base = torch.randn(64, 1, 16, 16)
    images = torch.cat([base, 0.5 * base + 0.1 * torch.randn_like(base),
                        torch.randn(64, 1, 16, 16)], 1)
    model = build_airnet(whiten_width=8)
    model.init_whitening(images, eps=0.0)
    out = model.whiten(images)[:, :4] - model.whiten.bias[:4].view(1, -1, 1, 1)
    flat = out.permute(1, 0, 2, 3).reshape(4, -1)
    flat = flat - flat.mean(1, keepdim=True)
    cov = flat @ flat.T / flat.shape[1]
    torch.testing.assert_close(cov, torch.eye(4), atol=0.02, rtol=0)
    w = model.whiten.weight
    torch.testing.assert_close(w[4:], -w[:4])  # each filter followed by its negative


def test_airbench_options_shape_the_network():
    model = build_airnet(init="dirac", bn_momentum=0.4, bn_weight=False, logit_scale=0.5)
    conv = model.layers[1].conv1  # 64 -> 256
    centre = torch.zeros(64, 64, 3, 3)
    centre[torch.arange(64), torch.arange(64), 1, 1] = 1.0
    torch.testing.assert_close(conv.weight[:64], centre)  # identity on the first 64 filters
    assert conv.weight[64:].abs().sum() > 0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 and all(b.momentum == 0.4 and not b.weight.requires_grad for b in bns)
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    for bad, match in ((dict(init="xavier"), "model.init"), (dict(bn_momentum=0.0), "bn_momentum"),
                       (dict(logit_scale=0.0), "logit_scale"), (dict(whiten_width=7), "even")):
        with pytest.raises(ValueError, match=match):
            build_airnet(**bad)


def test_the_logit_scale_folds_into_the_head(tmp_path):
    torch.manual_seed(0)
    model = build_airnet(logit_scale=1 / 9).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        unscaled = model.fc(model.pool(model.layers(model.whiten_relu(model.whiten(x)))).flatten(1))
        torch.testing.assert_close(ref, unscaled / 9)
        torch.save(model.state_dict(), tmp_path / "w.pt")
        # every quantization flow loads through load_fp32_weights: the scale is in fc there
        fresh = load_fp32_weights(build_airnet(logit_scale=1 / 9), tmp_path / "w.pt").eval()
        assert fresh.logit_scale == 1.0
        torch.testing.assert_close(fresh(x), ref)
        fused = copy.deepcopy(model)
        fused.fuse_model(is_qat=False)
        fused.fold_logit_scale()  # idempotent
        assert fused.logit_scale == 1.0
        torch.testing.assert_close(fused(x), ref, atol=1e-4, rtol=1e-4)
        scripted = torch.jit.script(model)  # the FP32 export keeps the scale
        torch.testing.assert_close(scripted(x), ref)


def _toy():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    return SimpleNamespace(model=model), model


def test_lookahead_pulls_weights_to_a_slow_average_and_ends_on_it():
    pl, model = _toy()
    la = Lookahead(every=2, decay=0.5)
    trainer = SimpleNamespace(global_step=2, estimated_stepping_batches=4)
    w0 = model[0].weight.detach().clone()
    la.on_train_batch_end(trainer, pl, None, None, 0)  # first update: the average starts at w
    torch.testing.assert_close(model[0].weight, w0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(2.0)
    trainer.global_step = 3  # not a multiple of `every`: nothing happens
    la.on_train_batch_end(trainer, pl, None, None, 0)
    torch.testing.assert_close(model[0].weight, w0 + 1.0)
    # the last step: d = 1, the weights become the average (still w0), BN statistics too
    restored = Lookahead(every=2, decay=0.5)
    restored.load_state_dict(la.state_dict())
    trainer.global_step = 4
    la.on_train_batch_end(trainer, pl, None, None, 0)
    torch.testing.assert_close(model[0].weight, w0)
    torch.testing.assert_close(model[1].running_mean, torch.zeros(4))
    # a resumed run starts from the saved average, not from the current weights
    with torch.no_grad():
        model[0].weight.add_(1.0)
    restored.on_train_batch_end(trainer, pl, None, None, 0)
    torch.testing.assert_close(model[0].weight, w0)
    # d in between: w <- ema + (1 - d)(w - ema)
    la2, (pl2, m2) = Lookahead(every=1, decay=0.5), _toy()
    t = SimpleNamespace(global_step=1, estimated_stepping_batches=2)
    v0 = m2[0].weight.detach().clone()
    la2.on_train_batch_end(t, pl2, None, None, 0)
    with torch.no_grad():
        m2[0].weight.add_(8.0)
    d = 0.5 * (1 / 2) ** 3
    la2.on_train_batch_end(t, pl2, None, None, 0)
    torch.testing.assert_close(m2[0].weight, v0 + (1 - d) * 8.0)
    with pytest.raises(QlabError, match="every"):
        Lookahead(every=0)


def test_lookahead_leaves_fake_quant_scales_alone(use_engine):
    from qlab.callbacks import _averaged
    from qlab.quant.qat import QATCallback
    from qlab.quant.qconfig import build_qconfig

    use_engine("x86")
    model = build_airnet()
    QATCallback(qconfig=build_qconfig(qat=True), fp32_weights=None, freeze_observer_epoch=9,
                freeze_bn_epoch=9).setup(None, SimpleNamespace(model=model), "fit")
    names = list(_averaged(model))
    assert names and not any("scale" in n or "zero_point" in n or "observer" in n for n in names)
    assert any(n.endswith("running_var") for n in names)


def test_freeze_parameters_from_an_epoch_on():
    pl = SimpleNamespace(named_parameters=lambda: dict(
        {"model.whiten.bias": nn.Parameter(torch.zeros(2))}).items())
    params = dict(pl.named_parameters())
    cb = FreezeParameters(names=["model.whiten.bias"], epoch=3)
    cb.on_train_epoch_start(SimpleNamespace(current_epoch=2), pl)
    assert params["model.whiten.bias"].requires_grad
    p = nn.Parameter(torch.zeros(2))
    pl = SimpleNamespace(named_parameters=lambda: [("model.whiten.bias", p)])
    cb.on_train_epoch_start(SimpleNamespace(current_epoch=3), pl)
    assert not p.requires_grad
    with pytest.raises(QlabError, match="not parameters"):
        FreezeParameters(names=["model.nope"], epoch=0).on_train_epoch_start(
            SimpleNamespace(current_epoch=0), pl)


def test_bn_biases_get_their_own_lr_and_the_same_decay_per_step():
    from functools import partial

    lit = LitClassifier(model=build_airnet(bn_weight=False), num_classes=10, mean=MEAN, std=STD,
                        optimizer=partial(torch.optim.SGD, lr=1.5, weight_decay=1e-3),
                        scheduler=None, norm_bias_lr_scale=64.0)
    groups = lit.param_groups()
    assert len(groups) == 2 and len(groups[1]["params"]) == 6  # 6 BN biases
    opt = lit.optimizer_factory(params=groups)
    assert opt.param_groups[1]["lr"] == 96.0
    assert opt.param_groups[1]["lr"] * opt.param_groups[1]["weight_decay"] == pytest.approx(1.5e-3)
    n_all = sum(1 for _ in lit.parameters())
    assert len(groups[0]["params"]) + 6 == n_all
    with pytest.raises(QlabError, match="norm_bias_lr_scale"):
        LitClassifier(model=build_airnet(), num_classes=10, mean=MEAN, std=STD,
                      optimizer=partial(torch.optim.SGD, lr=1.0), scheduler=None,
                      norm_bias_lr_scale=0.0)


def test_tta_views_are_the_mirror_and_one_pixel_shifts():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    assert [w for w, _ in tta_views(x, "none")] == [1.0]
    views = tta_views(x, "flip_translate")
    assert sum(w for w, _ in views) == pytest.approx(1.0) and len(views) == 6
    (_, a), (_, b), (_, down), (_, down_flipped), (_, up), _ = views
    torch.testing.assert_close(a, x)
    torch.testing.assert_close(b, x.flip(-1))
    torch.testing.assert_close(down[..., 1:, 1:], x[..., :-1, :-1])  # content moves down-right
    torch.testing.assert_close(down[..., 0, 1:], x[..., 1, :-1])  # reflect padding
    torch.testing.assert_close(down_flipped, down.flip(-1))
    torch.testing.assert_close(up[..., :-1, :-1], x[..., 1:, 1:])

    # logits of a model that reads one pixel: the weighted views, exactly
    def corner(v):
        return v[:, 0, 0, :2]
    got = tta_logits(corner, x, "flip")
    torch.testing.assert_close(got, 0.5 * x[:, 0, 0, :2] + 0.5 * x.flip(-1)[:, 0, 0, :2])
    with pytest.raises(QlabError, match="module.tta"):
        evaluate(corner, [], num_classes=2, mean=(0,), std=(1,), tta="mirror")


def test_tta_of_a_mirror_symmetric_model_changes_nothing():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    loader = [(images, torch.randint(0, 3, (16,)))]

    def symmetric(v):  # invariant under a horizontal flip
        return (v + v.flip(-1)).mean((2, 3))
    plain = evaluate(symmetric, loader, num_classes=3, mean=MEAN, std=STD)
    flipped = evaluate(symmetric, loader, num_classes=3, mean=MEAN, std=STD, tta="flip")
    assert plain["confmat"].tolist() == flipped["confmat"].tolist()
    assert plain["loss"] == pytest.approx(flipped["loss"], rel=1e-5)


AIRNET = ["experiment=airnet", "data=synthetic", "data.num_train=160", "data.num_test=64",
          "data.batch_size=32", "data.eval_batch_size=64", "trainer.max_epochs=2",
          "trainer.enable_progress_bar=false", "bench.runs=5", "bench.warmup=1",
          "export.pt2=false", "export.onnx=false", "module.tta=flip_translate",
          "callbacks.freeze.epoch=1", "quant.calib_batches=2"]


@pytest.mark.slow
def test_experiment_airnet_trains_tests_with_tta_and_quantizes(tmp_path):
    run_cli("train.py", "stage=fp32", "name=a", *AIRNET, outputs=tmp_path)
    out = tmp_path / "a" / "fp32"
    m = read_metrics(out / "metrics.json")
    assert m["tta"] == "flip_translate" and m["model"]["logit_scale"] == pytest.approx(1 / 9)
    # the test figure is the exported model's, averaged over the 6 views
    from omegaconf import OmegaConf

    from qlab.stages.common import build_datamodule

    dm = build_datamodule(OmegaConf.load(out / ".hydra" / "config.yaml"))
    dm.setup("test")
    images, labels = dm.splits["test"]
    scripted = torch.jit.load(str(out / "model_fp32.pt"))
    with torch.no_grad():
        predicted = tta_logits(scripted, images.float() / 255.0, "flip_translate").argmax(1)
    assert m["accuracy"] == pytest.approx(100.0 * int((predicted == labels).sum()) / 64)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert "Lookahead" in " ".join(ckpt["callbacks"])  # its average resumes with the run
    state = ckpt["state_dict"]
    assert not torch.equal(state["model.whiten.bias"], torch.zeros_like(state["model.whiten.bias"]))

    run_cli("quantize.py", "stage=ptq", "name=a", *AIRNET, outputs=tmp_path)
    ptq = read_metrics(tmp_path / "a" / "ptq" / "metrics.json")
    assert ptq["tta"] == "flip_translate" and ptq["model"]["logit_scale"] == pytest.approx(1 / 9)
    # INT8 tracks FP32 (the scale folded once: test_the_logit_scale_folds_into_the_head)
    assert ptq["accuracy"] > max(m["accuracy"] - 15.0, 20.0), (ptq["accuracy"], m["accuracy"])
    run_cli("quantize.py", "stage=report", "name=a", *AIRNET, outputs=tmp_path)
    report = (tmp_path / "a" / "report.md").read_text()
    assert "- fp32: test logits averaged over 6 views (flip_translate)" in report
    assert json.loads((tmp_path / "a" / "report.json").read_text())["tta"]["ptq"] == "flip_translate"


@pytest.mark.parametrize("experiment", ["airnet", "airnet_wide", "testbed", "resnet20_cpu",
                                        "resnet50_cpu", "reference", "demo"])
def test_every_experiment_composes_a_working_schedule_for_fp32_and_qat(experiment):
    """An experiment's scheduler keys must not leak into QAT's cosine (stage=qat overrides the
    scheduler group): both stages' optimizer and scheduler build."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = str(Path(__file__).parents[1] / "conf")
    for stage in ("fp32", "qat"):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={experiment}", f"stage={stage}",
                                              "data.root=/nonexistent"])
        optimizer = instantiate(cfg.optimizer)(params=[nn.Parameter(torch.zeros(1))])
        extra = {"total_steps": 10} if cfg.scheduler.get("total_steps", 0) is None else {}
        scheduler = instantiate(cfg.scheduler)(optimizer=optimizer, **extra)
        if stage == "qat":
            assert type(scheduler).__name__ == "CosineAnnealingLR"


def test_the_testbed_is_the_wide_airnet_with_airnets_recipe():
    """experiment=testbed = airnet_wide: airbench95's widths and lr on top of experiment=airnet,
    whose recipe (schedule, TTA, lookahead, per-channel weights) it keeps."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = str(Path(__file__).parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        testbed, airnet = (compose("train", overrides=[f"experiment={e}", "data.root=/x"])
                           for e in ("testbed", "airnet"))
    assert list(testbed.model.widths) == [128, 384, 384] and testbed.optimizer.lr == 1.3
    assert list(airnet.model.widths) == [64, 256, 256] and airnet.optimizer.lr == 1.5
    for key in ("trainer", "data", "module", "augment", "callbacks", "quant"):
        assert testbed[key] == airnet[key], key
    assert testbed.scheduler.max_lr == 1.3  # the schedule peaks at the experiment's own lr
    assert {**testbed.scheduler, "max_lr": 1.5} == dict(airnet.scheduler)


def test_the_whitening_can_run_in_float32_under_bf16_autocast():
    """model.whiten_float32: the whitening conv's weak directions (large filters whose taps nearly
    cancel) lose several % to bf16; in float32 they are exact, and the rest stays in bf16."""
    torch.manual_seed(0)
    base = torch.randn(16, 1, 32, 32)  # nearly grey images: the colour directions are weak
    images = base.expand(16, 3, 32, 32) + 0.02 * torch.randn(16, 3, 32, 32)
    errors = {}
    for flag in (False, True):
        model = build_airnet(whiten_float32=flag).eval()
        model.init_whitening(images)
        exact = model.whiten(images).relu()
        seen = {}
        hook = model.whiten_relu.register_forward_hook(
            lambda mod, args, out, seen=seen: seen.update(out=out))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
        hook.remove()
        assert logits.dtype == torch.bfloat16
        assert seen["out"].dtype == (torch.float32 if flag else torch.bfloat16)
        errors[flag] = ((seen["out"].float() - exact).norm() / exact.norm()).item()
        scripted = torch.jit.script(model)  # TorchScript (no autocast) takes the plain path
        torch.testing.assert_close(scripted(images), model(images))
    assert errors[True] < 1e-6 < 1e-2 < errors[False], errors


def _trained_bn(model: nn.Module) -> nn.Module:
    """Running statistics and biases away from their defaults (BN weights stay as they are)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.2, 3)
                m.bias.normal_(0, 0.3)
    return model


def test_pool_first_trains_on_pooled_statistics_and_quantizes_in_the_fusable_order(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    model = build_airnet(pool_first=True, bn_weight=False, logit_scale=1 / 9)
    with torch.no_grad():  # train mode: BN normalizes the pooled 16x16 map, not the 32x32 one
        group = model.layers[0]
        pooled = group.pool(group.conv1(model.whiten_relu(model.whiten(x))))
        model(x)
    torch.testing.assert_close(group.bn1.running_mean, 0.9 * torch.zeros(64)
                               + 0.1 * pooled.mean((0, 2, 3)))
    _trained_bn(model).eval()
    with torch.no_grad():
        ref = model(x)
        torch.save(model.state_dict(), tmp_path / "w.pt")
        # every quantization flow loads through load_fp32_weights: the pools move there
        fresh = load_fp32_weights(build_airnet(pool_first=True, bn_weight=False,
                                               logit_scale=1 / 9), tmp_path / "w.pt").eval()
        assert not any(g.pool_first for g in fresh.layers) and fresh.logit_scale == 1.0
        torch.testing.assert_close(fresh(x), ref)
        fused = copy.deepcopy(model)
        fused.fuse_model(is_qat=False)
        assert type(fused.layers[0].conv1).__name__ == "ConvReLU2d"
        torch.testing.assert_close(fused(x), ref, atol=1e-4, rtol=1e-4)
        scripted = torch.jit.script(model)  # the FP32 export keeps the training order
        torch.testing.assert_close(scripted(x), ref)


def test_pool_first_refuses_to_move_a_pool_behind_a_negative_bn_scale():
    model = _trained_bn(build_airnet(pool_first=True)).eval()
    with torch.no_grad():
        model.layers[1].bn1.weight[3] = -0.5
    with pytest.raises(QlabError, match=r"1 of 256 BN channels have a scale <= 0.*bn_weight=false"):
        model.fuse_model(is_qat=False)


@pytest.mark.parametrize("pool_first", [True, False])
def test_qat_of_a_pool_first_model_keeps_its_pooled_bn_statistics_from_the_first_step(
        use_engine, pool_first):
    from qlab.quant.qat import QATCallback
    from qlab.quant.qconfig import build_qconfig

    use_engine("x86")
    torch.manual_seed(0)
    model = _trained_bn(build_airnet(pool_first=pool_first, bn_weight=False))
    stats = model.layers[0].bn1.running_mean.clone()
    lit = SimpleNamespace(model=model)
    cb = QATCallback(qconfig=build_qconfig(qat=True, per_channel=True), fp32_weights=None,
                     freeze_observer_epoch=9, freeze_bn_epoch=9)
    cb.setup(None, lit, "fit")
    assert not any(g.pool_first for g in model.layers)
    cb.on_train_epoch_start(SimpleNamespace(current_epoch=0), lit)
    frozen = [m.freeze_bn for m in model.modules() if hasattr(m, "freeze_bn")]
    assert len(frozen) == 6 and all(f == pool_first for f in frozen)
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # a training step's forward
    # frozen: the statistics of the pooled maps it was trained with stay; otherwise they move
    assert torch.equal(model.layers[0].conv1.bn.running_mean, stats) == pool_first
