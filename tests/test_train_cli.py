"""The FP32 stage through the real `train.py` + Hydra, on tiny synthetic data."""

import csv
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qlab import artifacts
from qlab.hardware import resolve_precision

from conftest import ROOT, TINY, read_metrics, run_cli


def test_fp32_stage_writes_every_output_and_resumes(tmp_path):
    run_cli("train.py", "stage=fp32", "name=t", *TINY, outputs=tmp_path)
    out = tmp_path / "t" / "fp32"
    for f in ("metrics.json", "model_fp32.pt", "model_fp32_state_dict.pt", "curves.png",
              "confusion_matrix.png", "csv/metrics.csv", "checkpoints/last.ckpt",
              ".hydra/config.yaml"):
        assert (out / f).is_file(), f
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "checkpoints").glob("best-epoch000-acc*.ckpt"))
    m = read_metrics(out / "metrics.json")
    assert m["stage"] == "fp32" and m["num_test_images"] == 64 and m["world_size"] == 1
    assert m["loss"] > 0
    assert 94.3 < m["size_mb"] < 94.6 and m["latency"]["median_ms"] > 0
    # 96 images, a seeded 10 of them held out for validation: 86 left, 2 full batches of 32
    assert m["train_samples_per_rank"] == [64]
    assert (m["selected_on"], m["num_val_images"], m["num_train_images"]) == ("val", 10, 86)
    # trainer.precision=auto (the default) is resolved from this machine and recorded
    assert m["precision"] == m["hardware"]["precision"] == resolve_precision("auto", "cpu")
    assert m["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["hardware"]["threads"] >= 1 and isinstance(m["hardware"]["gpus"], list)
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"} <= set(
        header.split(","))

    # the exported file needs nothing of qlab: [0,1] images in, logits out, equal to the weights
    scripted = torch.jit.load(str(out / "model_fp32.pt"))
    from qlab.models import build_resnet50

    model = build_resnet50(stem="imagenet").eval()
    model.load_state_dict(torch.load(out / "model_fp32_state_dict.pt", weights_only=True))
    x = torch.rand(3, 3, 32, 32)
    from qlab.data import CIFAR_MEAN, CIFAR_STD

    mean, std = torch.tensor(CIFAR_MEAN), torch.tensor(CIFAR_STD)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)))

    # the accuracy and confusion matrix are the exported model's on the run's own test images
    from qlab.stages.common import build_datamodule

    dm = build_datamodule(OmegaConf.load(out / ".hydra" / "config.yaml"))
    dm.setup("test")
    images, labels = dm.splits["test"]
    assert len(labels) == 64
    with torch.no_grad():
        predicted = scripted(images.float() / 255.0).argmax(1)
    confmat = torch.bincount(labels * 10 + predicted, minlength=100).view(10, 10)
    assert m["confusion_matrix"] == confmat.tolist()
    assert m["accuracy"] == pytest.approx(100.0 * int((predicted == labels).sum()) / 64)
    with (out / "csv" / "metrics.csv").open(newline="") as f:
        tested = [r for r in csv.DictReader(f) if r["test/acc"]]
    assert len(tested) == 1 and m["accuracy"] == pytest.approx(100.0 * float(tested[0]["test/acc"]))

    # running again without resume must not clobber the run
    proc = run_cli("train.py", "stage=fp32", "name=t", *TINY, outputs=tmp_path, check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "resume=true" in proc.stderr
    assert "Traceback" not in proc.stderr

    # resume continues from last.ckpt: one more epoch, not a fresh start
    run_cli("train.py", "stage=fp32", "name=t", "resume=true", *TINY, "trainer.max_epochs=2",
            outputs=tmp_path)
    m2 = read_metrics(out / "metrics.json")
    assert m2["epochs"] == 2 and m2["train_samples_per_rank"] == [64]  # only the new epoch ran
    with (out / "csv" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    # the rows of epoch 0 are kept, the resumed run logged its epoch as epoch 1 (training and
    # validation, once each), then one test of the final model (the first run's test row is gone)
    trained = [int(r["epoch"]) for r in rows if r["train/loss"]]
    validated = [int(r["epoch"]) for r in rows if r["val/acc"]]
    assert trained == validated == [0, 1], rows
    assert [e for e, _ in artifacts.read_epoch_metrics(out / "csv" / "metrics.csv")["val/acc"]] == [0, 1]
    tested = [r for r in rows if r["test/acc"]]
    assert len(tested) == 1 and m2["accuracy"] == pytest.approx(100.0 * float(tested[0]["test/acc"]))


@pytest.mark.slow  # end to end through the CLI: tens of seconds
def test_sweep_jobs_get_their_own_folders(tmp_path):
    run_cli("train.py", "-m", "stage=fp32", "name=sw", *TINY, "data.num_train=64",
            "optimizer.lr=0.01,0.02", outputs=tmp_path)
    found = sorted((tmp_path / "sw" / "multirun").glob("*/*/fp32/metrics.json"))
    assert len(found) == 2
    lrs = sorted(OmegaConf.load(p.parent / ".hydra" / "config.yaml").optimizer.lr for p in found)
    assert lrs == [0.01, 0.02]


@pytest.mark.parametrize("override,message", [
    ("stage=nope", "Could not find 'stage/nope'"),
    ("data=imagenet", "Could not find 'data/imagenet'"),
    ("stage=ptq", "quantize.py stage=ptq"),
    ("optimizer.lr=-0.5", "must be positive"),
    ("module.mixup_prob=2", "must be a probability"),
    ("data=folder", "data.root"),
])
def test_bad_input_gets_a_clear_error(tmp_path, override, message):
    base = [o for o in TINY if not o.startswith("data.num_")] if override.startswith("data=") else TINY
    proc = run_cli("train.py", *base, override, outputs=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]  # docs/usage.md: bad input exits with 2
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "error: " in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script,override,meant", [
    ("train.py", "optimizer.lrr=0.1", "optimizer.lr"),
    ("quantize.py", "quant.max_shif=4", "quant.max_shift"),
])
def test_a_mistyped_config_key_is_named_with_the_fix(tmp_path, script, override, meant):
    proc = run_cli(script, override, outputs=tmp_path, check=False, timeout=120)
    key = override.split("=")[0]
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]  # one paragraph
    assert f"error: {key} is not a config option (did you mean {meant}?)" in errors[0]
    assert f"+{key}=VALUE" in errors[0] and "--cfg job" in errors[0]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert not list(tmp_path.iterdir())  # it stopped before anything ran


def test_folder_data_with_missing_dir(tmp_path):
    base = [o for o in TINY if not o.startswith("data.num_")]
    proc = run_cli("train.py", *base, "data=folder", f"data.root={tmp_path}/none",
                   outputs=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2 and "needs" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.ddp
def test_ddp_two_processes_on_cpu(tmp_path):
    run_cli("train.py", "stage=fp32", "name=ddp", *TINY, "trainer=ddp", "trainer.devices=2",
            "trainer.accelerator=cpu", "data.num_train=142", "data.batch_size=32", outputs=tmp_path)
    out = tmp_path / "ddp" / "fp32"
    m = read_metrics(out / "metrics.json")
    assert m["world_size"] == 2 and m["num_val_images"] == 14
    # 142 images, 14 held out for validation; global batch 32 split 16 per rank; each rank
    # trained on its half of the other 128
    assert m["train_samples_per_rank"] == [64, 64]
    assert (out / "model_fp32.pt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert not list(tmp_path.glob("ddp/fp32/**/*rank1*"))


@pytest.mark.ddp
def test_ddp_qat_through_the_pt2e_flow(tmp_path):
    """The exported, fake-quantized graph under DDP: each rank trains its half, rank 0 converts
    and writes artifacts whose runtimes agree with the converted model."""
    tiny = [o for o in TINY if not o.startswith("model.")] + ["model=resnet20"]
    run_cli("train.py", "stage=fp32", "name=q", *tiny, outputs=tmp_path)
    run_cli("train.py", "stage=qat", "name=q", *tiny, "quant.flow=pt2e",
            "tag=-pt2e", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
            "data.num_train=142", "data.batch_size=32", outputs=tmp_path, timeout=900)
    m = read_metrics(tmp_path / "q" / "qat-pt2e" / "metrics.json")
    assert m["world_size"] == 2 and m["train_samples_per_rank"] == [64, 64]
    assert m["int8"]["flow"] == "pt2e" and m["runtimes"]["torch.export"]["agrees_with_torch"]
    assert (tmp_path / "q" / "qat-pt2e" / "model_int8.pt2").is_file()


def test_last_ckpt_is_the_latest_epoch_even_when_it_is_not_the_best(tmp_path):
    """resume=true continues checkpoints/last.ckpt: with conf/train.yaml's callbacks it is
    written every epoch, also after epochs whose val/acc is no better than the best one."""
    import lightning as L
    from hydra.utils import instantiate

    callbacks = OmegaConf.load(ROOT / "conf" / "train.yaml").callbacks
    for c in callbacks.values():
        if c is not None and "dirpath" in c:
            c.dirpath = str(tmp_path)
    scores = [0.9, 0.5, 0.4]  # the first epoch is the best

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            return (self.w - 1).pow(2).sum()

        def validation_step(self, batch, i):
            self.log("val/acc", scores[self.current_epoch])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)
    checkpoints = [instantiate(c) for c in callbacks.values()
                   if c is not None and c._target_.endswith("ModelCheckpoint")]
    assert len(checkpoints) == 2
    trainer = L.Trainer(max_epochs=3, callbacks=checkpoints,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(Net(), data, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-epoch000-acc0.9000.ckpt",
                                                          "last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 2
    best = next(c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.ModelCheckpoint))
    assert Path(best.best_model_path).name == "best-epoch000-acc0.9000.ckpt"  # what is tested


def test_a_resumed_log_keeps_the_rows_before_its_checkpoint(tmp_path):
    """A run killed mid-epoch logged rows after its last checkpoint (step 4): those and the test
    row go, the rest is kept, and the continued run's logger appends to them (a new metric
    widens the header without losing a value)."""
    from qlab.callbacks import CSVLogger

    log = tmp_path / "csv" / "metrics.csv"
    log.parent.mkdir()
    log.write_text("epoch,step,train/loss,val/acc\n"
                   ",0,,\n0,1,2.0,\n0,1,,0.5\n1,3,1.5,\n1,3,,0.6\n2,4,1.2,\n2,5,1.1,\n,6,,\n")
    artifacts.keep_rows_before(log, 4)
    assert log.read_text().splitlines() == ["epoch,step,train/loss,val/acc", ",0,,", "0,1,2.0,",
                                           "0,1,,0.5", "1,3,1.5,", "1,3,,0.6"]
    logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"train/loss": 1.0, "epoch": 2}, step=5)
    logger.log_metrics({"test/acc": 0.7, "epoch": 2}, step=6)
    logger.save()
    series = artifacts.read_epoch_metrics(log)
    assert series["train/loss"] == [(0, 2.0), (1, 1.5), (2, 1.0)]
    assert series["val/acc"] == [(0, 0.5), (1, 0.6)] and series["test/acc"] == [(2, 0.7)]
    artifacts.keep_rows_before(log, 6)  # resuming again at step 6: the test row goes
    assert "test/acc" not in artifacts.read_epoch_metrics(log)
    assert artifacts.read_epoch_metrics(log)["train/loss"][-1] == (2, 1.0)
    artifacts.keep_rows_before(tmp_path / "absent.csv", 3)  # a run without a log: nothing to do
    log.write_text("epoch,step,train/loss,val/acc\n0,1,2.0,\n0,1,,0.5,7\n1,")  # killed mid-row
    artifacts.keep_rows_before(log, 4)  # rows cut short or too long are dropped, not fatal
    assert log.read_text().splitlines() == ["epoch,step,train/loss,val/acc", "0,1,2.0,"]


def test_only_a_run_continued_from_its_own_checkpoint_keeps_its_log(tmp_path):
    """resume=true (or ckpt_path= to one of the run's own checkpoints) keeps the rows before the
    checkpoint; a fresh run, or one started from another run's checkpoint, starts a new log even
    where a killed run left one and no checkpoint."""
    from qlab.stages.common import resume_path

    out, other = tmp_path / "fp32", tmp_path / "other"
    log = out / "csv" / "metrics.csv"
    rows = "epoch,step,train/loss\n0,1,2.0\n1,3,1.5\n"
    for folder in (out, other):
        (folder / "checkpoints").mkdir(parents=True)
        torch.save({"state_dict": {}, "global_step": 2}, folder / "checkpoints" / "last.ckpt")
    cfg = OmegaConf.create({"ckpt_path": None, "resume": True, "overwrite": False})
    log.parent.mkdir()
    log.write_text(rows)
    assert resume_path(cfg, out) == str(out / "checkpoints" / "last.ckpt")
    assert log.read_text().splitlines() == ["epoch,step,train/loss", "0,1,2.0"]
    log.write_text(rows)
    cfg.resume, cfg.ckpt_path = False, str(other / "checkpoints" / "last.ckpt")
    assert resume_path(cfg, out) == cfg.ckpt_path and not log.exists()
    (out / "checkpoints" / "last.ckpt").unlink()  # a killed run that left a log, no checkpoint
    log.write_text(rows)
    cfg.ckpt_path = None
    assert resume_path(cfg, out) is None and not log.exists()
