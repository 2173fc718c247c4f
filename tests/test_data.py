import hashlib
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from qlab.data import CIFAR_MEAN, CIFAR_STD, ImageDataModule, synthetic_split
from qlab.errors import QlabError

CLASSES = ["cat", "dog", "ship"]


def test_the_config_normalizes_with_the_one_cifar_mean_and_std():
    """conf/data/ shows the user the values qlab.data.CIFAR_MEAN/CIFAR_STD define for the code."""
    from omegaconf import OmegaConf

    from conftest import ROOT

    conf = OmegaConf.load(ROOT / "conf" / "data" / "cifar10.yaml")
    assert tuple(conf.mean) == CIFAR_MEAN and tuple(conf.std) == CIFAR_STD
    dm = ImageDataModule(source="synthetic")
    assert dm.mean == CIFAR_MEAN and dm.std == CIFAR_STD


def write_folder(root, counts=(4, 3), classes=CLASSES, size=32, suffix=".png"):
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), counts):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
                arr = np.full((size, size, 3), 40 * c, np.uint8) + noise
                Image.fromarray(arr).save(d / f"{i}{suffix}")
    return root


def test_folder_loads_decodes_and_caches(tmp_path):
    root = write_folder(tmp_path / "imgs")
    dm = ImageDataModule(source="folder", root=str(root), classes=CLASSES, batch_size=4,
                         val_split=0.0)
    dm.setup()
    x, y = dm.splits["train"]
    assert x.dtype == torch.uint8 and x.shape == (12, 3, 32, 32)
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # PNG is lossless: the decoded pixels are the ones written
    first = np.array(Image.open(root / "train" / "cat" / "0.png"))
    assert torch.equal(x[0], torch.from_numpy(first).permute(2, 0, 1))
    caches = list((root / ".qlab_cache").glob("*.pt"))
    assert len(caches) == 2
    # second load comes from the cache (same tensors), and a changed folder makes a new cache
    dm2 = ImageDataModule(source="folder", root=str(root), classes=CLASSES, val_split=0.0)
    dm2.setup()
    assert torch.equal(dm2.splits["train"][0], x)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "cat" / "9.png")
    dm3 = ImageDataModule(source="folder", root=str(root), classes=CLASSES, val_split=0.0)
    dm3.setup()
    assert len(dm3.splits["train"][1]) == 13
    assert len(list((root / ".qlab_cache").glob("train-*.pt"))) == 2


def test_folder_resizes_other_sizes_and_reads_jpeg(tmp_path):
    root = write_folder(tmp_path / "imgs", size=48, suffix=".jpg")
    dm = ImageDataModule(source="folder", root=str(root), classes=None, cache_dir=str(tmp_path / "c"))
    assert dm.resolve_classes() == sorted(CLASSES)
    dm.setup()
    assert dm.splits["test"][0].shape == (9, 3, 32, 32)


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(QlabError, match="needs .*train"):
        ImageDataModule(source="folder", root=str(tmp_path / "nope"), classes=CLASSES).setup()
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(QlabError, match="no class folders"):
        ImageDataModule(source="folder", root=str(tmp_path / "empty"), classes=CLASSES).setup()
    root = write_folder(tmp_path / "imgs")
    with pytest.raises(QlabError, match=r"missing \['bird'\], unexpected \['ship'\]"):
        ImageDataModule(source="folder", root=str(root), classes=["cat", "dog", "bird"]).setup()
    for f in (root / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(QlabError, match="holds no"):
        ImageDataModule(source="folder", root=str(root), classes=CLASSES).setup()


def write_cifar(root, monkeypatch, n_train=10, n_test=6):
    """Files in torchvision's CIFAR-10 on-disk format; the checksums torchvision checks are ours."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names, md5 = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], {}
    for name in names:
        n = n_test if name == "test_batch" else n_train
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        (base / name).write_bytes(pickle.dumps(entry))
        md5[name] = hashlib.md5((base / name).read_bytes()).hexdigest()
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]}
    (base / "batches.meta").write_bytes(pickle.dumps(meta))
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n in names[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    meta_md5 = hashlib.md5((base / "batches.meta").read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": meta_md5})
    return base


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    base = write_cifar(tmp_path, monkeypatch)
    dm = ImageDataModule(source="cifar10", root=str(tmp_path), download=False,
                         classes=[f"c{i}" for i in range(10)], val_split=0.0)
    dm.setup()
    x, y = dm.splits["train"]
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.uint8
    raw = pickle.loads((base / "data_batch_1").read_bytes())
    assert torch.equal(x[0], torch.from_numpy(raw["data"][0].reshape(3, 32, 32)))
    assert y[:10].tolist() == raw["labels"]
    assert dm.splits["test"][0].shape == (6, 3, 32, 32)


def test_cifar10_without_files_or_network_says_what_to_do(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(CIFAR10, "download", offline)
    dm = ImageDataModule(source="cifar10", root=str(tmp_path), download=True, classes=["a", "b"])
    with pytest.raises(QlabError, match="could not be downloaded.*data=folder"):
        dm.setup()
    dm = ImageDataModule(source="cifar10", root=str(tmp_path), download=False, classes=["a", "b"])
    with pytest.raises(QlabError, match="missing or fails its checksum.*data=folder"):
        dm.setup()


def test_synthetic_is_deterministic_and_split_by_seed():
    a = synthetic_split(num_images=64, num_classes=10, image_size=32, noise=0.1, seed=3, split="train")
    b = synthetic_split(num_images=64, num_classes=10, image_size=32, noise=0.1, seed=3, split="train")
    t = synthetic_split(num_images=64, num_classes=10, image_size=32, noise=0.1, seed=3, split="test")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], t[0])
    assert a[0].dtype == torch.uint8 and set(a[1].tolist()) <= set(range(10))


def test_synthetic_is_learnable_by_a_small_model():
    torch.manual_seed(0)
    kw = dict(num_classes=10, image_size=32, noise=0.1, seed=0)
    xtr, ytr = synthetic_split(num_images=2000, split="train", **kw)
    xte, yte = synthetic_split(num_images=500, split="test", **kw)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(6):
        for i in torch.randperm(2000).split(50):
            loss = torch.nn.functional.cross_entropy(net(xtr[i].float() / 255), ytr[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (net(xte.float() / 255).argmax(1) == yte).float().mean().item()
    assert acc > 0.8, acc


def test_val_split_carves_from_train_and_subsets():
    dm = ImageDataModule(source="synthetic", classes=list("abcd"), num_train=100, num_test=40,
                         val_split=0.2, max_test=30)
    dm.setup()
    assert len(dm.splits["val"][1]) == 20 and len(dm.splits["train"][1]) == 80
    assert len(dm.splits["test"][1]) == 30
    assert dm.selected_on == "val"
    # by default a seeded 10% of train, disjoint from what is trained on and from test
    dm = ImageDataModule(source="synthetic", classes=list("abcd"), num_train=100, num_test=40)
    dm.setup()
    assert dm.selected_on == "val" and len(dm.splits["val"][1]) == 10
    assert len(dm.splits["train"][1]) == 90
    train, val = dm.splits["train"][0].flatten(1), dm.splits["val"][0].flatten(1)
    assert not (train[:, None] == val[None]).all(-1).any()  # no validation image is trained on
    again = ImageDataModule(source="synthetic", classes=list("abcd"), num_train=100, num_test=40)
    again.setup()
    assert torch.equal(again.splits["val"][0], dm.splits["val"][0])  # the same images each run
    dm = ImageDataModule(source="synthetic", classes=list("abcd"), num_train=100, num_test=40,
                         val_split=0.0)
    dm.setup()
    assert dm.splits["val"] is dm.splits["test"]  # the reference protocol validates on test
    assert dm.selected_on == "test"


def test_bad_data_options():
    with pytest.raises(QlabError, match="val_split"):
        ImageDataModule(source="synthetic", val_split=1.5)
    with pytest.raises(QlabError, match="one of cifar10, folder, synthetic"):
        ImageDataModule(source="imagenet")
