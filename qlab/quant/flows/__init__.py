"""Quantization flows behind one interface: the ptq and qat stages call only these methods.

A flow turns an FP32 network into an INT8 one (prepare -> calibrate or train -> convert) and
writes the INT8 artifacts (export). `quant.flow` picks one; a new flow is one more file here
and one entry in FLOWS.
"""

from __future__ import annotations

import importlib

from qlab.errors import QlabError
from qlab.quant.flows.base import Flow

# module:class, imported when picked (pt2e pulls in torchao, onnx and inductor)
FLOWS = {"eager": "qlab.quant.flows.eager:EagerFlow", "pt2e": "qlab.quant.flows.pt2e:Pt2eFlow",
         "ort": "qlab.quant.flows.ort:OrtStaticFlow"}


def _flow_class(name: str) -> type[Flow]:
    module, cls = FLOWS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_flow(name: str) -> Flow:
    """The flow called `name` (quant.flow)."""
    if name not in FLOWS:
        raise QlabError(f"quant.flow={name!r} is not known; use one of {', '.join(FLOWS)}.")
    return _flow_class(name)()


def flows_with(feature: str) -> list[str]:
    """The quant.flow names whose Flow has `feature` (a boolean class attribute) set; it imports
    every flow, so it is for error messages only."""
    return [f"quant.flow={name}" for name in FLOWS if getattr(_flow_class(name), feature)]
