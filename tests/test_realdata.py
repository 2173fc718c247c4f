"""Real CIFAR-10 images from ../shared/data (JPEG, 45,000 train / 5,000 test); skipped without them."""

import tarfile
from pathlib import Path

import pytest
import torch

from qlab.hardware import resolve_precision
from qlab.integer.emit_c import find_cc

from conftest import ROOT, read_metrics, run_cli

TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not TARBALL.is_file(), reason=f"{TARBALL} is not here"),
]


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cifar10-jpeg")
    with tarfile.open(TARBALL) as tar:
        tar.extractall(out, filter="data")
    return next(p.parent for p in out.rglob("train") if (p.parent / "test").is_dir())


def test_folder_reads_the_real_images(jpeg_root):
    from qlab.data import ImageDataModule

    dm = ImageDataModule(source="folder", root=str(jpeg_root),
                         classes=["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                  "horse", "ship", "truck"])
    dm.setup()
    x, y = dm.splits["train"]
    assert x.shape == (40_500, 3, 32, 32) and x.dtype == torch.uint8  # 10% held out: validation
    assert len(dm.splits["val"][1]) == 4_500
    assert (torch.bincount(y) + torch.bincount(dm.splits["val"][1])).tolist() == [4500] * 10
    assert dm.splits["test"][0].shape[0] == 5000
    assert 80 < x.float().mean() < 160  # real photos, not blank decodes


def test_fp32_then_ptq_on_real_images(jpeg_root, tmp_path):
    # plumbing on real photos, kept short: the cheap imagenet stem, no augmentation or mixup
    data = ["data=folder", f"data.root={jpeg_root}", "data.max_train=4096", "data.max_test=500",
            "data.batch_size=64", "model.stem=imagenet", "trainer.max_epochs=3", "~augment",
            "module.mixup_prob=0",
            "trainer.enable_progress_bar=false", "scheduler=cosine", "optimizer.lr=0.05",
            "bench.runs=20", "bench.warmup=2"]
    # trainer.precision=auto: bf16 only where it is native, so this runs at fp32 speed on AVX2
    run_cli("train.py", "stage=fp32", "name=real", *data, outputs=tmp_path, timeout=1200)
    fp32 = read_metrics(tmp_path / "real" / "fp32" / "metrics.json")
    assert fp32["precision"] == fp32["hardware"]["precision"] == resolve_precision("auto", "cpu")
    assert fp32["num_test_images"] == 500 and fp32["accuracy"] > 15.0  # chance is 10%
    # selected on 10% of the 4,096 training images, never on the 500 test images
    assert (fp32["selected_on"], fp32["num_val_images"], fp32["num_train_images"]) == (
        "val", 410, 3686)
    run_cli("quantize.py", "stage=ptq", "name=real", *data, "quant.calib_batches=8", outputs=tmp_path,
            timeout=900)
    ptq = read_metrics(tmp_path / "real" / "ptq" / "metrics.json")
    assert ptq["size_mb"] < 24.2 and abs(ptq["accuracy"] - fp32["accuracy"]) < 10.0
    # the integer model of that PTQ, on the real test images, bit for bit; its C too (200 images)
    run_cli("quantize.py", "stage=integer", "name=real", "from=ptq", "integer.emit=c", *data,
            outputs=tmp_path, timeout=900)
    v = read_metrics(tmp_path / "real" / "ptq" / "integer" / "verify.json")
    assert v["images"] == 500 and v["identical_logits_fraction"] == 1.0, v["first_mismatch"]
    assert v["accuracy"] == pytest.approx(ptq["accuracy"])
    if find_cc() is not None:
        assert v["c"]["built"] and v["c"]["images"] == 200 and v["c"]["identical_fraction"] == 1.0
