"""The automatic mixed-precision modes of PTQ, both tuned on validation images (never the test
split): quant.mixed.max_drop returns ops to float, most helpful first, until the accuracy drop
is at most the given points; quant.mixed.size_mb gives 4-bit weights to the ops that lose least
accuracy per byte saved until the model is at most that size."""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, read_write
from torch import Tensor, nn
from torch.ao.quantization import QuantStub

from qlab import artifacts
from qlab.errors import QlabError
from qlab.quant.flows import Flow, flows_with
from qlab.quant.mixed import (
    input_readers,
    islands_after_calibration,
    make_float_islands,
    plain_8bit,
    quantized_gemms,
    weight_bits_record,
)
from qlab.quant.ptq import calibrate, qconfig_from_cfg
from qlab.quant.sensitivity import Simulation, accuracy, find_ops, per_op_accuracy
from qlab.stages.sensitivity import normalized_batches, subset

log = logging.getLogger(__name__)


def check_mixed(quant: DictConfig, flow: Flow) -> None:
    """What the flow takes of the mixed-precision options (Flow.float_islands, .mixed_bits),
    and the automatic modes' targets."""
    mixed = quant.get("mixed", {})
    max_drop, size_mb = mixed.get("max_drop"), mixed.get("size_mb")
    if quant.get("float_layers") and not flow.float_islands:
        raise QlabError(f"quant.float_layers does not work with quant.flow={flow.name}; use a flow "
                        f"that keeps ops in float ({', '.join(flows_with('float_islands'))}), "
                        f"or drop it.")
    wanted = [k for k, on in (("quant.weight_bits", not plain_8bit(quant.get("weight_bits", 8))),
                              ("quant.mixed.max_drop", max_drop is not None),
                              ("quant.mixed.size_mb", size_mb is not None)) if on]
    if wanted and not flow.mixed_bits:
        raise QlabError(f"{' / '.join(wanted)} {'does' if len(wanted) == 1 else 'do'} not work "
                        f"with quant.flow={flow.name}; use "
                        f"{' or '.join(flows_with('mixed_bits'))}, or drop them.")
    if max_drop is not None and not float(max_drop) >= 0:
        raise QlabError(f"quant.mixed.max_drop={max_drop}: accuracy points, >= 0 (null: off).")
    if size_mb is not None and not float(size_mb) > 0:
        raise QlabError(f"quant.mixed.size_mb={size_mb}: megabytes (1e6 bytes), > 0 (null: off).")
    for key in ("images", "rank_images"):
        n = mixed.get(key)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise QlabError(f"quant.mixed.{key}={n!r}: a number of validation images, >= 1 "
                            f"(null: all of them).")
    if max_drop is not None and size_mb is not None:
        raise QlabError("quant.mixed.max_drop and quant.mixed.size_mb are two automatic modes; "
                        "run one. (Float islands chosen by max_drop can be kept with "
                        "quant.float_layers=[...] while size_mb picks the 4-bit ops.)")


def with_choice(quant: DictConfig, **chosen) -> DictConfig:
    """The run's quant config with what an automatic mode chose (float_layers=..., or
    weight_bits=...): a new config; the resolved one is never written."""
    quant = copy.deepcopy(quant)
    with read_write(quant):
        for key, value in chosen.items():
            quant[key] = value
    OmegaConf.set_readonly(quant, True)
    return quant


def _val_batches(cfg: DictConfig, dm, what: str) -> tuple[list, list]:
    """The validation images an automatic mode judges on (quant.mixed.images, null: all of
    them) and the seeded subset of those it ranks its candidates on (quant.mixed.rank_images:
    the first images of the same seeded order, so the ranking images are judged on too)."""
    count = len(dm.splits["val"][1])
    if not count:
        raise QlabError(f"{what} chooses on validation images and this run has none: set "
                        f"data.val_split > 0 (it never uses the test split).")
    mixed = cfg.quant.mixed
    x, y = subset(dm, "val", count if mixed.get("images") is None else int(mixed.images), cfg.seed)
    ranked = min(len(y), int(mixed.get("rank_images") or len(y)))
    judged = normalized_batches(x, y, mean=dm.mean, std=dm.std, batch_size=dm.eval_batch_size)
    if ranked == len(y):
        return judged, judged
    return judged, normalized_batches(x[:ranked], y[:ranked], mean=dm.mean, std=dm.std,
                                      batch_size=dm.eval_batch_size)


def _fused(model: nn.Module, float_layers: list[str]) -> nn.Module:
    fused = copy.deepcopy(model).eval()
    fused.fuse_model(is_qat=False)
    make_float_islands(fused, float_layers)
    return fused


def choose_float_layers(cfg: DictConfig, flow: Flow, model: nn.Module, dm,
                        example: Tensor) -> tuple[nn.Module, dict]:
    """The calibrated, prepared model with the fewest float islands (greedy) that keep the
    validation drop <= quant.mixed.max_drop, and the record of how it was chosen. `model` is the
    unfused FP32 model; quant.float_layers are islands from the start.

    One calibration serves every step: PTQ observers see float activations whatever is float,
    so an island quantizes its output with the scale its op's own observer calibrated
    (islands_after_calibration, the same model as calibrating again). A step is a convert and
    one pass over the judged validation images (quant.mixed.images); the ranking, the costly
    part, runs on the first quant.mixed.rank_images of them."""
    mixed, quant = cfg.quant.mixed, cfg.quant
    max_drop = float(mixed.max_drop)
    batches, rank_batches = _val_batches(cfg, dm, "quant.mixed.max_drop")
    layers = [str(n) for n in quant.get("float_layers") or []]
    plain = _fused(model, [])
    fp32 = accuracy(plain, batches)
    calibrated = flow.prepare_ptq(copy.deepcopy(model).eval(), quant, example)
    seen = calibrate(calibrated, dm.calib_dataloader(), batches=quant.calib_batches,
                     mean=dm.mean, std=dm.std)
    int8 = flow.convert(calibrated, example)
    acc = accuracy(int8, batches)
    prepared = calibrated
    steps = [{"float_layers": list(layers), "val_accuracy": acc, "drop": fp32 - acc}]
    ranking: list[dict] = []
    if fp32 - acc > max_drop:
        # rank by the accuracy each conv/linear op, and the input quantization, wins back when
        # it alone returns to float, measured on the simulation of this all-INT8 model
        # (qlab.quant.sensitivity); the input stays float once the ops reading it are islands
        fused = _fused(model, layers)
        ops = find_ops(int8, fused, example)
        readers = input_readers(plain, example)
        plain_stubs = {n for n, m in plain.named_modules() if isinstance(m, QuantStub)}
        islands_for = {op.name: [op.name] for op in ops if op.kind in ("conv", "linear")} | {
            op.name: readers for op in ops if op.name in plain_stubs and readers}
        accs = per_op_accuracy(Simulation(fused, ops), rank_batches, only_quantized=False,
                               names=islands_for)
        ranking = [{"name": n, "accuracy_only_this_float": accs[n]["accuracy_only_this_float"],
                    "float_layers": islands_for[n]} for n in islands_for]
        ranking.sort(key=lambda r: -r["accuracy_only_this_float"])
        for r in ranking:
            new = [n for n in r["float_layers"] if n not in layers]
            if not new:  # the input, once the ops reading it are islands already
                continue
            layers.extend(new)
            prepared = islands_after_calibration(calibrated, plain, layers)
            acc = accuracy(flow.convert(prepared, example), batches)
            steps.append({"float_layers": list(layers), "val_accuracy": acc, "drop": fp32 - acc})
            log.info("mixed: %d float op(s), validation drop %.2f pt", len(layers), fp32 - acc)
            if fp32 - acc <= max_drop:
                break
    best = steps[-1]
    if best["drop"] > max_drop:  # not met: keep the step that came closest, fewest islands first
        best = min(steps, key=lambda st: (st["drop"], len(st["float_layers"])))
        log.warning("quant.mixed.max_drop=%s not met even with every conv/linear op in float "
                    "(drop %.2f pt): the adds, and the outputs that INT8 ops read, stay 8-bit "
                    "activations. Keeping the closest step: %d float op(s), drop %.2f pt.",
                    max_drop, steps[-1]["drop"], len(best["float_layers"]), best["drop"])
        prepared = islands_after_calibration(calibrated, plain, best["float_layers"])
    record = {"max_drop": max_drop, "val_images": sum(len(y) for _, y in batches),
              "rank_images": sum(len(y) for _, y in rank_batches),
              "fp32_val_accuracy": fp32, "val_accuracy": best["val_accuracy"],
              "val_drop": best["drop"], "met": best["drop"] <= max_drop,
              "float_layers": list(best["float_layers"]), "steps": steps, "ranking": ranking,
              "calib_images": seen}
    return prepared, record


def _with_qconfig(prepared: nn.Module, names: list[str], qconfig) -> nn.Module:
    """A copy of a calibrated model whose named ops take `qconfig` at convert (convert makes
    each weight observer from the op's qconfig; the activation observers keep what they saw)."""
    copy_ = copy.deepcopy(prepared)
    for name in names:
        for m in copy_.get_submodule(name).modules():
            if hasattr(m, "qconfig"):
                m.qconfig = qconfig
    return copy_


def choose_weight_bits(cfg: DictConfig, flow: Flow, model: nn.Module, dm,
                       example: Tensor) -> tuple[nn.Module, dict]:
    """The calibrated, prepared model whose 4-bit ops bring the size (4-bit weights counted as
    half a byte) to quant.mixed.size_mb or below, and the record of how they were chosen.

    One calibration serves every candidate (PTQ observers see float activations, whatever the
    weights' width). Each 8-bit conv/linear op is measured alone at 4 bits on
    quant.mixed.rank_images validation images; ops are then taken cheapest first, by accuracy
    lost per byte saved, until the size fits, and the choice is judged on quant.mixed.images."""
    mixed, quant = cfg.quant.mixed, cfg.quant
    target = float(mixed.size_mb)
    batches, rank_batches = _val_batches(cfg, dm, "quant.mixed.size_mb")
    fp32 = accuracy(_fused(model, [str(n) for n in quant.get("float_layers") or []]), batches)
    prepared = flow.prepare_ptq(copy.deepcopy(model).eval(), quant, example)
    seen = calibrate(prepared, dm.calib_dataloader(), batches=quant.calib_batches,
                     mean=dm.mean, std=dm.std)
    int8 = flow.convert(prepared, example)
    start = weight_bits_record(int8, quant.get("weight_bits", 8))
    gemms = {n: m.weight().numel() for n, m in quantized_gemms(int8).items()}
    with tempfile.TemporaryDirectory() as tmp:  # the file finish_int8 writes, named the same
        file_mb = artifacts.save_state_dict(Path(tmp) / artifacts.STATE_DICT_FILE, int8)
    four = list(start["4"])
    size = file_mb - sum(gemms[n] // 2 for n in four) / 1e6
    base = accuracy(int8, batches)
    rank_base = accuracy(int8, rank_batches) if rank_batches is not batches else base
    qconfig4 = qconfig_from_cfg(quant, qat=False, weight_bits=4)
    ranking: list[dict] = []
    if size > target:
        for name in (n for n in gemms if n not in four):
            acc = accuracy(flow.convert(_with_qconfig(prepared, [name], qconfig4), example),
                           rank_batches)
            saving = gemms[name] // 2
            ranking.append({"name": name, "val_accuracy_only_this_4bit": acc,
                            "loss_pt": rank_base - acc, "saving_bytes": saving})
        # cheapest first: accuracy lost per byte saved (a gain counts as free), bigger first
        ranking.sort(key=lambda r: (max(r["loss_pt"], 0.0) / max(r["saving_bytes"], 1),
                                    -r["saving_bytes"]))
        for r in ranking:
            if size <= target:
                break
            four.append(r["name"])
            size -= r["saving_bytes"] / 1e6
    chosen = _with_qconfig(prepared, four, qconfig4)
    acc = accuracy(flow.convert(chosen, example), batches) if four != start["4"] else base
    record = {"size_mb_target": target, "size_mb": size, "file_mb": file_mb,
              "all_int8_size_mb": file_mb - sum(gemms[n] // 2 for n in start["4"]) / 1e6,
              "met": size <= target, "weight_bits_4": four,
              "val_images": sum(len(y) for _, y in batches),
              "rank_images": sum(len(y) for _, y in rank_batches), "fp32_val_accuracy": fp32,
              "all_int8_val_accuracy": base, "val_accuracy": acc, "val_drop": fp32 - acc,
              "ranking": ranking, "calib_images": seen}
    log.info("mixed bits: %d op(s) 4-bit, %.3f MB (target %.3f), validation drop %.2f pt",
             len(four), size, target, fp32 - acc)
    if not record["met"]:
        log.warning("quant.mixed.size_mb=%s not met even with every conv/linear op 4-bit "
                    "(%.3f MB): activations, biases and scales stay as they are.", target, size)
    return chosen, record
