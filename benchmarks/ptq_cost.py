"""What PTQ costs: wall time of fuse + calibrate + convert + export, and peak memory (RSS) of
training and of INT8 inference, each measured in a fresh process.

python benchmarks/ptq_cost.py [--calib-batches 32] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import print_table, save

warnings.filterwarnings("ignore")


def child(kind: str, batch: int, calib_batches: int) -> dict:
    """Runs in its own process so that ru_maxrss is this job's peak alone."""
    import torch

    from qlab.artifacts import freeze, save_torchscript
    from qlab.data import CIFAR_MEAN, CIFAR_STD
    from qlab.hardware import quantized_engine, resolve_precision
    from qlab.models import Deployable, build_resnet50
    from qlab.quant.ptq import quantize_ptq
    from qlab.quant.qconfig import build_qconfig

    mean, std = CIFAR_MEAN, CIFAR_STD
    torch.manual_seed(0)
    model = build_resnet50()
    out: dict = {}
    if kind == "train":  # in the precision trainer.precision=auto picks on this CPU
        out["precision"] = resolve_precision("auto", "cpu")
        bf16 = out["precision"] == "bf16-mixed"
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(torch.randn(batch, 3, 32, 32)).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    elif kind == "ptq":
        with quantized_engine("auto"):
            g = torch.Generator().manual_seed(0)
            data = [(torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g), None)
                    for _ in range(calib_batches)]
            t = {"start": time.perf_counter()}  # then fuse+prepare, calibrate, convert (+ snap)
            int8 = quantize_ptq(model, build_qconfig(), data, batches=calib_batches, mean=mean,
                                std=std, example=torch.zeros(1, 3, 32, 32),
                                on_step=lambda step: t.__setitem__(step, time.perf_counter()))
            with tempfile.TemporaryDirectory() as d:
                scripted = torch.jit.script(Deployable(int8, mean, std).eval())
                save_torchscript(Path(d) / "m.pt", scripted)
                freeze(scripted)
            t["export"] = time.perf_counter()
            keys = list(t)
            out["seconds"] = {k: t[k] - t[p] for p, k in zip(keys, keys[1:])}
            out["seconds"]["total"] = t["export"] - t["start"]
    elif kind == "int8_infer":
        with quantized_engine("auto"):
            int8 = quantize_ptq(model, build_qconfig(),
                                [(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), None)],
                                batches=1, mean=mean, std=std, example=torch.zeros(1, 3, 32, 32))
            del model
            with torch.inference_mode():
                for _ in range(3):
                    int8(torch.randn(batch, 3, 32, 32))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calib-batches", type=int, default=32)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.calib_batches)))
        return
    res = {}
    for kind in ("ptq", "train", "int8_infer"):
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--batch", str(args.batch),
                               "--calib-batches", str(args.calib_batches)],
                              capture_output=True, text=True, check=True)
        res[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {kind}: {res[kind]}", flush=True)
    rows = [[f"PTQ {k}", f"{v:.2f} s"] for k, v in res["ptq"]["seconds"].items()]
    rows += [[f"peak RSS, {k}", f"{res[k]['peak_rss_mb']:.0f} MB"] for k in ("ptq", "train", "int8_infer")]
    print_table(f"PTQ cost, default ResNet-50, {args.calib_batches} calibration batches of "
                f"{args.batch} (training: {res['train']['precision']} step at batch {args.batch}; "
                f"INT8 inference: batch {args.batch})", ["what", "value"], rows)
    save("ptq_cost", {"args": vars(args), "results": res})


if __name__ == "__main__":
    main()
