"""How fast the integer reference runs, and whether it matches torch bit for bit.

The default ResNet-50 (CIFAR stem), po2 PTQ calibrated on random images (BN statistics set to
realistic values so activations spread over many codes), exported with stage=integer's code,
then --images random images through the reference and through torch's INT8 model.
The target: CIFAR-10's 10,000 test images in at most 5 minutes on 2 cores.

python benchmarks/integer.py [--images 10000] [--batch 250] [--model resnet50] [--gemm float32]
                             [--c N]   (N images through the emitted C as well)
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from common import print_table, save

warnings.filterwarnings("ignore")


def build(name: str, engine: str, mean, std):
    from qlab.models import (
        build_mobilenet_v2,
        build_resnet20,
        build_resnet50,
        randomize_batchnorm,
    )
    from qlab.quant.ptq import quantize_ptq
    from qlab.quant.qconfig import build_qconfig

    torch.manual_seed(0)
    model = randomize_batchnorm({"resnet50": build_resnet50, "resnet20": build_resnet20,
                                 "mobilenet_v2": build_mobilenet_v2}[name](num_classes=10).eval())
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    return quantize_ptq(model, build_qconfig(backend=engine), [(images, None)], batches=1,
                        mean=mean, std=std, example=torch.zeros(1, 3, 32, 32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--model", default="resnet50", choices=["resnet50", "resnet20", "mobilenet_v2"])
    ap.add_argument("--gemm", default="float32", choices=["float32", "float64"])
    ap.add_argument("--c", type=int, default=0, metavar="N",
                    help="also emit the model as C, build it and run it on N of the images: "
                         "flash (weights + code), RAM and ms per image (one thread)")
    args = ap.parse_args()

    from qlab.data import CIFAR_MEAN, CIFAR_STD
    from qlab.hardware import quantized_engine
    from qlab.integer.export import to_integer, write_integer
    from qlab.integer.reference import IntegerModel
    from qlab.integer.verify import zero_point_order
    from qlab.models import Normalize

    with quantized_engine("auto") as engine:
        mean, std = CIFAR_MEAN, CIFAR_STD
        int8 = build(args.model, engine, mean, std)
        folder = Path(tempfile.mkdtemp())
        spec, arrays = to_integer(int8, mean=mean, std=std, image_size=32, max_shift=8)
        write_integer(folder, spec, arrays)
        ref = IntegerModel.load(folder, gemm=args.gemm, zero_point=zero_point_order(engine))
        normalize = Normalize(mean, std)
        g = torch.Generator().manual_seed(1)
        ref_s = torch_s = 0.0
        same = 0
        for start in range(0, args.images, args.batch):
            n = min(args.batch, args.images - start)
            pixels = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
            t0 = time.perf_counter()
            codes, _ = ref.run(pixels)
            ref_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.inference_mode():
                theirs = int8(normalize(pixels.float().div_(255.0))).double()
            torch_s += time.perf_counter() - t0
            same += int((ref.dequantize(codes) == theirs).all(1).sum())
            print(f"\r{start + n}/{args.images} images, reference {ref_s:.1f} s", end="", flush=True)
        print()
        row = {"model": args.model, "gemm": args.gemm, "engine": engine, "images": args.images,
               "reference_s": ref_s, "reference_img_per_s": args.images / ref_s,
               "seconds_per_10k": 10000 * ref_s / args.images, "torch_int8_s": torch_s,
               "identical_fraction": same / args.images,
               "max_acc_bits": max(ref.acc_bits().values())}
        if args.c:
            from qlab.integer.emit_c import check_c

            pixels = torch.randint(0, 256, (args.c, 3, 32, 32), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(1))
            t0 = time.perf_counter()
            with torch.inference_mode():
                int8(normalize(pixels.float().div_(255.0)))
            row["torch_int8_ms_per_image_batched"] = 1e3 * (time.perf_counter() - t0) / args.c
            t0 = time.perf_counter()
            ref.run(pixels)
            row["reference_ms_per_image_batched"] = 1e3 * (time.perf_counter() - t0) / args.c
            row["c"] = {k: v for k, v in check_c(folder, ref, [(pixels, None)],
                                                 limit=args.c).items() if k != "folder"}
            c = row["c"]
            print_table("The same model as C (one image at a time, one thread)",
                        ["model", "images", "identical", "ms/img C", "ms/img reference",
                         "ms/img torch", "flash B", "RAM B"],
                        [[row["model"], c.get("images"), c.get("identical_fraction"),
                          c.get("ms_per_image"), row["reference_ms_per_image_batched"],
                          row["torch_int8_ms_per_image_batched"], c.get("flash_bytes"),
                          c.get("ram_bytes")]])
        print_table("Integer reference vs torch INT8 (random images)",
                    ["model", "gemm", "images", "reference s", "img/s", "s per 10k", "torch s",
                     "identical"],
                    [[row["model"], row["gemm"], row["images"], row["reference_s"],
                      row["reference_img_per_s"], row["seconds_per_10k"], row["torch_int8_s"],
                      row["identical_fraction"]]])
    save(f"integer_{args.model}_{args.gemm}", {"rows": [row]})


if __name__ == "__main__":
    main()
