"""Entry-point glue: run a stage and turn bad input into one clear message, not a traceback.

Importing this module (train.py and quantize.py do, before `@hydra.main` runs) also makes Hydra's
own config errors (a mistyped key, an unknown config group option, an override that does not
parse) exit with status 2 and one message, like every other bad input."""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import hydra._internal.hydra as _hydra_core
import hydra._internal.utils as _hydra_utils
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
    SearchPathException,
)
from omegaconf import DictConfig
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from qlab.errors import QlabError

log = logging.getLogger("qlab")

HYDRA_CONFIG_ERRORS = (ConfigCompositionException, OverrideParseException, SearchPathException)


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


def config_error_message(exc: Exception, script: str) -> str:
    """One paragraph for a Hydra config error: what was wrong and how to fix it."""
    cause = exc.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        # `optimizer.lrr=0.1`: a key the config does not have
        key = str(cause.full_key)
        parent = cause.parent_node
        options = sorted(str(k) for k in parent if not str(k).startswith("_")
                         and str(k) != "hydra") if isinstance(parent, DictConfig) else []
        group, _, name = key.rpartition(".")
        close = difflib.get_close_matches(name, options, n=1)
        return (f"error: {key} is not a config option"
                + (f" (did you mean {group + '.' if group else ''}{close[0]}?)" if close else "")
                + (f"; {group or 'the top level'} has {', '.join(options)}" if options else "")
                + f". Fix the spelling of the key (`python {script} --cfg job` prints every "
                f"option), or write +{key}=VALUE only to add a new key on purpose.")
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        # `stage=nope`: a config group option that does not exist
        group, _, name = exc.missing_cfg_file.rpartition("/")
        first = str(exc).strip().splitlines()[0]
        return (f"error: {first}: the config group {group} has no option {name}. Use one of "
                f"{group}={'|'.join(exc.options)}.")
    lines = [str(exc).strip()]
    if isinstance(cause, OmegaConfBaseException) and str(cause).strip() not in lines[0]:
        lines.append(str(cause).strip())
    text = " ".join(" ".join(line.split()) for line in lines)
    text += "" if text.endswith((".", "?", "!")) else "."
    return (f"error: {text} Fix this override on the command line (`python {script} --help` "
            f"lists the config groups and their options).")


def _report_config_errors(run_and_report: Callable) -> Callable:
    """Hydra's run_and_report, except that config errors exit with status 2 and one message.
    HYDRA_FULL_ERROR=1 still shows Hydra's full traceback."""

    def wrapped(func: Callable) -> object:
        def guarded() -> object:
            try:
                return func()
            except HYDRA_CONFIG_ERRORS as exc:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(config_error_message(exc, Path(sys.argv[0]).name), file=sys.stderr)
                sys.exit(2)

        return run_and_report(guarded)

    wrapped.__wrapped__ = run_and_report
    return wrapped


def _install_config_error_handler() -> None:
    """Hydra reports its config errors inside hydra._internal.utils.run_and_report (exit status
    1); wrap it once, where Hydra looks it up. A Hydra without it keeps its own reporting."""
    for module in (_hydra_utils, _hydra_core):
        current = getattr(module, "run_and_report", None)
        if current is not None and not hasattr(current, "__wrapped__"):
            module.run_and_report = _report_config_errors(current)


_install_config_error_handler()
