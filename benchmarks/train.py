"""Training throughput: the real Lightning step against a bare PyTorch loop doing the same math.

python benchmarks/train.py [--steps 8] [--batch 64] [--stem cifar] [--device cpu|cuda]
Both paths: uint8 batch -> device -> kornia augmentation -> mixup -> forward -> label-smoothed
cross-entropy -> backward -> clip grad norm 1.0 -> SGD Nesterov step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
import warnings
from functools import partial

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from qlab.augment import TrainAugment, mixup
from qlab.data import CIFAR_MEAN as MEAN
from qlab.data import CIFAR_STD as STD
from qlab.data import synthetic_split
from qlab.hardware import native_cpu_bf16, resolve_precision
from qlab.models import build_airnet, build_mobilenet_v2, build_resnet18, build_resnet20, build_resnet50
from qlab.module import LitClassifier
from qlab.quant.qat import QATCallback
from qlab.quant.qconfig import build_qconfig

from common import print_table, save

warnings.filterwarnings("ignore")


class StepClock(L.Callback):
    """Wall time from the end of the warm-up steps to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.steps = warmup, None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:
            self.t0 = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.t1, self.steps = time.perf_counter(), self.steps + 1


BUILDERS = {"resnet50": build_resnet50, "resnet20": build_resnet20, "mobilenet_v2": build_mobilenet_v2,
            "resnet18": build_resnet18, "airnet": build_airnet}


def make_lit(stem: str, channels_last: bool, model: str = "resnet50") -> LitClassifier:
    torch.manual_seed(0)
    net = build_resnet50(stem=stem, zero_init_residual=True) if model == "resnet50" else BUILDERS[model]()
    return LitClassifier(
        model=net,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
        scheduler=None, num_classes=10, mean=MEAN, std=STD, augment=TrainAugment(mean=MEAN, std=STD),
        mixup_prob=0.5, channels_last=channels_last)


def lightning_ips(loader, stem, precision, channels_last, warmup, steps, device, qat=False,
                  model="resnet50") -> float:
    lit = make_lit(stem, channels_last, model)
    clock = StepClock(warmup)
    callbacks = [clock]
    if qat:
        callbacks.append(QATCallback(qconfig=build_qconfig(qat=True), fp32_weights=None,
                                     freeze_observer_epoch=99, freeze_bn_epoch=99))
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision=precision, max_steps=warmup + steps,
                        limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, callbacks=callbacks)
    trainer.fit(lit, train_dataloaders=loader)
    return loader.batch_size * clock.steps / (clock.t1 - clock.t0)


def bare_ips(loader, stem, precision, channels_last, warmup, steps, device, qat=False) -> float:
    lit = make_lit(stem, channels_last).to(device)
    model, augment = lit.model.train(), lit.augment
    if qat:
        QATCallback(qconfig=build_qconfig(qat=True), fp32_weights=None, freeze_observer_epoch=99,
                    freeze_bn_epoch=99).setup(None, lit, "fit")
    opt = lit.optimizer_factory(params=model.parameters())
    autocast = (partial(torch.autocast, device, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext)
    t0, n = None, 0
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            t0 = time.perf_counter()
        if i == warmup + steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = augment(x.float().div_(255.0))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            if float(torch.rand(())) < 0.5:
                x, ya, yb, lam = mixup(x, y, alpha=0.2)
                logits = model(x)
                loss = lam * F.cross_entropy(logits, ya, label_smoothing=0.05) + (1 - lam) * \
                    F.cross_entropy(logits, yb, label_smoothing=0.05)
            else:
                loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        n += i >= warmup and y.numel()
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--stem", default="cifar")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default="resnet50,resnet20,mobilenet_v2",
                   help="architectures compared in one run (Lightning step, the precision "
                        "trainer.precision=auto picks, channels_last, and fp32 QAT), any of "
                        + ", ".join(BUILDERS))
    p.add_argument("--models-only", action="store_true", help="only the architecture comparison")
    p.add_argument("--bf16", action="store_true",
                   help="also time bf16 on a CPU that only emulates it (about 10x slower than fp32)")
    args = p.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(BUILDERS))
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    n = args.batch * (args.steps + args.warmup + 1)
    x, y = synthetic_split(num_images=n, num_classes=10, image_size=32, noise=0.1, seed=0,
                           split="train")
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=False, drop_last=True)
    results = [] if args.models_only else recipe_configs(loader, args)
    arch = compare_models(loader, args)
    save("train", {"args": vars(args), "results": results, "models": arch})


def recipe_configs(loader, args) -> list[dict]:
    """The default model in each precision / memory format / QAT, Lightning vs a bare loop."""
    configs = [("fp32", "32", False, False), ("bf16-mixed", "bf16-mixed", False, False),
               ("fp32 channels_last", "32", True, False), ("bf16 channels_last", "bf16-mixed", True, False),
               ("QAT fp32 (fake-quant)", "32", False, True)]
    if args.device == "cpu" and not native_cpu_bf16() and not args.bf16:
        print("bf16 rows skipped: this CPU has no native bf16 (AVX512_BF16/AMX); --bf16 to time them")
        configs = [c for c in configs if "bf16" not in c[1]]
    rows, results = [], []
    for label, precision, cl, qat in configs:
        kw = dict(stem=args.stem, precision=precision, channels_last=cl, warmup=args.warmup,
                  steps=args.steps, device=args.device, qat=qat)
        lit_ips = lightning_ips(loader, **kw)
        raw_ips = bare_ips(copy.copy(loader), **kw)
        overhead = 100.0 * (raw_ips / lit_ips - 1.0)
        results.append({"config": label, "lightning_images_per_s": lit_ips,
                        "bare_images_per_s": raw_ips, "overhead_pct": overhead})
        rows.append([label, lit_ips, raw_ips, f"{overhead:+.1f}%"])
        print(f"  {label}: lightning {lit_ips:.1f} img/s, bare {raw_ips:.1f} img/s", flush=True)
    fp32 = results[0]["lightning_images_per_s"]
    qat = results[-1]["lightning_images_per_s"]
    print_table(f"Training step, ResNet-50 {args.stem} stem, batch {args.batch}, "
                f"{torch.get_num_threads()} threads ({args.steps} timed steps after {args.warmup})",
                ["config", "Lightning img/s", "bare loop img/s", "framework overhead"], rows)
    print(f"\nQAT step time / FP32 step time: {fp32 / qat:.2f}x")
    return results + [{"config": "QAT step time / FP32 step time", "ratio": fp32 / qat}]


def compare_models(loader, args) -> list[dict]:
    """Images/s of each architecture's training step in this one process, and against the first."""
    precision = resolve_precision("auto", "cuda" if args.device == "cuda" else "cpu")
    rows, out = [], []
    for name in [m for m in args.models.split(",") if m]:
        kw = dict(stem="cifar", channels_last=True, warmup=args.warmup, steps=args.steps,
                  device=args.device, model=name)
        ips = lightning_ips(loader, precision=precision, **kw)
        qat = lightning_ips(loader, precision="32", qat=True, **(kw | {"channels_last": False}))
        out.append({"model": name, "precision": precision, "images_per_s": ips,
                    "qat_images_per_s": qat})
        print(f"  {name}: {ips:.1f} img/s ({precision}), QAT {qat:.1f} img/s", flush=True)
    for r in out:
        ratio = r["images_per_s"] / out[0]["images_per_s"]
        rows.append([r["model"], r["precision"], r["images_per_s"], f"{ratio:.2f}x", r["qat_images_per_s"]])
    print_table(f"Training step by architecture, batch {args.batch}, {torch.get_num_threads()} threads",
                ["model", "precision", "img/s", f"vs {out[0]['model']}", "QAT img/s (fp32)"], rows)
    return out


if __name__ == "__main__":
    main()
