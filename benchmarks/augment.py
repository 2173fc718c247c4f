"""Batched on-device augmentation (kornia, qlab's path) against per-image PIL transforms in a
DataLoader (the reference's torchvision path), images/s over the same uint8 images.

python benchmarks/augment.py [--images 4096] [--batch 256]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from qlab.augment import TrainAugment
from qlab.data import CIFAR_MEAN as MEAN
from qlab.data import CIFAR_STD as STD
from qlab.data import synthetic_split

from common import print_table, save

warnings.filterwarnings("ignore")

REFERENCE = T.Compose([
    T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ColorJitter(0.3, 0.3, 0.3, 0.1),
    T.RandomRotation(20), T.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.9, 1.1)),
    T.ToTensor(), T.Normalize(MEAN, STD),
    T.RandomErasing(p=0.6, scale=(0.02, 0.4), ratio=(0.3, 3.3)),
])


class PILImages(Dataset):
    """The uint8 images as PIL images, transformed one by one (torchvision CIFAR10 style)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return REFERENCE(Image.fromarray(self.images[i]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    images, _ = synthetic_split(num_images=args.images, num_classes=10, image_size=32, noise=0.1,
                                seed=0, split="train")
    rows, results = [], []

    augment = TrainAugment(mean=MEAN, std=STD)
    augment(images[: args.batch].float() / 255)  # warm-up
    t0 = time.perf_counter()
    for batch in images.split(args.batch):
        augment(batch.float().div_(255.0))
    ips = args.images / (time.perf_counter() - t0)
    results.append({"path": "kornia batched (qlab)", "workers": 0, "images_per_s": ips})

    for workers in (0, 1, 2):
        loader = DataLoader(PILImages(images), batch_size=args.batch, num_workers=workers,
                            persistent_workers=False)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        results.append({"path": "torchvision PIL per image", "workers": workers,
                        "images_per_s": args.images / (time.perf_counter() - t0)})
    base = results[0]["images_per_s"]
    for r in results:
        rows.append([r["path"], r["workers"], r["images_per_s"], f"{base / r['images_per_s']:.1f}x"])
    print_table(f"Training augmentation, {args.images} images of 32x32, batch {args.batch}, "
                f"{torch.get_num_threads()} threads",
                ["path", "workers", "img/s", "qlab is faster by"], rows)
    save("augment", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
