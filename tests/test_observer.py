import math

import pytest
import torch
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from qlab.quant.observer import (
    Po2MinMaxObserver,
    Po2MovingAverageMinMaxObserver,
    Po2PerChannelMinMaxObserver,
    po2_exponent,
    scale_approximate,
)
from qlab.quant.scales import is_power_of_two

AFFINE = dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
SYM = dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)


def qparams(obs, x):
    obs(x)
    s, z = obs.calculate_qparams()
    return s.item(), z.item()


def test_affine_by_hand_nearest_and_ceil():
    x = torch.tensor([-1.0, 0.5, 3.0])
    # raw scale 4/255 = 0.01569 = 2^-5.994: nearest -> 2^-6, ceil -> 2^-5
    s, z = qparams(Po2MinMaxObserver(**AFFINE), x)
    assert s == 2.0**-6 and z == 64  # zp recomputed from the po2 scale: 0 - round(-1 / 2^-6)
    s, z = qparams(Po2MinMaxObserver(**AFFINE, rounding="ceil"), x)
    assert s == 2.0**-5 and z == 32


def test_symmetric_by_hand():
    x = torch.tensor([-0.5, 0.25])
    # raw scale 0.5 / 127 = 0.003937 = 2^-7.989 -> 2^-8 (rounded down: 0.5 clips to 127 * 2^-8)
    s, z = qparams(Po2MinMaxObserver(**SYM), x)
    assert s == 2.0**-8 and z == 0
    s, z = qparams(Po2MinMaxObserver(**SYM, rounding="ceil", max_shift=10), x)
    assert s == 2.0**-7 and z == 0


def test_max_shift_clamps_both_ends():
    tiny = torch.tensor([-1e-5, 1e-5])  # raw 7.9e-8 = 2^-23.6
    assert qparams(Po2MinMaxObserver(**SYM), tiny)[0] == 2.0**-8
    assert qparams(Po2MinMaxObserver(**SYM, max_shift=4), tiny)[0] == 2.0**-4
    huge = torch.tensor([0.0, 1e5])  # raw 392 = 2^8.6
    assert qparams(Po2MinMaxObserver(**AFFINE), huge)[0] == 2.0**8
    obs = Po2MinMaxObserver(**AFFINE)
    obs(huge)
    p = obs.po2_qparams(obs.min_val, obs.max_val)
    assert p["unclamped_exponent"].item() == 9 and p["exponent"].item() == 8


def test_matches_torch_minmax_where_no_rounding_applies():
    # ranges whose standard scale already is a power of two: po2 must change nothing
    for lo, hi in [(-8.0, 23.875), (0.0, 255 * 2.0**-4), (-1.0, 255 * 2.0**-7 - 1.0)]:
        x = torch.linspace(lo, hi, 101)
        ref, mine = MinMaxObserver(**AFFINE), Po2MinMaxObserver(**AFFINE)
        assert qparams(ref, x) == qparams(mine, x)
    w = torch.randn(4, 3, 3, 3)
    w[0].mul_(0), w[0, 0, 0, 0].fill_(3.0)
    w[1].clamp_(-0.1, 0.1), w[1, 0, 0, 0].fill_(-6.0)
    ref = PerChannelMinMaxObserver(dtype=torch.quint8, qscheme=torch.per_channel_affine)
    mine = Po2PerChannelMinMaxObserver(dtype=torch.quint8, qscheme=torch.per_channel_affine,
                                       max_shift=30)
    ref(w), mine(w)
    rs, rz = ref.calculate_qparams()
    ms, mz = mine.calculate_qparams()
    assert is_power_of_two(ms)
    # wherever torch's scale is already 2^n the two agree exactly
    exact = torch.tensor([is_power_of_two(s.reshape(1)) for s in rs])
    torch.testing.assert_close(ms[exact], rs[exact].float())
    assert torch.equal(mz[exact], rz[exact])
    # and everywhere po2 is within a factor sqrt(2) of torch's scale (nearest rounding)
    ratio = (ms / rs).log2().abs()
    assert (ratio <= 0.5 + 1e-6).all()


def test_symmetric_relation_to_torch():
    # torch divides max|x| by (qmax - qmin) / 2 = 127.5; the standard formula here is max|x| / 127
    x = torch.tensor([-127 * 2.0**-5, 1.0])
    ref = MinMaxObserver(**SYM)
    ref(x)
    mine = Po2MinMaxObserver(**SYM, max_shift=8)
    mine(x)
    raw = mine.po2_qparams(mine.min_val, mine.max_val)["raw_scale"].item()
    assert raw == pytest.approx(2.0**-5) and mine.calculate_qparams()[0].item() == 2.0**-5
    assert ref.calculate_qparams()[0].item() == pytest.approx(127 * 2.0**-5 / 127.5)


@pytest.mark.parametrize("x", [torch.empty(0), torch.zeros(5, 5),
                               torch.tensor([float("nan"), 1.0, -2.0]),
                               torch.tensor([float("inf"), -float("inf"), 0.5])])
@pytest.mark.parametrize("cls,kw", [(Po2MinMaxObserver, AFFINE), (Po2MinMaxObserver, SYM),
                                    (Po2MovingAverageMinMaxObserver, AFFINE)])
def test_degenerate_inputs_give_finite_po2_scales(x, cls, kw):
    obs = cls(**kw)
    assert obs(x) is x
    s, z = obs.calculate_qparams()
    assert torch.isfinite(s).all() and (s > 0).all() and is_power_of_two(s)
    assert -8 <= math.log2(s.item()) <= 8


def test_nan_is_ignored_not_propagated():
    obs = Po2MinMaxObserver(**AFFINE)
    obs(torch.tensor([float("nan"), -1.0, 3.0]))
    assert qparams(obs, torch.tensor([0.0]))[0] == 2.0**-6


def test_exponent_helper_and_reference_function():
    n = po2_exponent(torch.tensor([0.123, 0.0, -1.0, float("nan"), 3.0, 1e9]), max_shift=8)
    assert n.tolist() == [-3, -8, -8, -8, 2, 8]
    assert scale_approximate(0.123) == 0.125
    assert scale_approximate(0.0) == 2.0**-8
    with pytest.raises(ValueError, match="nearest, ceil"):
        po2_exponent(torch.ones(1), rounding="floor")
    with pytest.raises(ValueError, match="nearest, ceil"):
        Po2MinMaxObserver(rounding="up")


def test_ceil_never_clips_nearest_can():
    torch.manual_seed(0)
    x = torch.randn(1000) * 3
    for rounding, may_clip in (("ceil", False), ("nearest", True)):
        obs = Po2MinMaxObserver(**SYM, rounding=rounding)
        obs(x)
        s, _ = obs.calculate_qparams()
        clipped = (x.abs().max() / s).item() > 127.5
        assert clipped == (may_clip and s.item() < x.abs().max().item() / 127)
