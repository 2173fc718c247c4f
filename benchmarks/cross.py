"""The emitted C of an integer model on aarch64 (the Raspberry Pi's and Jetson Nano's ISA),
emulated: cross-compiled with aarch64-linux-gnu-gcc (static), run under qemu-aarch64 on real
images, its output codes compared with the reference's. `make test-cross` installs both tools.

python benchmarks/cross.py INTEGER_DIR IMAGES_DIR [--images 200]

INTEGER_DIR holds model.json + weights.npz (outputs/NAME/STAGE/integer/); IMAGES_DIR is a folder
of class folders of images (DIR/test/); every 25th file in sorted order is taken. The time per
image is the emulator's, not an ARM CPU's.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import print_table, save


def main() -> None:
    from qlab.integer.emit_c import CFLAGS, build_c, elf_machine, emit_c, run_c
    from qlab.integer.reference import IntegerModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("integer_dir", type=Path)
    p.add_argument("images_dir", type=Path)
    p.add_argument("--images", type=int, default=200)
    args = p.parse_args()
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if cc is None or qemu is None:
        raise SystemExit("needs aarch64-linux-gnu-gcc and qemu-aarch64 (make test-cross installs "
                         "them: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross "
                         "qemu-user)")
    files = sorted(f for f in args.images_dir.glob("*/*") if f.is_file())[::25][:args.images]
    if not files:
        raise SystemExit(f"{args.images_dir} has no class folders of images")
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB"))
                                        for f in files]).transpose(0, 3, 1, 2).copy())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in ("model.json", "weights.npz"):
            shutil.copy(args.integer_dir / name, folder / name)
        cdir = emit_c(folder)
        binary = build_c(cdir, cflags=f"{CFLAGS} -static", cc=[cc], output="qlab_run_aarch64")
        t0 = time.perf_counter()
        mine = run_c(binary, pixels, runner=[qemu])
        seconds = time.perf_counter() - t0
        codes, _ = IntegerModel.load(folder).run(pixels)
        row = {"model": str(args.integer_dir), "machine": elf_machine(binary),
               "images": len(pixels),
               "identical_fraction": float((mine == codes.numpy()).all(axis=1).mean()),
               "qemu_s_per_image": seconds / len(pixels)}
    print_table("the C model on aarch64 under qemu-user", list(row),
                [list(row.values())])
    save("cross", row)


if __name__ == "__main__":
    main()
