"""Entry-point glue: run a stage and turn bad input into one clear message, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping

from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from qlab.errors import QlabError

log = logging.getLogger("qlab")


def run_stage(cfg: DictConfig, stages: Mapping[str, Callable[[DictConfig], object]], script: str):
    """Dispatch cfg.stage.name to its function; QlabError and config errors exit with status 2."""
    try:
        name = cfg.stage.name
        if name not in stages:
            other = "quantize.py" if script == "train.py" else "train.py"
            raise QlabError(
                f"stage={name} is not run by {script}, which runs stage={'|'.join(stages)}. "
                f"Run `python {other} stage={name} ...` instead."
            )
        return stages[name](cfg)
    except (QlabError, MissingMandatoryValue, InstantiationException) as exc:
        cause = exc
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, InstantiationException | QlabError | MissingMandatoryValue):
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(2)
        if isinstance(cause, ValueError | TypeError):
            print(f"error: invalid configuration: {cause}", file=sys.stderr)
            sys.exit(2)
        raise
