"""Quantize, compare, export: `python quantize.py stage=ptq|report|integer|sensitivity name=NAME ...`."""

import hydra
from omegaconf import DictConfig

from qlab.cli import run_stage
from qlab.stages import run_integer, run_ptq, run_report, run_sensitivity


@hydra.main(version_base="1.3", config_path="conf", config_name="quantize")
def main(cfg: DictConfig) -> None:
    run_stage(cfg, {"ptq": run_ptq, "report": run_report, "integer": run_integer,
                    "sensitivity": run_sensitivity}, "quantize.py")


if __name__ == "__main__":
    main()
