"""4-bit weights (quant.weight_bits, quant.mixed.size_mb): int8 values in -8..7 with po2 scales in
torch's kernels, packed two per byte in the integer model and its C, bit-exact everywhere."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_emit_c import CC, _Tiny, needs_cc
from test_integer import MEAN, STD, _normalized, _pixels
from torch.ao.quantization import convert, prepare

from qlab.errors import QlabError
from qlab.hardware import quantized_engine
from qlab.integer.emit_c import build_c, emit_c, run_c
from qlab.integer.export import snap_biases, to_integer, write_integer
from qlab.integer.reference import IntegerModel, pack_int4, unpack_int4
from qlab.models import build_resnet20, randomize_batchnorm
from qlab.quant.mixed import four_bit, weight_bits_of, weight_bits_record, weighted_ops
from qlab.quant.ptq import calibrate, prepare_ptq
from qlab.quant.qconfig import build_qconfig, weight_range

from conftest import read_metrics, run_cli


def test_pack_int4_round_trip_and_layout():
    values = np.array([-8, 7, -1, 0, 3, -5, 1], dtype=np.int8)  # an odd count
    packed = pack_int4(values)
    assert packed.dtype == np.uint8 and packed.shape == (4,)
    # element 2i in the low nibble, 2i+1 in the high one, two's complement; the last high is 0
    assert packed.tolist() == [0x8 | 0x7 << 4, 0xF | 0x0 << 4, 0x3 | 0xB << 4, 0x1]
    np.testing.assert_array_equal(unpack_int4(packed, (7,)), values)
    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, size=(5, 3, 3, 3)).astype(np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(w), w.shape), w)
    with pytest.raises(QlabError, match=r"-8\.\.7; these reach -9\.\.7"):
        pack_int4(np.array([-9, 7]))


def test_weight_range_and_the_4bit_observer():
    assert weight_range("portable", 4) == weight_range("vnni", 4) == (-8, 7)
    assert weight_range("portable") == (-64, 64) and weight_range("vnni") == (-128, 127)
    with pytest.raises(QlabError, match="4 or 8 bits"):
        weight_range("portable", 6)
    w = torch.randn(16, 8, 3, 3)
    for per_channel in (False, True):
        obs = build_qconfig(per_channel=per_channel, weight_bits=4).weight()
        obs(w)
        scale, zero = obs.calculate_qparams()
        assert (obs.quant_min, obs.quant_max) == (-8, 7) and (zero == 0).all()
        exps = torch.log2(scale.double())
        assert torch.equal(exps, exps.round())  # every scale 2^n
        # nearest po2 of max|w| / 7: the biggest weight lands within a po2 step of the top code
        big = w.abs().amax(dim=(1, 2, 3)) if per_channel else w.abs().max()
        assert ((big / scale) <= 7 * math.sqrt(2) + 1e-6).all()


def test_weight_bits_spec():
    names = ["conv1", "layers.0.conv1", "fc"]
    assert weight_bits_of(8, names) == dict.fromkeys(names, 8)
    assert weight_bits_of(4, names) == dict.fromkeys(names, 4)
    assert weight_bits_of({"fc": 4}, names) == {"conv1": 8, "layers.0.conv1": 8, "fc": 4}
    assert weight_bits_of(OmegaConf.create({"default": 4, "conv1": 8}), names) == {
        "conv1": 8, "layers.0.conv1": 4, "fc": 4}
    with pytest.raises(QlabError, match="names layers.0.conv9, not a conv or linear op"):
        weight_bits_of({"layers.0.conv9": 4}, names)
    with pytest.raises(QlabError, match="fc gets 2 bits"):
        weight_bits_of({"fc": 2}, names)
    with pytest.raises(QlabError, match="give 4 or 8"):
        weight_bits_of("four", names)


def _resnet20_int8(spec, *, per_channel=True):
    """ResNet-20 (BN-realistic random weights) through the eager PTQ pipeline with
    quant.weight_bits=`spec`, calibrated on random images; biases snapped."""
    torch.manual_seed(0)
    model = randomize_batchnorm(build_resnet20(num_classes=10)).eval()

    def qconfigs(fused):
        return dict.fromkeys(four_bit(spec, fused), build_qconfig(per_channel=per_channel,
                                                                  weight_bits=4))
    prepared = prepare_ptq(model, build_qconfig(per_channel=per_channel), op_qconfigs=qconfigs)
    calibrate(prepared, [(_pixels(32, seed=1), None)], batches=1, mean=MEAN, std=STD)
    int8 = convert(prepared)
    snap_biases(int8, torch.zeros(1, 3, 32, 32))
    return int8


def test_mixed_bits_in_torch_and_the_integer_model(tmp_path):
    spec = {"layers.2.conv2": 4, "layers.8.conv1": 4, "fc": 4}
    with quantized_engine("fbgemm"):
        int8 = _resnet20_int8(spec)
        all8 = _resnet20_int8(8)
        record = weight_bits_record(int8, spec)
        assert record["4"] == ["layers.2.conv2", "layers.8.conv1", "fc"]
        assert len(record["8"]) == 19 and "conv1" in record["8"]
        expected = 16 * 16 * 9 + 64 * 64 * 9 + 64 * 10
        assert record["weights_4bit"] == expected and record["packed_saving_bytes"] == expected // 2
        mods = dict(int8.named_modules())
        for name in record["4"]:
            w = mods[name].weight().int_repr()
            # nearest po2 of max|w| / 7 is at most sqrt(2) away: the top code is 5..8
            assert int(w.min()) >= -8 and int(w.max()) <= 7 and int(w.abs().max()) >= 5
        assert max(int(mods[n].weight().int_repr().abs().max()) for n in record["8"]) > 7
        # 4-bit weights cost accuracy against the FP32-like all-8-bit model, but run exactly
        x = _normalized(_pixels(16, seed=3))
        with torch.inference_mode():
            y4, y8 = int8(x), all8(x)
        assert not torch.equal(y4, y8)

        out = tmp_path / "int"
        out.mkdir()
        model_spec, arrays = to_integer(int8, mean=MEAN, std=STD, image_size=32, max_shift=8,
                                        four_bit=record["4"])
        assert model_spec["version"] == 2
        ops = {op["name"]: op for op in model_spec["ops"]}
        assert [n for n, op in ops.items() if op.get("weight_bits") == 4] == record["4"]
        packed = arrays["layers.2.conv2.weight"]
        assert packed.dtype == np.uint8 and packed.shape == (16 * 16 * 9 // 2,)
        assert arrays["conv1.weight"].dtype == np.int8  # 8-bit ops stay int8
        write_integer(out, model_spec, arrays)
        ref = IntegerModel.load(out)
        pixels = _pixels(16, seed=3)
        codes, _ = ref.run(pixels)
        with torch.inference_mode():
            assert torch.equal(ref.dequantize(codes), y4.double())  # bit-exact with torch
        np.testing.assert_array_equal(ref.arrays["layers.2.conv2.weight"],
                                      mods["layers.2.conv2"].weight().int_repr().numpy())
        # an all-8-bit model is still written as format version 1
        assert to_integer(all8, mean=MEAN, std=STD, image_size=32)[0]["version"] == 1
        with pytest.raises(QlabError, match="layers.0.conv9 are not conv/linear ops"):
            to_integer(int8, mean=MEAN, std=STD, image_size=32, four_bit=["layers.0.conv9"])


def _tiny_mixed():
    """_Tiny with 4-bit weights in its dilated depthwise conv (9 weights per channel: blocks
    start mid-byte), its grouped conv and its head; the rest 8-bit."""
    with quantized_engine("fbgemm"):
        torch.manual_seed(0)
        model = randomize_batchnorm(_Tiny().eval())
        model.fuse_model()
        model.qconfig = build_qconfig(per_channel=True)
        names = ["dw", "g", "fc"]
        for n in names:
            model.get_submodule(n).qconfig = build_qconfig(per_channel=True, weight_bits=4)
        prepare(model, inplace=True)
        model(_normalized(_pixels(32, seed=1)))
        int8 = convert(model)
        snap_biases(int8, torch.zeros(1, 3, 32, 32))
    return int8, names


@needs_cc
def test_packed_4bit_weights_in_c_equal_the_reference(tmp_path):
    int8, names = _tiny_mixed()
    spec, arrays = to_integer(int8, mean=MEAN, std=STD, image_size=32, max_shift=8,
                              four_bit=names)
    write_integer(tmp_path, spec, arrays)
    cdir = emit_c(tmp_path)
    weights_h = (cdir / "qlab_weights.h").read_text()
    assert "uint8_t qlab_conv2_dw_weight4[36]" in weights_h  # 8 x 9 weights, two per byte
    summary = json.loads((cdir / "summary.json").read_text())
    assert [r["weight_bits"] for r in summary["layers"]] == [8, 4, 8, 4, 8, 4]
    # one block at a time: dw 1 x 3 x 3 (one channel per group), g 4 x 3 x 3 (6 channels per
    # group, one at a time), fc a row of 48
    assert summary["scratch_bytes"] == max(9, 36, 48)
    header = (cdir / "qlab_model.h").read_text()
    assert f"#define QLAB_SCRATCH_BYTES {summary['scratch_bytes']}" in header
    # the same model with every weight unpacked to int8 costs the packed bytes twice over
    unpacked = IntegerModel.load(tmp_path)
    four = sum(unpacked.arrays[f"{n}.weight"].size for n in names)
    spec8 = copy.deepcopy(spec)
    for op in spec8["ops"]:
        op.pop("weight_bits", None)
    spec8["version"] = 1
    (tmp_path / "eight").mkdir()
    write_integer(tmp_path / "eight", spec8, unpacked.arrays)
    summary8 = json.loads((emit_c(tmp_path / "eight") / "summary.json").read_text())
    assert summary8["weight_bytes"] - summary["weight_bytes"] == four - sum(
        (unpacked.arrays[f"{n}.weight"].size + 1) // 2 for n in names)
    binary = build_c(cdir, cflags="-std=c99 -Wall -Wextra -Werror -O2 -Wconversion "
                                  "-Wsign-conversion -pedantic")
    pixels = _pixels(24, seed=8)
    codes, _ = IntegerModel.load(tmp_path).run(pixels)
    with torch.inference_mode():
        assert torch.equal(IntegerModel.load(tmp_path).dequantize(codes),
                           int8(_normalized(pixels)).double())
    np.testing.assert_array_equal(run_c(binary, pixels), codes.numpy())
    assert CC is not None


def test_loader_refuses_damaged_4bit_weights(tmp_path):
    int8, names = _tiny_mixed()
    spec, arrays = to_integer(int8, mean=MEAN, std=STD, image_size=32, four_bit=names)

    def load(spec_, arrays_):
        write_integer(tmp_path, spec_, arrays_)
        return IntegerModel.load(tmp_path)

    load(spec, arrays)
    short = dict(arrays, **{"g.weight": arrays["g.weight"][:-1]})
    with pytest.raises(QlabError, match=r"'g.weight' \(the 4-bit weight of op 'g'\) is uint8 "
                                        r"\[215\], not the uint8 \[216\]"):
        load(spec, short)
    with pytest.raises(QlabError, match="op 'g' has 4-bit weights, but its values reach"):
        load(spec, dict(arrays, **{"g.weight": np.full((12, 4, 3, 3), 9, dtype=np.int8)}))
    old = copy.deepcopy(spec) | {"version": 1}
    with pytest.raises(QlabError, match="format version 1 does not have"):
        load(old, arrays)
    bad = copy.deepcopy(spec)
    next(op for op in bad["ops"] if op["name"] == "fc")["weight_bits"] = 2
    with pytest.raises(QlabError, match=r"weight_bits=2; only a conv or linear has it"):
        load(bad, arrays)


def test_four_bit_names_follow_the_fused_model():
    model = build_resnet20(num_classes=10).eval()
    model.fuse_model(is_qat=False)
    names = weighted_ops(model)
    assert four_bit(8, model) == [] and four_bit(4, model) == names
    assert four_bit({"default": 4, "conv1": 8, "fc": 8}, model) == names[1:-1]


R20 = ["model=resnet20", "data=synthetic", "data.num_train=160", "data.num_test=64",
       "data.batch_size=32", "data.eval_batch_size=64", "trainer.max_epochs=1",
       "trainer.enable_progress_bar=false", "bench.runs=5", "bench.warmup=1",
       "bench.inductor=false", "export.pt2=false", "export.onnx=false",
       "quant.calib_batches=2", "quant.per_channel=true"]


def test_each_flow_says_which_mixed_options_it_takes():
    from qlab.quant.flows import FLOWS, get_flow
    from qlab.stages.mixed import check_mixed

    def quant(flow, **over):
        return OmegaConf.create({"flow": flow, "float_layers": [], "weight_bits": 8,
                                 "mixed": {"max_drop": None, "size_mb": None}} | over)

    takes = {name: (get_flow(name).float_islands, get_flow(name).mixed_bits) for name in FLOWS}
    assert takes == {"eager": (True, True), "pt2e": (True, False), "ort": (False, False)}
    for name, (islands, bits) in takes.items():
        flow = get_flow(name)
        check_mixed(quant(name), flow)  # plain 8-bit: every flow
        for ok, option in ((islands, {"float_layers": ["fc"]}),
                           (bits, {"weight_bits": {"fc": 4}}),
                           (bits, {"mixed": {"max_drop": 0.5, "size_mb": None}}),
                           (bits, {"mixed": {"max_drop": None, "size_mb": 1.0}})):
            if ok:
                check_mixed(quant(name, **option), flow)
                continue
            with pytest.raises(QlabError, match=f"quant.flow={name}") as err:
                check_mixed(quant(name, **option), flow)
            assert "quant.flow=eager" in str(err.value)  # names a flow that takes it
    with pytest.raises(QlabError, match="run one"):
        check_mixed(quant("eager", mixed={"max_drop": 0.5, "size_mb": 1.0}), get_flow("eager"))
    for key, bad in (("images", 0), ("rank_images", -5), ("images", 2.5), ("rank_images", True)):
        with pytest.raises(QlabError, match=f"quant.mixed.{key}=.*>= 1 \\(null: all of them\\)"):
            check_mixed(quant("eager", mixed={"max_drop": 0.5, "size_mb": None, key: bad}),
                        get_flow("eager"))
    check_mixed(quant("eager", mixed={"max_drop": 0.5, "size_mb": None, "images": None,
                                      "rank_images": 200}), get_flow("eager"))


@pytest.mark.slow
def test_weight_bits_and_size_target_through_the_cli(tmp_path):
    run_cli("train.py", "stage=fp32", "name=m", *R20, outputs=tmp_path)
    run_cli("quantize.py", "stage=ptq", "name=m", *R20, outputs=tmp_path)
    all8 = read_metrics(tmp_path / "m" / "ptq" / "metrics.json")
    assert all8["size_mb"] == all8["file_mb"] and "weight_bits" not in all8["int8"]
    run_cli("quantize.py", "stage=ptq", "name=m", "tag=-w4", "quant.weight_bits=4", *R20,
            outputs=tmp_path)
    w4 = read_metrics(tmp_path / "m" / "ptq-w4" / "metrics.json")
    bits = w4["int8"]["weight_bits"]
    assert len(bits["4"]) == 22 and bits["8"] == [] and w4["int8"]["weight_max"] <= 8
    assert w4["file_mb"] == pytest.approx(all8["file_mb"], abs=1e-3)  # int8 holders in torch
    assert w4["size_mb"] == pytest.approx(w4["file_mb"] - bits["packed_saving_bytes"] / 1e6)
    assert bits["weights_4bit"] == 270896  # every ResNet-20 weight

    # automatic: the cheapest ops per byte go 4-bit until the size target is met
    target = round(all8["size_mb"] * 0.7, 4)
    run_cli("quantize.py", "stage=ptq", "name=m", "tag=-mix", f"quant.mixed.size_mb={target}",
            "quant.mixed.images=32", *R20, outputs=tmp_path)
    mix = read_metrics(tmp_path / "m" / "ptq-mix" / "metrics.json")
    chosen = mix["mixed_bits"]
    assert chosen["met"] and mix["size_mb"] <= target and mix["size_mb"] == pytest.approx(
        chosen["size_mb"])
    assert chosen["all_int8_size_mb"] == pytest.approx(all8["size_mb"])
    ranked = [r["name"] for r in chosen["ranking"]]
    assert len(ranked) == 22 and chosen["weight_bits_4"] == ranked[:len(chosen["weight_bits_4"])]
    assert sorted(mix["int8"]["weight_bits"]["4"]) == sorted(chosen["weight_bits_4"])
    assert mix["quant"]["weight_bits"] == dict.fromkeys(chosen["weight_bits_4"], 4)
    # one fewer 4-bit op would not have met the target: the greedy stops at the first fit
    last = chosen["ranking"][len(chosen["weight_bits_4"]) - 1]
    assert mix["size_mb"] + last["saving_bytes"] / 1e6 > target
    assert chosen["val_images"] == 16 and chosen["fp32_val_accuracy"] - chosen[
        "val_accuracy"] == pytest.approx(chosen["val_drop"])

    # its integer model: packed, bit-exact, with a C build where a compiler exists
    run_cli("quantize.py", "stage=integer", "name=m", "from=ptq-mix", "integer.limit_images=16",
            *R20, *(["integer.emit=c"] if CC else []), outputs=tmp_path)
    verify = json.loads((tmp_path / "m" / "ptq-mix" / "integer" / "verify.json").read_text())
    assert verify["identical_logits_fraction"] == 1.0
    if CC:
        assert verify["c"]["identical_fraction"] == 1.0 and verify["c"]["weight_bytes"] < 274840
    model_json = json.loads((tmp_path / "m" / "ptq-mix" / "integer" / "model.json").read_text())
    assert model_json["version"] == 2

    # QAT takes the same mapping; the other flows refuse 4-bit weights
    mapping = "{" + ",".join(f"{n}:4" for n in chosen["weight_bits_4"]) + "}"
    run_cli("train.py", "stage=qat", "name=m", "tag=-mix", f"quant.weight_bits={mapping}",
            "quant.qat.limit_train_batches=2", *R20, outputs=tmp_path)
    qat = read_metrics(tmp_path / "m" / "qat-mix" / "metrics.json")
    assert sorted(qat["int8"]["weight_bits"]["4"]) == sorted(chosen["weight_bits_4"])
    assert qat["size_mb"] == pytest.approx(mix["size_mb"], abs=2e-3)
    proc = run_cli("quantize.py", "stage=ptq", "name=m", "tag=-x", "quant.flow=pt2e",
                   "quant.weight_bits=4", *R20, outputs=tmp_path, check=False)
    assert proc.returncode == 2
    assert "quant.weight_bits does not work with quant.flow=pt2e; use quant.flow=eager" in proc.stderr
    proc = run_cli("train.py", "stage=qat", "name=m", "tag=-y", "quant.mixed.size_mb=0.1", *R20,
                   outputs=tmp_path, check=False)
    assert proc.returncode == 2 and "quant.weight_bits={op: 4, ...}" in proc.stderr


def test_the_report_names_what_is_not_8_bit():
    from qlab.stages.report import precision, precision_notes

    plain = {"int8": {"float_layers": []}, "size_mb": 2.0}
    mixed = {"int8": {"weight_bits": {"4": ["layers.2.conv1", "fc"], "8": ["conv1"]},
                      "float_layers": []}, "size_mb": 1.25, "file_mb": 2.0}
    all4 = {"int8": {"weight_bits": {"4": ["conv1", "fc"], "8": []}}, "size_mb": 1.0,
            "file_mb": 2.0}
    island = {"int8": {"float_layers": ["fc"]}, "size_mb": 2.1}
    assert precision(plain) is None and precision({"size_mb": 7.9}) is None  # FP32: no int8
    assert precision(mixed) == "2 of 3 conv/linear ops with 4-bit weights"
    assert precision(all4) == "4-bit weights" and precision(island) == "1 float op(s)"
    notes = precision_notes({"ptq": plain, "ptq-mix": mixed, "ptq-fl": island})
    assert notes == [
        "- ptq-mix: 2 of 3 conv/linear ops with 4-bit weights (layers.2.conv1, fc); size "
        "1.250 MB with them packed, 2.000 MB as torch stores them.",
        "- ptq-fl: 1 float op(s); in float: fc."]
