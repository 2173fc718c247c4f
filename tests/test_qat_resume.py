"""QAT resumes into a fake-quant model: the callback prepares it before the checkpoint loads."""

import pytest
import torch

from conftest import TINY, read_metrics, run_cli

pytestmark = pytest.mark.slow


def test_qat_resume_restores_fake_quant_state(tmp_path):
    run_cli("train.py", "stage=fp32", "name=r", *TINY, outputs=tmp_path)
    quick = [*TINY, "quant.qat.epochs=1"]
    run_cli("train.py", "stage=qat", "name=r", *quick, outputs=tmp_path)
    last = tmp_path / "r" / "qat" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=False, map_location="cpu")["state_dict"]
    assert any(k.endswith("weight_fake_quant.scale") for k in state)
    run_cli("train.py", "stage=qat", "name=r", "resume=true", *quick, "trainer.max_epochs=2",
            outputs=tmp_path)
    m = read_metrics(tmp_path / "r" / "qat" / "metrics.json")
    # one more epoch, not two: 86 training images (10 of 96 held out), 2 full batches of 32
    assert m["epochs"] == 2 and m["train_samples_per_rank"] == [64]
    assert m["selected_on"] == "val" and m["num_val_images"] == 10
    assert 23.5 < m["size_mb"] < 24.3
