"""Train: `python train.py stage=fp32|qat name=NAME [overrides]` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from qlab.cli import run_stage
from qlab.stages import run_fp32, run_qat


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_stage(cfg, {"fp32": run_fp32, "qat": run_qat}, "train.py")


if __name__ == "__main__":
    main()
