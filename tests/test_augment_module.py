from functools import partial

import pytest
import torch
from torch.nn import functional as F

from qlab.augment import TrainAugment, mixup
from qlab.data import CIFAR_MEAN as MEAN
from qlab.data import CIFAR_STD as STD
from qlab.errors import QlabError
from qlab.models import build_resnet50
from qlab.module import LitClassifier

OFF = dict(crop_padding=None, hflip=False, color_jitter=None, rotation=None, translate=None,
           scale=None, erasing_p=0.0)


def normalize(x):
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_all_switched_off_is_just_normalize():
    x = torch.rand(8, 3, 32, 32)
    torch.testing.assert_close(TrainAugment(mean=MEAN, std=STD, **OFF)(x), normalize(x))


def test_augmentation_is_per_sample_and_keeps_shape():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32).repeat(16, 1, 1, 1)  # 16 copies of one image
    y = TrainAugment(mean=MEAN, std=STD)(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    distinct = {tuple(v.flatten()[:64].round(decimals=4).tolist()) for v in y}
    assert len(distinct) == 16  # every sample drew its own parameters


@pytest.mark.parametrize("step", ["crop_padding", "hflip", "color_jitter", "rotation", "erasing_p"])
def test_each_step_can_be_switched_on_alone(step):
    torch.manual_seed(1)
    on = dict(OFF, **{step: {"crop_padding": 4, "hflip": True, "color_jitter": [0.3, 0.3, 0.3, 0.1],
                             "rotation": 20, "erasing_p": 1.0}[step]})
    x = torch.rand(32, 3, 32, 32)
    assert not torch.allclose(TrainAugment(mean=MEAN, std=STD, **on)(x), normalize(x))


def test_mixup_mixes_pairs():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8)
    xm, ya, yb, lam = mixup(x, y, alpha=0.2)
    assert 0.0 <= lam <= 1.0 and torch.equal(ya, y)
    perm = yb  # labels are 0..7, so y_b is the permutation itself
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm])
    assert mixup(x, y, alpha=0.0)[3] == 1.0


def make_lit(**kw):
    args = dict(model=build_resnet50(stem="imagenet"), optimizer=partial(torch.optim.SGD, lr=0.1),
                scheduler=None, num_classes=10, mean=MEAN, std=STD, augment=None)
    return LitClassifier(**(args | kw))


def test_invalid_hyperparameters_are_refused():
    with pytest.raises(QlabError, match="lr=-0.1 must be positive"):
        make_lit(optimizer=partial(torch.optim.SGD, lr=-0.1))
    with pytest.raises(QlabError, match=r"mixup_prob=1.5 must be a probability in \[0, 1\]"):
        make_lit(mixup_prob=1.5)
    with pytest.raises(QlabError, match="mixup_alpha"):
        make_lit(mixup_alpha=-1.0)
    with pytest.raises(QlabError, match="label_smoothing"):
        make_lit(label_smoothing=1.0)


def test_shared_step_uses_soft_target_loss_with_mixup(monkeypatch):
    torch.manual_seed(0)
    lit = make_lit(mixup_prob=1.0, mixup_alpha=0.4).eval()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    seen = {}

    def fake_mixup(x, y, alpha):
        out = mixup(x, y, alpha=alpha)
        seen["out"] = out
        return out

    monkeypatch.setattr("qlab.module.mixup", fake_mixup)
    monkeypatch.setattr(lit, "log", lambda *a, **k: None)
    loss = lit._step([x, y], "train")
    xm, ya, yb, lam = seen["out"]
    with torch.no_grad():
        logits = lit(xm)
    expected = lam * F.cross_entropy(logits, ya, label_smoothing=0.05) + (1 - lam) * F.cross_entropy(
        logits, yb, label_smoothing=0.05)
    torch.testing.assert_close(loss.detach(), expected)
    assert lit.train_acc.update_count == 1


def test_batches_arrive_as_uint8_and_leave_normalized():
    lit = make_lit()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out, y = lit.on_after_batch_transfer([x, torch.zeros(4, dtype=torch.long)], 0)
    torch.testing.assert_close(out, normalize(x.float() / 255))


@pytest.mark.parametrize("clip, clipped", [(1e-6, 1.0), (1e6, 0.0)])
def test_gradient_norm_before_clipping_is_logged(tmp_path, clip, clipped):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from qlab.models import build_resnet20

    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(8) % 10
    lit = make_lit(model=build_resnet20(), mixup_prob=0.0)
    seen = []
    original = lit.on_before_optimizer_step

    def spy(optimizer):
        grads = [p.grad.flatten() for p in lit.parameters() if p.grad is not None]
        seen.append(float(torch.cat(grads).norm()))
        original(optimizer)

    lit.on_before_optimizer_step = spy
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=clip, default_root_dir=tmp_path)
    trainer.fit(lit, DataLoader(TensorDataset(x, y), batch_size=4))
    logged = trainer.callback_metrics
    assert len(seen) == 2 and seen[1] > 0
    assert logged["train/grad_norm_step"].item() == pytest.approx(seen[1], rel=1e-5)
    assert logged["train/grad_norm_epoch"].item() == pytest.approx(sum(seen) / 2, rel=1e-5)
    assert logged["train/clipped"].item() == clipped
