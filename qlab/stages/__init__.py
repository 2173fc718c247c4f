"""The stages: fp32 and qat (train.py), ptq, report, integer and sensitivity (quantize.py)."""

from qlab.stages.fp32 import run_fp32
from qlab.stages.int8 import run_ptq, run_qat
from qlab.stages.integer import run_integer
from qlab.stages.report import run_report
from qlab.stages.sensitivity import run_sensitivity

__all__ = ["run_fp32", "run_ptq", "run_qat", "run_report", "run_integer", "run_sensitivity"]
