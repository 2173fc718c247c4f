"""The emitted C on the lab's named targets (Raspberry Pi, Jetson Nano: 64-bit ARM), emulated:
cross-compiled with aarch64-linux-gnu-gcc, run under qemu-user, bit-exact with the reference.
`make test-cross` installs both (Debian); elsewhere these tests skip."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_emit_c import _export_tiny
from test_integer import MEAN, STD, _pixels
from test_weight_bits import _tiny_mixed

from qlab.integer.emit_c import CFLAGS, build_c, elf_machine, emit_c, run_c
from qlab.integer.export import to_integer, write_integer
from qlab.integer.reference import IntegerModel

CROSS_CC, QEMU = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
pytestmark = [
    pytest.mark.cross,
    pytest.mark.skipif(CROSS_CC is None or QEMU is None,
                       reason="needs aarch64-linux-gnu-gcc and qemu-aarch64: `make test-cross` "
                              "installs them (apt-get install gcc-aarch64-linux-gnu "
                              "libc6-dev-arm64-cross qemu-user)"),
]


def _on_aarch64(folder, pixels):
    """Emit, cross-compile (static, so qemu needs no ARM libraries), run under qemu; returns the
    binary's output codes and the reference's."""
    cdir = emit_c(folder)
    binary = build_c(cdir, cflags=f"{CFLAGS} -static", cc=[CROSS_CC], output="qlab_run_aarch64")
    assert elf_machine(binary) == "aarch64"
    codes, _ = IntegerModel.load(folder).run(pixels)
    return run_c(binary, pixels, runner=[QEMU]), codes.numpy()


@pytest.mark.parametrize("per_channel", [False, True])
def test_every_op_on_aarch64_equals_the_reference(tmp_path, per_channel):
    _export_tiny(tmp_path, per_channel=per_channel)
    mine, theirs = _on_aarch64(tmp_path, _pixels(32, seed=31))
    assert mine.shape == (32, 10)
    np.testing.assert_array_equal(mine, theirs)


def test_packed_4bit_weights_on_aarch64(tmp_path):
    int8, names = _tiny_mixed()
    spec, arrays = to_integer(int8, mean=MEAN, std=STD, image_size=32, max_shift=8,
                              four_bit=names)
    write_integer(tmp_path, spec, arrays)
    mine, theirs = _on_aarch64(tmp_path, _pixels(24, seed=32))
    np.testing.assert_array_equal(mine, theirs)
