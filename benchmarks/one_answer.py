"""One answer in every runtime: an INT8 stage's artifacts, each loaded as a user would (a fresh
process that imports only torch, or onnxruntime, and sets only the quantized engine), against the
reference on the test split: how many images give bit-identical logits, and each accuracy.

Eager stages: model_int8.pt under torch's default engine and fbgemm, x86, onednn, against the
integer reference (integer/model.json, written by stage=integer when missing). PT2E stages:
model_int8.pt2 (plain torch), model_int8.onnx (ONNX Runtime) and inductor, against the q/dq
program model_int8_pt2e.pt2.

python benchmarks/one_answer.py outputs/NAME/ptq [--root DIR] [--images N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import print_table, save

ENGINES = ("default", "fbgemm", "x86", "onednn")

# run in a fresh process: torch only, the engine set before the file is loaded
_TORCHSCRIPT = """
import sys, torch
if sys.argv[4] != "default":
    torch.backends.quantized.engine = sys.argv[4]
m = torch.jit.load(sys.argv[1])
x = torch.load(sys.argv[2])
with torch.inference_mode():
    torch.save(torch.cat([m(x[i:i + 500]) for i in range(0, len(x), 500)]), sys.argv[3])
"""
_PT2 = """
import sys, torch
m = torch.export.load(sys.argv[1]).module()
x = torch.load(sys.argv[2])
with torch.inference_mode():
    torch.save(torch.cat([m(x[i:i + 500]) for i in range(0, len(x), 500)]), sys.argv[3])
"""


def _fresh(code: str, model: Path, x_path: Path, tmp: Path, *args: str) -> torch.Tensor:
    out = tmp / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(model), str(x_path), str(out), *args],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{model} failed to run: {proc.stderr[-2000:]}")
    return torch.load(out)


def _test_split(metrics: dict, root: str | None, images: int | None):
    from qlab.data import ImageDataModule

    source = metrics.get("data_source", "folder")
    kwargs = {"root": root} if root else {}
    dm = ImageDataModule(source=source, classes=metrics["classes"], val_split=0.0,
                         image_size=metrics["image_size"], max_test=images, **kwargs)
    dm.setup()
    return dm.splits["test"]


def _integer_logits(stage: Path, metrics: dict, pixels: torch.Tensor) -> torch.Tensor:
    from qlab.integer.export import to_integer, write_integer
    from qlab.integer.reference import IntegerModel
    from qlab.stages.integer import rebuild_int8

    folder = stage / "integer"
    if not (folder / "model.json").is_file():
        folder = Path(tempfile.mkdtemp())
        spec, arrays = to_integer(rebuild_int8(stage, metrics), mean=metrics["mean"],
                                  std=metrics["std"], image_size=metrics["image_size"],
                                  max_shift=metrics["quant"]["max_shift"])
        write_integer(folder, spec, arrays)
    ref = IntegerModel.load(folder)
    return torch.cat([ref.dequantize(ref.run(pixels[i:i + 500])[0]).float()
                      for i in range(0, len(pixels), 500)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", type=Path, help="an INT8 stage folder: outputs/NAME/ptq, ...")
    p.add_argument("--root", help="data.root of a data=folder run (DIR/test/<class>/)")
    p.add_argument("--images", type=int, default=None, help="the first N test images (default all)")
    args = p.parse_args()
    metrics = json.loads((args.stage / "metrics.json").read_text())
    pixels, labels = _test_split(metrics, args.root, args.images)
    x = pixels.float() / 255
    flow = metrics["int8"].get("flow", "eager")
    tmp = Path(tempfile.mkdtemp())
    torch.save(x, tmp / "x.pt")
    if flow == "eager":
        reference, want = "integer reference", _integer_logits(args.stage, metrics, pixels)
        got = {f"torchscript ({e})": _fresh(_TORCHSCRIPT, args.stage / "model_int8.pt",
                                            tmp / "x.pt", tmp, e) for e in ENGINES}
    else:
        from qlab.runtimes import OnnxRuntime, inductor, load_pt2e

        program = load_pt2e(args.stage / "model_int8_pt2e.pt2")
        def batched(run) -> torch.Tensor:
            return torch.cat([run(x[i:i + 500]) for i in range(0, len(x), 500)])

        with torch.inference_mode():
            reference, want = "q/dq program (torch)", batched(program)
            ort = OnnxRuntime(args.stage / "model_int8.onnx")
            compiled = inductor(program, metrics["image_size"], len(metrics["mean"]))
            got = {"torch.export (.pt2)": _fresh(_PT2, args.stage / "model_int8.pt2",
                                                 tmp / "x.pt", tmp),
                   "onnxruntime": batched(ort), "inductor": batched(compiled)}
    rows, results = [], {}
    for name, logits in got.items():
        same = (logits == want).all(1).float().mean().item()
        acc = 100.0 * (logits.argmax(1) == labels).float().mean().item()
        results[name] = {"identical_logits_fraction": same, "accuracy": acc}
        rows.append([name, f"{same:.4f}", f"{acc:.2f}"])
    ref_acc = 100.0 * (want.argmax(1) == labels).float().mean().item()
    rows.append([reference, "1.0000", f"{ref_acc:.2f}"])
    print_table(f"{args.stage}: {len(labels)} test images, even zero points "
                f"{metrics['quant'].get('even_zero_point', False)}, recorded accuracy "
                f"{metrics['accuracy']:.2f}%", ["runtime", "identical logits", "accuracy (%)"],
                rows)
    save(f"one_answer-{args.stage.parent.name}-{args.stage.name}",
         {"stage": str(args.stage), "images": len(labels), "reference": reference,
          "reference_accuracy": ref_acc, "recorded_accuracy": metrics["accuracy"],
          "even_zero_point": metrics["quant"].get("even_zero_point", False), "runtimes": results})


if __name__ == "__main__":
    main()
