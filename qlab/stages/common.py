"""What every stage builds from the config: output folder, data, model, Lightning objects."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from qlab import artifacts
from qlab.data import ImageDataModule
from qlab.errors import QlabError, first_line
from qlab.evaluate import evaluate
from qlab.module import LitClassifier


def output_dir() -> Path:
    """This job's folder: outputs/<name>/<stage> for a run, a numbered subfolder in a sweep."""
    return Path(HydraConfig.get().runtime.output_dir)


def _is_launcher_child() -> bool:
    # Lightning's DDP launcher re-runs the script for ranks > 0 with LOCAL_RANK/NODE_RANK set.
    return int(os.environ.get("LOCAL_RANK", 0)) > 0 or int(os.environ.get("NODE_RANK", 0)) > 0


def _read_checkpoint(path: Path) -> tuple[int, str | None]:
    """(its global step, None) when `path` reads as a Lightning checkpoint, else (0, why not).
    Its tensors are memory-mapped, not read, so this costs little even for a large checkpoint."""
    if not zipfile.is_zipfile(path):
        return 0, "not a PyTorch checkpoint archive"
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # a damaged archive or pickle fails in many ways; all mean the same
        return 0, first_line(exc)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        return 0, "no Lightning state_dict in it"
    return int(ckpt.get("global_step") or 0), None


def resume_path(cfg: DictConfig, out: Path) -> str | None:
    """The checkpoint to continue from, or None for a fresh run; refuses to clobber an old run
    and to resume from a checkpoint that cannot be read. Continuing one of this run's own
    checkpoints, csv/metrics.csv keeps the rows logged up to it and the run appends to them;
    otherwise the run starts a new metrics.csv."""
    ckpt, step = _checkpoint_to_continue(cfg, out)
    if _is_launcher_child():
        return ckpt
    log_csv = out / "csv" / "metrics.csv"
    if ckpt is not None and Path(ckpt).resolve().parent == (out / "checkpoints").resolve():
        artifacts.keep_rows_before(log_csv, step)
    else:  # a fresh run, or another run's checkpoint: rows already here belong to no epoch of it
        log_csv.unlink(missing_ok=True)
    return ckpt


def _checkpoint_to_continue(cfg: DictConfig, out: Path) -> tuple[str | None, int]:
    """The checkpoint to continue from (None for a fresh run) and its global step."""
    last = out / "checkpoints" / "last.ckpt"
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise QlabError(f"ckpt_path={cfg.ckpt_path} does not exist.")
        step, why = _read_checkpoint(Path(cfg.ckpt_path))
        if why:
            raise QlabError(f"ckpt_path={cfg.ckpt_path} is unreadable ({why}): the file is "
                            f"truncated or corrupt. Pass another checkpoint, or drop ckpt_path "
                            f"to start without one.")
        return str(cfg.ckpt_path), step
    if cfg.resume:
        if not last.is_file():
            raise QlabError(
                f"resume=true but {last} does not exist: nothing to continue. Drop resume=true to "
                f"start a new run, or pass ckpt_path=PATH."
            )
        step, why = _read_checkpoint(last)
        if why:
            others = sorted(p for p in last.parent.glob("*.ckpt") if p.name != last.name)
            other = (f"Continue from an earlier checkpoint with ckpt_path={others[-1]} (instead "
                     f"of resume=true), or start over" if others else "Start over")
            raise QlabError(
                f"resume=true but {last} is unreadable ({why}): the checkpoint is truncated or "
                f"corrupt (a run killed while saving it?), so the run cannot continue. {other}: "
                f"drop resume=true and pass overwrite=true (this deletes the checkpoints and logs "
                f"in {out})."
            )
        return str(last), step
    earlier = [p for p in (out / "metrics.json", last) if p.exists()]
    if earlier and not _is_launcher_child():
        if not cfg.overwrite:
            raise QlabError(
                f"{out} already holds a run ({earlier[0].name}). Continue it with resume=true, "
                f"pick another name=..., or replace it with overwrite=true."
            )
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for sub in ("csv", "tensorboard"):
            shutil.rmtree(out / sub, ignore_errors=True)
    return None, 0


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The DataModule from cfg.data, with its class list resolved."""
    dm = instantiate(cfg.data)
    dm.resolve_classes()
    return dm


def build_model(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """The network from cfg.model."""
    return instantiate(cfg.model, num_classes=num_classes)


def build_lit(cfg: DictConfig, model: torch.nn.Module, dm: ImageDataModule) -> LitClassifier:
    """LitClassifier wired from cfg.module, cfg.optimizer, cfg.scheduler and cfg.augment."""
    augment = instantiate(cfg.augment) if cfg.get("augment") else None
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return LitClassifier(
        model=model, optimizer=instantiate(cfg.optimizer), scheduler=scheduler,
        num_classes=dm.num_classes, mean=dm.mean, std=dm.std, augment=augment,
        **OmegaConf.to_container(cfg.module, resolve=True),
    )


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> L.Trainer:
    """The Trainer from cfg.trainer with cfg.callbacks (a null entry is switched off) and
    cfg.logger."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks + list(extra_callbacks or []),
                          logger=loggers or False, default_root_dir=str(output_dir()))
    if cfg.trainer.sync_batchnorm and isinstance(trainer.accelerator, CPUAccelerator):
        raise QlabError("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm is CUDA "
                        "only); drop it for DDP on CPU.")
    return trainer


def fit_and_test(trainer: L.Trainer, lit: LitClassifier, dm: ImageDataModule,
                 ckpt_path: str | None) -> dict:
    """fit (from ckpt_path if given), test the best checkpoint, and gather what every rank did."""
    trainer.fit(lit, datamodule=dm, ckpt_path=ckpt_path)
    ckpt = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    per_rank = trainer.strategy.all_gather(torch.tensor(lit.train_samples)).reshape(-1)
    seconds = trainer.strategy.all_gather(torch.tensor(lit.train_seconds)).reshape(-1)
    tested = trainer.test(lit, datamodule=dm, ckpt_path=best, verbose=False)[0]
    confmat = lit.test_confmat.compute()  # every rank: torchmetrics syncs across them
    return {
        "accuracy": 100.0 * float(tested["test/acc"]),
        "loss": float(tested["test/loss"]),
        "confmat": confmat,
        "best_ckpt": best,
        "world_size": trainer.world_size,
        "train_samples_per_rank": [int(v) for v in per_rank.tolist()],
        # null when this process trained nothing (resuming a finished run): not a speed of 0
        "train_images_per_s": (float(per_rank.sum() / seconds.max().clamp(min=1e-9))
                               if int(per_rank.sum()) else None),
        "epochs": trainer.current_epoch,
    }


def export(model: torch.nn.Module, dm: ImageDataModule) -> torch.jit.ScriptModule:
    """Frozen TorchScript of the model with dm's normalization inside (see torchscript_of)."""
    return artifacts.torchscript_of(model, dm.mean, dm.std)


def base_metrics(cfg: DictConfig, stage: str, dm: ImageDataModule, out: Path) -> dict:
    """Fields every metrics.json carries besides the measured numbers."""
    return {
        "stage": stage,
        "name": cfg.name,
        "num_test_images": int(len(dm.splits["test"][1])),
        "image_size": dm.image_size,
        "classes": list(dm.classes),
        "mean": list(dm.mean),
        "std": list(dm.std),
        "config_path": str((out / ".hydra" / "config.yaml").resolve()),
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data_source": dm.source,
        "tta": cfg.module.get("tta", "none"),
    }


def selection(dm: ImageDataModule) -> dict:
    """Where a trained stage's checkpoint was picked: on validation images carved from train
    ("val"), or on the test split itself ("test", data.val_split=0: the reference protocol)."""
    return {"selected_on": dm.selected_on,
            "num_val_images": int(len(dm.splits["val"][1])) if dm.selected_on == "val" else 0,
            "num_train_images": int(len(dm.splits["train"][1]))}


def evaluate_runtimes(runs: dict, dm: ImageDataModule, cfg: DictConfig) -> dict[str, dict]:
    """The test split through each runtime of the exported artifacts (float [0,1] images in)."""
    return {name: evaluate(run, dm.test_dataloader(), num_classes=dm.num_classes,
                           mean=[0.0] * len(dm.mean), std=[1.0] * len(dm.std),
                           label_smoothing=cfg.module.label_smoothing, tta=cfg.module.tta)
            for name, run in runs.items()}


def bench_args(cfg: DictConfig, dm: ImageDataModule) -> dict:
    return {"runs": cfg.bench.runs, "warmup": cfg.bench.warmup, "threads": cfg.bench.threads,
            "image_size": dm.image_size}
