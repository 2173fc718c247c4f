"""quant.mixed.max_drop: PTQ that returns ops to float, most helpful first, until the accuracy
drop on validation images (never the test split) is at most the given points."""

from __future__ import annotations

import copy
import logging

from omegaconf import DictConfig
from torch import Tensor, nn

from qlab.errors import QlabError
from qlab.quant.flows import Flow
from qlab.quant.mixed import make_float_islands
from qlab.quant.ptq import calibrate
from qlab.quant.sensitivity import Simulation, accuracy, find_ops
from qlab.stages.sensitivity import normalized_batches, subset

log = logging.getLogger(__name__)


def check_mixed(quant: DictConfig) -> None:
    """Float islands and the automatic mode exist in the eager flow only (for now)."""
    wanted = bool(quant.get("float_layers")) or quant.get("mixed", {}).get("max_drop") is not None
    if wanted and quant.flow != "eager":
        raise QlabError(f"quant.float_layers / quant.mixed.max_drop work with quant.flow=eager; "
                        f"this run asks for quant.flow={quant.flow}. Drop them, or use the eager "
                        f"flow.")
    max_drop = quant.get("mixed", {}).get("max_drop")
    if max_drop is not None and not float(max_drop) >= 0:
        raise QlabError(f"quant.mixed.max_drop={max_drop}: accuracy points, >= 0 (null: off).")


def _fused(model: nn.Module, float_layers: list[str]) -> nn.Module:
    fused = copy.deepcopy(model).eval()
    fused.fuse_model(is_qat=False)
    make_float_islands(fused, float_layers)
    return fused


def choose_float_layers(cfg: DictConfig, flow: Flow, model: nn.Module, dm,
                        example: Tensor) -> tuple[nn.Module, dict]:
    """The calibrated, prepared model with the fewest float islands (greedy) that keep the
    validation drop <= quant.mixed.max_drop, and the record of how it was chosen. `model` is the
    unfused FP32 model; quant.float_layers are islands from the start."""
    mixed, quant = cfg.quant.mixed, cfg.quant
    max_drop = float(mixed.max_drop)
    if not len(dm.splits["val"][1]):
        raise QlabError("quant.mixed.max_drop chooses on validation images and this run has "
                        "none: set data.val_split > 0 (it never uses the test split).")
    batches = normalized_batches(*subset(dm, "val", mixed.images, cfg.seed), mean=dm.mean,
                                 std=dm.std, batch_size=dm.eval_batch_size)
    layers = [str(n) for n in quant.get("float_layers") or []]
    fp32 = accuracy(_fused(model, []), batches)
    seen = [0]

    def build(names: list[str]) -> tuple[nn.Module, nn.Module, float]:
        q = copy.deepcopy(quant)
        q.float_layers = names
        prepared = flow.prepare_ptq(copy.deepcopy(model).eval(), q, example)
        seen[0] = calibrate(prepared, dm.calib_dataloader(), batches=quant.calib_batches,
                            mean=dm.mean, std=dm.std)
        int8 = flow.convert(prepared, example)
        return prepared, int8, accuracy(int8, batches)

    prepared, int8, acc = build(layers)
    steps = [{"float_layers": list(layers), "val_accuracy": acc, "drop": fp32 - acc}]
    ranking: list[dict] = []
    if fp32 - acc > max_drop:
        # rank by the accuracy each conv/linear op wins back when it alone returns to float,
        # measured on the simulation of this all-INT8 model (qlab.quant.sensitivity)
        fused = _fused(model, layers)
        ops = find_ops(int8, fused, example)
        sim = Simulation(fused, ops)
        names = [op.name for op in ops]
        for op in ops:
            if op.kind in ("conv", "linear"):
                gain = accuracy(sim.set_quantized(n for n in names if n != op.name), batches)
                ranking.append({"name": op.name, "accuracy_only_this_float": gain})
        ranking.sort(key=lambda r: -r["accuracy_only_this_float"])
        for r in ranking:
            layers.append(r["name"])
            prepared, int8, acc = build(layers)
            steps.append({"float_layers": list(layers), "val_accuracy": acc, "drop": fp32 - acc})
            log.info("mixed: %d float op(s), validation drop %.2f pt", len(layers), fp32 - acc)
            if fp32 - acc <= max_drop:
                break
    record = {"max_drop": max_drop, "val_images": sum(len(y) for _, y in batches),
              "fp32_val_accuracy": fp32, "val_accuracy": steps[-1]["val_accuracy"],
              "val_drop": steps[-1]["drop"], "met": steps[-1]["drop"] <= max_drop,
              "float_layers": list(layers), "steps": steps, "ranking": ranking,
              "calib_images": seen[0]}
    if not record["met"]:
        log.warning("quant.mixed.max_drop=%s not met even with every conv/linear op in float "
                    "(drop %.2f pt): adds and the input stay INT8.", max_drop, record["val_drop"])
    return prepared, record
