"""Quantize, compare, export: `python quantize.py stage=ptq|report|integer name=NAME [overrides]`."""

import hydra
from omegaconf import DictConfig

from qlab.cli import run_stage
from qlab.stages import run_integer, run_ptq, run_report


@hydra.main(version_base="1.3", config_path="conf", config_name="quantize")
def main(cfg: DictConfig) -> None:
    run_stage(cfg, {"ptq": run_ptq, "report": run_report, "integer": run_integer}, "quantize.py")


if __name__ == "__main__":
    main()
