"""CIFAR-10, an image folder or a synthetic set, each held in memory as uint8 NCHW tensors."""

from __future__ import annotations

import hashlib
import os
import urllib.error
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from qlab.errors import QlabError

SOURCES = ("cifar10", "folder", "synthetic")
# CIFAR-10's per-channel pixel mean and std on [0, 1]: the normalization of every model here
# (conf/data/cifar10.yaml sets the same values, tests/test_data.py checks they agree)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
Split = tuple[Tensor, Tensor]  # images uint8 [N, 3, H, W], labels int64 [N]


def synthetic_split(
    *, num_images: int, num_classes: int, image_size: int, noise: float, seed: int, split: str
) -> Split:
    """Learnable offline images: one smooth colour pattern per class, shifted, rescaled, noised."""
    g = torch.Generator().manual_seed(seed)  # templates depend on seed only: same for every split
    coarse = 0.15 + 0.7 * (torch.rand(num_classes, 3, 4, 4, generator=g) > 0.5).float()
    templates = torch.nn.functional.interpolate(coarse, size=image_size, mode="bicubic")
    g_split = torch.Generator().manual_seed(seed + (1 if split == "train" else 2))
    labels = torch.randint(num_classes, (num_images,), generator=g_split)
    images = templates[labels]
    shifts = torch.randint(-3, 4, (num_images, 2), generator=g_split)
    images = torch.stack([img.roll(tuple(s.tolist()), dims=(1, 2)) for img, s in zip(images, shifts)])
    gain = 0.6 + 0.8 * torch.rand(num_images, 1, 1, 1, generator=g_split)
    images = (images - 0.5) * gain + 0.5
    images = images + noise * torch.randn(images.shape, generator=g_split)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def cifar10_split(root: Path, *, train: bool, download: bool) -> Split:
    """torchvision's CIFAR10 (python pickle batches under ROOT/cifar-10-batches-py)."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=train, download=download)
    except (urllib.error.URLError, OSError) as exc:
        raise QlabError(
            f"CIFAR-10 is not under {root}/cifar-10-batches-py and could not be downloaded ({exc}). "
            f"Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on a machine with "
            f"network access and extract it into {root}, or train on images you have with "
            f"data=folder data.root=DIR (DIR/train/<class>/*.jpg, DIR/test/<class>/*.jpg), "
            f"or try the offline data=synthetic."
        ) from None
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise QlabError(
            f"CIFAR-10 under {root} is missing or fails its checksum ({exc}). Run with "
            f"data.download=true on a machine with network access, or use data=folder "
            f"data.root=DIR, or the offline data=synthetic."
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.long)


def _list_folder(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[Path], list[int]]:
    if not split_dir.is_dir():
        raise QlabError(
            f"data=folder needs {split_dir}: put images in {split_dir}/<class>/*.jpg|png "
            f"(one folder per class), or point data.root at the folder that holds train/ and test/."
        )
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not found:
        raise QlabError(f"{split_dir} has no class folders; expected {split_dir}/<class>/*.jpg|png.")
    if classes is None:
        classes = found
    elif set(found) != set(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise QlabError(
            f"The class folders in {split_dir} do not match data.classes: missing {missing}, "
            f"unexpected {extra}. Rename the folders, or set data.classes to the folder names "
            f"(data.classes=null takes them as found)."
        )
    paths, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise QlabError(f"{split_dir / name} holds no .jpg/.jpeg/.png images.")
        paths += files
        labels += [index] * len(files)
    return classes, paths, labels


def _decode(paths: list[Path], image_size: int) -> Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2.functional import resize

    out = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.uint8)
    for i, path in enumerate(paths):
        try:
            img = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise QlabError(f"Cannot decode {path} ({exc}); remove or replace the file.") from None
        if img.shape[-2:] != (image_size, image_size):
            img = resize(img, [image_size, image_size], antialias=True)
        out[i] = img
    return out


def folder_split(
    root: Path, split: str, *, classes: list[str] | None, image_size: int, cache_dir: Path | None
) -> tuple[list[str], Split]:
    """Decode ROOT/SPLIT/<class>/* once into a uint8 tensor, cached by file list, sizes and mtimes."""
    classes, paths, labels = _list_folder(root / split, classes)
    key = hashlib.sha1(f"{image_size}|{classes}".encode())
    for p in paths:
        st = p.stat()
        key.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache_dir = cache_dir or root / ".qlab_cache"
    cache = cache_dir / f"{split}-{key.hexdigest()[:16]}.pt"
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            return classes, (blob["images"], blob["labels"])
        except Exception:  # a truncated cache is rebuilt, never trusted
            pass
    images, y = _decode(paths, image_size), torch.tensor(labels, dtype=torch.long)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"images": images, "labels": y}, tmp)
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only data folder: decode again next time
    return classes, (images, y)


def _subset(split: Split, limit: int | None, seed: int) -> Split:
    if limit is None or limit >= len(split[1]):
        return split
    idx = torch.randperm(len(split[1]), generator=torch.Generator().manual_seed(seed))[:limit]
    return split[0][idx], split[1][idx]


class ImageDataModule(L.LightningDataModule):
    """Train/val/test splits as uint8 tensors; augmentation happens later, on the model's device."""

    def __init__(
        self,
        *,
        source: str = "synthetic",
        root: str = "data",
        classes: list[str] | None = None,
        download: bool = True,
        image_size: int = 32,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_split: float = 0.1,
        max_train: int | None = None,
        max_test: int | None = None,
        num_train: int = 2560,
        num_test: int = 512,
        noise: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        mean: tuple[float, ...] = CIFAR_MEAN,
        std: tuple[float, ...] = CIFAR_STD,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise QlabError(f"data.source={source!r} is not known; use one of {', '.join(SOURCES)}.")
        if not 0.0 <= val_split < 1.0:
            raise QlabError(f"data.val_split={val_split} must be in [0, 1): a fraction of train.")
        if batch_size < 1 or eval_batch_size < 1:
            raise QlabError("data.batch_size and data.eval_batch_size must be positive integers.")
        self.source, self.root = source, Path(root).expanduser()
        self.classes = list(classes) if classes is not None else None
        self.download, self.image_size = download, image_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_split, self.max_train, self.max_test = val_split, max_train, max_test
        self.num_train, self.num_test, self.noise = num_train, num_test, noise
        self.num_workers, self.seed = num_workers, seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.mean, self.std = tuple(mean), tuple(std)
        self.splits: dict[str, Split] = {}
        self._raw: dict[str, Split] = {}

    @property
    def selected_on(self) -> str:
        """Where checkpoints are selected: "val" (images carved from train) or "test"
        (data.val_split=0, the reference report's protocol)."""
        return "val" if self.val_split > 0 else "test"

    @property
    def num_classes(self) -> int:
        """Number of classes, known from the config before any data is read."""
        if self.classes is None:
            raise QlabError("data.classes must be set (or data loaded) to know the class count.")
        return len(self.classes)

    def resolve_classes(self) -> list[str]:
        """The class names: from the config, or (data.classes=null) the folder names under train/."""
        if self.classes is None:
            if self.source != "folder":
                raise QlabError(f"data.classes must be listed for data.source={self.source}.")
            self.classes = _list_folder(self.root / "train", None)[0]
        return self.classes

    def per_process_batch(self, batch_size: int) -> int:
        """data.batch_size is global: split it over the DDP processes so the recipe stays exact."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if batch_size % world:
            raise QlabError(
                f"data.batch_size={batch_size} does not split evenly over {world} processes "
                f"(devices x nodes); pick a multiple of {world}."
            )
        return batch_size // world

    def _load(self, split: str) -> Split:
        # prepare_data() and setup() run in the same process outside DDP: read each split once
        if split not in self._raw:
            self._raw[split] = self._read(split)
        return self._raw[split]

    def _read(self, split: str) -> Split:
        if self.source == "synthetic":
            n = self.num_train if split == "train" else self.num_test
            return synthetic_split(
                num_images=n, num_classes=self.num_classes, image_size=self.image_size,
                noise=self.noise, seed=self.seed, split=split,
            )
        if self.source == "cifar10":
            return cifar10_split(self.root, train=split == "train", download=self.download)
        self.classes, data = folder_split(
            self.root, split, classes=self.classes, image_size=self.image_size,
            cache_dir=self.cache_dir,
        )
        return data

    def prepare_data(self) -> None:
        """Download or decode once, on one process (rank 0), before setup() runs on every rank."""
        if self.source != "synthetic":
            for split in ("train", "test"):
                self._load(split)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits into memory; carve validation from train if data.val_split > 0."""
        if self.splits:
            return
        train = _subset(self._load("train"), self.max_train, self.seed)
        test = _subset(self._load("test"), self.max_test, self.seed)
        if len(train[1]) == 0 or len(test[1]) == 0:
            raise QlabError("The data has an empty train or test split; check data.root and data.max_*.")
        if self.val_split > 0:
            perm = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(self.seed))
            n_val = max(1, int(round(self.val_split * len(perm))))
            val_idx, train_idx = perm[:n_val], perm[n_val:]
            self.splits["val"] = (train[0][val_idx], train[1][val_idx])
            train = (train[0][train_idx], train[1][train_idx])
        else:
            self.splits["val"] = test  # data.val_split=0: the reference protocol, selected on test
        self.splits["train"], self.splits["test"] = train, test

    def _loader(self, split: str, *, shuffle: bool, batch_size: int) -> DataLoader:
        images, labels = self.splits[split]
        return DataLoader(
            TensorDataset(images, labels),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(labels) > batch_size,  # no 1-image BN batches
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True,
                            batch_size=self.per_process_batch(self.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self, batch_size: int | None = None) -> DataLoader:
        return self._loader("test", shuffle=False, batch_size=batch_size or self.eval_batch_size)

    def calib_dataloader(self) -> DataLoader:
        """Training images, shuffled with a fixed seed and not augmented, for PTQ calibration."""
        images, labels = self.splits["train"]
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(TensorDataset(images, labels), batch_size=self.batch_size,
                          shuffle=True, generator=g)
