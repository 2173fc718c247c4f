"""Checking the integer model against torch: the stage's INT8 model rebuilt, the engine's rounding
order, layer-by-layer comparison, the whole-split verification behind verify.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.ao.nn.quantized as nnq
from torch import Tensor, nn
from tqdm import tqdm

from qlab import artifacts
from qlab.errors import QlabError
from qlab.hardware import quantized_engine
from qlab.integer.export import _Record, trace
from qlab.integer.reference import IntegerModel
from qlab.models import Normalize


@torch.inference_mode()
def zero_point_order(engine: str) -> dict[str, str]:
    """Where the current engine adds the output zero point of a quantized conv and linear: after
    rounding (fbgemm: round(acc / 2^k) + zp) or before it (oneDNN: round(acc / 2^k + zp)).

    Asked of the kernels: acc = 1 and 3 at output scale 2 and zero point 1 are ties; `after`
    gives 1 and 3, `before` 2 and 2. Kernels that do neither get `after` (then verify.json
    shows where they differ)."""
    with quantized_engine(engine):
        w = torch.quantize_per_tensor(torch.ones(1, 1), 1.0, 0, torch.qint8)
        x = torch.quantize_per_tensor(torch.tensor([[1.0], [3.0]]), 1.0, 0, torch.quint8)
        conv, linear = nnq.Conv2d(1, 1, 1), nnq.Linear(1, 1)
        conv.set_weight_bias(w.view(1, 1, 1, 1), None)
        linear.set_weight_bias(w, None)
        orders = {}
        for kind, mod, inp in (("conv", conv, x.view(2, 1, 1, 1)), ("linear", linear, x)):
            mod.scale, mod.zero_point = 2.0, 1
            got = mod(inp).int_repr().flatten().tolist()
            orders[kind] = "before" if got == [2, 2] else "after"
        return orders


METRICS_KEYS = ("int8", "model", "classes", "mean", "std", "quant")  # what stage=integer reads


def rerun_hint(stage_dir: Path) -> str:
    """How to write an INT8 stage folder (outputs/NAME/ptq-TAG, qat-TAG, ...) again."""
    run, source = stage_dir.parent.name, stage_dir.name
    for stage, command in (("ptq", "python quantize.py stage=ptq"),
                           ("qat", "python train.py stage=qat")):
        if source.startswith(stage):
            tag = source[len(stage):]
            extra = (f" tag={tag}" if tag else "") + (" overwrite=true" if stage == "qat" else "")
            return (f"Re-run that stage to write it again: `{command} name={run}{extra}` "
                    f"with the options it was made with.")
    return "Re-run the stage that made this folder to write it again."


def stage_metrics(stage_dir: Path, reader: str = "the integer export",
                  flows: tuple[str, ...] = ("eager",)) -> dict:
    """metrics.json of an INT8 stage folder made by one of `flows`, or a clear error (`reader`:
    who needs it)."""
    path = stage_dir / "metrics.json"
    if not path.is_file():
        raise QlabError(f"{path} does not exist: from= must name an INT8 stage folder of this run "
                        f"(ptq, qat, ptq-ceil, ...) that has finished.")
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QlabError(f"{path} is not valid JSON ({exc}): the file is truncated or corrupt "
                        f"(a run stopped while writing it?). {rerun_hint(stage_dir)}") from None
    if not isinstance(metrics, dict):
        raise QlabError(f"{path} holds a JSON {type(metrics).__name__}, not a stage's metrics "
                        f"object: the file is damaged. {rerun_hint(stage_dir)}")
    if "int8" not in metrics or not (stage_dir / artifacts.STATE_DICT_FILE).is_file():
        raise QlabError(f"{stage_dir} is not an INT8 stage (no int8 record or "
                        f"model_int8_state_dict.pt); use from=ptq, from=qat or a tagged variant.")
    missing = [k for k in METRICS_KEYS if k not in metrics]
    if missing or not isinstance(metrics["int8"], dict) or not isinstance(metrics["quant"], dict):
        raise QlabError(f"{path} lacks {', '.join(missing) or 'a valid int8 or quant record'}, "
                        f"which every INT8 stage writes: the file is damaged or from an older "
                        f"qlab. {rerun_hint(stage_dir)}")
    if metrics["int8"].get("flow", "eager") not in flows:
        raise QlabError(f"{stage_dir} was made by quant.flow={metrics['int8']['flow']}; {reader} "
                        f"reads INT8 models of quant.flow={' or '.join(flows)}: quantize with one "
                        f"of those.")
    return metrics


@torch.inference_mode()
def intermediates(int8: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Every quantized tensor of the eager model for normalized input x, by fx node name."""
    rec = _Record(trace(int8))
    rec.run(x)
    return {k: v.int_repr() for k, v in rec.values.items()
            if isinstance(v, Tensor) and v.is_quantized}


def first_mismatch(ref: IntegerModel, int8: nn.Module, pixels: Tensor, normalized: Tensor) -> dict:
    """The first op (execution order) whose output differs between the reference and torch."""
    _, mine = ref.run(pixels, keep=True)
    theirs = intermediates(int8, normalized)
    for op in ref.spec["ops"]:
        a, b = mine[op["output"]].to(torch.int64), theirs[op["output"]].to(torch.int64)
        if a.shape != b.shape:
            return {"op": op["name"], "kind": op["op"], "shape": [list(a.shape), list(b.shape)]}
        diff = (a - b).abs()
        if diff.any():
            return {"op": op["name"], "kind": op["op"], "elements": int((diff > 0).sum()),
                    "of": int(diff.numel()), "max_abs_diff": int(diff.max()),
                    "images": int((diff.flatten(1) > 0).any(1).sum()), "of_images": len(pixels)}
    return {"op": None, "note": "every intermediate tensor agrees; the outputs differ after the "
                                "eager model (TorchScript export)"}


def layer_table(ref: IntegerModel) -> list[dict]:
    """Per op with an accumulator: largest |acc| seen, the bits it needs, its shift."""
    bits = ref.acc_bits()
    return [{"op": op["name"], "kind": op["op"], "max_abs_acc": ref.acc_max[op["name"]],
             "acc_bits": bits[op["name"]], "shift": op.get("shift")}
            for op in ref.spec["ops"] if op["name"] in ref.acc_max]


def verify(ref: IntegerModel, scripted, int8: nn.Module, loader, *, mean, std,
           limit: int | None = None) -> dict:
    """Reference vs torch's TorchScript model over `loader`: identical logits, agreement, time."""
    normalize = Normalize(mean, std)
    n = same = agree = ref_correct = torch_correct = 0
    seconds = torch_seconds = 0.0
    mismatch = None
    total = len(loader.dataset) if limit is None else min(limit, len(loader.dataset))
    with tqdm(total=total, desc="integer reference", unit="img", dynamic_ncols=True) as bar:
        for pixels, labels in loader:
            if n >= total:
                break
            pixels, labels = pixels[: total - n], labels[: total - n]
            t0 = time.perf_counter()
            codes, _ = ref.run(pixels)
            seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.inference_mode():
                theirs = scripted(pixels.float().div_(255.0)).double()
            torch_seconds += time.perf_counter() - t0
            mine = ref.dequantize(codes)
            equal = (mine == theirs).all(dim=1)
            same += int(equal.sum())
            agree += int((mine.argmax(1) == theirs.argmax(1)).sum())
            ref_correct += int((mine.argmax(1) == labels).sum())
            torch_correct += int((theirs.argmax(1) == labels).sum())
            if mismatch is None and not bool(equal.all()):
                bad = (~equal).nonzero().flatten()
                mismatch = first_mismatch(ref, int8, pixels[bad],
                                          normalize(pixels[bad].float().div_(255.0)))
                mismatch["logit_max_abs_diff"] = float((mine - theirs)[bad].abs().max())
            n += len(labels)
            bar.update(len(labels))
    return {"images": n, "identical_logits_fraction": same / max(n, 1),
            "top1_agreement": agree / max(n, 1), "accuracy": 100.0 * ref_correct / max(n, 1),
            "torch_accuracy": 100.0 * torch_correct / max(n, 1), "first_mismatch": mismatch,
            "seconds": seconds, "images_per_s": n / max(seconds, 1e-9),
            "torch_seconds": torch_seconds}
