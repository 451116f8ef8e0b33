"""Several device pairs per weight (``chip.pairs.f``): aihwkit's ``NPairConductanceConverter``.

The mapping and its inverse against hand-computed conductances and against aihwkit 1.2.0 itself
(``benchmarks/aihwkit_pairs_reference.json``, written by its script in aihwkit's environment);
the relative device's weight-error std against its closed form ``sigma r sqrt(sum f^2) / sum f``;
PCM pairs each programmed, drifted and read with the device's noise, against closed-form moments
of PCM's formulas. Statistical checks: fixed seeds, 5 standard errors of the estimate (a correct
model fails with probability < 1e-6).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cimsim import AnalogConfig, ConfigError, convert_to_analog, program_chip, set_time
from cimsim.chip.devices.conductance import PairsConfig, from_pairs, to_pairs
from cimsim.chip.devices.pcm import PCMConfig, PCMWeights
from cimsim.chip.devices.pcm_model import drift_exponents, program
from cimsim.chip.noise import tensor_seed

REF = json.loads(
    (
        Path(__file__).resolve().parents[2] / "benchmarks" / "aihwkit_pairs_reference.json"
    ).read_text()
)
Z = 5.0  # standard errors
# The sample std's standard error is std sqrt((kappa - 1) / (4 n)) for kurtosis kappa: 1 /
# sqrt(2 n) for a normal. PCM's sums mix normals with rectified normals (the idle devices) and
# lognormal drift factors (sigma L ~ 0.1), whose kurtosis stays within 3.9: 1.2 / sqrt(2 n).
KURTOSIS = 1.2


# ----------------------------------------------------------------------------- the converter


def test_two_pairs_by_hand():
    """f = [1, 3], g_max = 25, max|W| = 1: s = (1 + 3) * 25 / 1 = 100 uS per unit. s W = 10 fits
    in pair 1; 25 fills it; 40 fills it and puts (40 - 25) / 3 = 5 on pair 2; -60 puts 25 on
    G-_1 and 35 / 3 on G-_2; 100 fills both."""
    w = torch.tensor([0.0, 0.1, 0.25, 0.4, -0.6, 1.0], dtype=torch.float64)
    g, s = to_pairs(w, 25.0, (1.0, 3.0))
    assert s.item() == pytest.approx(100.0)
    expected = [
        [0, 10, 25, 25, 0, 25],  # G+_1
        [0, 0, 0, 0, 25, 0],  # G-_1
        [0, 0, 0, 5, 0, 25],  # G+_2
        [0, 0, 0, 0, 35 / 3, 0],  # G-_2
    ]
    for gi, ei in zip(g, expected, strict=True):
        torch.testing.assert_close(gi, torch.tensor(ei, dtype=torch.float64))
    torch.testing.assert_close(from_pairs(g, s, (1.0, 3.0)), w)


def test_pairs_fill_in_list_order_as_aihwkit():
    """f = [3, 1] (aihwkit's code fills in list order whatever its docstring's "lowest to
    highest"): s = 100; s W = 40 puts min(40 / 3, 25) = 13.33 on the first pair, nothing on the
    second; 90 puts 25 (75 uS) on it and 15 on the second."""
    w = torch.tensor([0.4, 0.9, 1.0], dtype=torch.float64)
    g, s = to_pairs(w, 25.0, (3.0, 1.0))
    torch.testing.assert_close(g[0], torch.tensor([40 / 3, 25, 25], dtype=torch.float64))
    torch.testing.assert_close(g[2], torch.tensor([0, 15, 25], dtype=torch.float64))


@pytest.mark.parametrize("which", ["hand", "random"])
def test_the_converter_matches_aihwkit(which):
    """Every conductance, the scale and the weights read back, as aihwkit 1.2.0 computed them."""
    if which == "hand":
        w = torch.tensor(REF["hand"], dtype=torch.float64)
    else:
        spec = REF["random"]
        gen = torch.Generator().manual_seed(spec["seed"])
        w = torch.randn(spec["shape"], generator=gen, dtype=torch.float64)
        assert hashlib.sha256(w.numpy().tobytes()).hexdigest() == spec["sha256"]
    for case in REF["cases"][which]:
        f = tuple(case["f"])
        g, s = to_pairs(w, REF["g_max"], f)
        assert s.item() == pytest.approx(case["scale_ratio"], rel=1e-12)
        assert len(g) == len(case["conductances"]) == 2 * len(f)
        for gi, ref in zip(g, case["conductances"], strict=True):
            torch.testing.assert_close(gi, torch.tensor(ref, dtype=torch.float64))
        back = torch.tensor(case["back"], dtype=torch.float64)
        torch.testing.assert_close(from_pairs(g, s, f), back)
        torch.testing.assert_close(back, w)  # the inverse is exact on both sides


def test_tiles_map_their_own_range():
    """Each crossbar tile maps its own max|W| to every pair full."""
    w = torch.tensor([[0.5, 2.0, -0.25, 1.0]], dtype=torch.float64)
    tiles = [slice(0, 2), slice(2, 4)]
    g, s = to_pairs(w, 25.0, (1.0, 3.0), tiles)
    torch.testing.assert_close(s, torch.tensor([[50.0, 50.0, 100.0, 100.0]], dtype=torch.float64))
    assert g[2][0, 1].item() == g[2][0, 3].item() == 25.0  # both tiles' peaks fill pair 2
    torch.testing.assert_close(from_pairs(g, s, (1.0, 3.0)), w)


def test_f_is_validated_more_strictly_than_aihwkit():
    """aihwkit refuses only a non-list and an all-negative f_lst (``max(f_lst) < 0``), and an
    empty one by accident (``max([])``); [1, 0] divides by zero and [1, -1] maps nonsense there.
    cimsim refuses every f that is not a non-empty list of finite numbers > 0, naming pairs.f."""
    accepted = {tuple(c["f"]): c["refusal"] is None for c in REF["f_checks"]}
    assert accepted[(1.0, 0.0)] and accepted[(1.0, -1.0)] and not accepted[(-1.0, -2.0)]
    for bad in ([1.0, 0.0], [1.0, -1.0], [-1.0, -2.0], [], [1.0, float("inf")], "13", 3, [True]):
        with pytest.raises(ConfigError, match=r"^pairs\.f="):
            AnalogConfig(pairs={"f": bad})
    assert PairsConfig(f=[1, 3]) == PairsConfig(f=(1.0, 3.0))  # any sequence, as floats


def test_one_pair_is_the_default_and_leaves_the_record_unchanged():
    chip = AnalogConfig(sigma=0.05)
    assert chip.pairs.f == (1.0,) and "pairs" not in chip.as_dict()
    assert AnalogConfig(sigma=0.05, pairs={"f": [1]}) == chip
    two = AnalogConfig(sigma=0.05, pairs={"f": [1, 3]})
    assert two.as_dict()["pairs"] == {"f": (1.0, 3.0)} and AnalogConfig(**two.as_dict()) == two


# ----------------------------------------------------------------------------- relative device


def _chip_weights(config: AnalogConfig, shape=(300, 200), seed=3, train=False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))
    w = net[0].weight.detach().clone()
    model = convert_to_analog(net, config)
    if train:
        model.train()
    else:
        model.eval()
        program_chip(model, seed)
    with torch.no_grad():
        return w, model(torch.eye(shape[1])).t()


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
@pytest.mark.parametrize("f", [(1.0,), (1.0, 3.0), (1.0, 1.0, 1.0, 1.0), (0.5, 2.0, 4.0)])
@pytest.mark.parametrize("train", [False, True])
def test_relative_weight_error_std_is_the_closed_form(f, distribution, train):
    """Pair k carries the relative error in its share f_k / F of the range: the weight error
    has std ``sigma r sqrt(sum f_k^2) / F`` and mean ``mu r`` (r = max|W| under abs_max). n = 60
    000 weights: the sample std's standard error is std / sqrt(2 n) (Gaussian; the uniform
    sum's kurtosis is smaller), the mean's std / sqrt(n)."""
    sigma, mu = 0.1, 0.02
    config = AnalogConfig(
        sigma=sigma, mean_shift=mu, scale="abs_max", distribution=distribution, pairs={"f": f}
    )
    w, chip = _chip_weights(config, train=train)
    r = w.abs().max().item()
    err = ((chip - w) / r).double().flatten()
    std = sigma * math.sqrt(sum(x * x for x in f)) / sum(f)
    n = err.numel()
    assert err.std().item() == pytest.approx(std, abs=Z * std / math.sqrt(2 * n))
    assert err.mean().item() == pytest.approx(mu, abs=Z * std / math.sqrt(n))


def test_relative_pairs_draw_independently_per_pair_and_per_chip():
    """Pair 1 keeps the chip's draws of one pair (the same chip seed), the other pairs' draws
    are new: the error of f = [1, 1] is (eps_1 + eps_2) / 2, so its correlation with f = [1]'s
    eps_1 is 1 / sqrt(2)."""
    one = AnalogConfig(sigma=0.1, scale="abs_max")
    w, a = _chip_weights(one)
    _, b = _chip_weights(AnalogConfig(sigma=0.1, scale="abs_max", pairs={"f": [1, 1]}))
    ea, eb = (a - w).flatten().double(), (b - w).flatten().double()
    rho = torch.corrcoef(torch.stack([ea, eb]))[0, 1].item()
    assert rho == pytest.approx(1 / math.sqrt(2), abs=Z / math.sqrt(ea.numel()))
    _, again = _chip_weights(AnalogConfig(sigma=0.1, scale="abs_max", pairs={"f": [1, 1]}))
    assert torch.equal(again, b)


# ----------------------------------------------------------------------------- PCM


def _pcm_pairs(**pcm) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PCM on f = [1, 3], g_max = 25: one weight at max|W| = 1 fixes s = 100 uS; the others at
    0.5 put 25 uS on G+_1 and 25 / 3 on G+_2, the G- at 0. Read at 1 year, uncompensated."""
    n = 100_000
    w = torch.full((1, n), 0.5, dtype=torch.float64)
    w[0, 0] = 1.0
    cfg = AnalogConfig(device="pcm", pairs={"f": [1, 3]}, pcm={"drift_compensation": "none", **pcm})
    net = nn.Sequential(nn.Linear(n, 1, bias=False).double())
    net[0].weight.data.copy_(w)
    model = convert_to_analog(net, cfg).eval()
    program_chip(model, 5)
    set_time(model, 31_536_000.0)
    return model[0].chip_read_weight[0, 1:] * 100.0, 31_536_000.0 + 20.0, 20.0  # in uS


def prog_sigma(r: float) -> float:
    """PCM's programming-noise std (uS) at g_max = 25, written out."""
    return 0.26348 + 1.9650 * r - 1.1731 * r * r


def test_pcm_pairs_each_take_programming_noise():
    """No drift, no read noise: s W = 25 (G+_1) + 3 * 25/3 (G+_2) = 50 uS, each device with
    its programming noise; the two idle G- at max(0.26348 xi, 0) (a rectified normal: mean
    s0 / sqrt(2 pi), variance s0^2 (1/2 - 1/(2 pi)))."""
    got, _, _ = _pcm_pairs(drift_scale=0.0, read_noise_scale=0.0)
    s0, s1, s3 = prog_sigma(0.0), prog_sigma(1.0), prog_sigma(1 / 3)
    r_mean, r_var = s0 / math.sqrt(2 * math.pi), s0**2 * (0.5 - 1 / (2 * math.pi))
    mean = 50.0 - (1 + 3) * r_mean
    std = math.sqrt(s1**2 + r_var + 9 * (s3**2 + r_var))
    n = got.numel()
    assert got.mean().item() == pytest.approx(mean, abs=Z * std / math.sqrt(n))
    assert got.std().item() == pytest.approx(std, rel=Z * KURTOSIS / math.sqrt(2 * n))


def test_pcm_pairs_each_drift():
    """No programming or read noise: G = g_T (t / t0)^(-nu) per device; at r = 1 and r = 1/3 PCM's
    exponent is N(0.049, 0.008^2) (both clipped to the same mu and sigma; its fold at 0 is 6
    sigma away): E[D] = exp(-mu L + s^2 L^2 / 2), E[D^2] = exp(-2 mu L + 2 s^2 L^2) with
    L = ln(t / t0); both pairs hold 25 uS of weight: s W = 25 (D_1 + D_2)."""
    got, t, t0 = _pcm_pairs(prog_noise_scale=0.0, read_noise_scale=0.0)
    L, mu, s = math.log(t / t0), 0.049, 0.008
    m1 = math.exp(-mu * L + s * s * L * L / 2)
    m2 = math.exp(-2 * mu * L + 2 * s * s * L * L)
    mean, std = 50.0 * m1, 25.0 * math.sqrt(2 * (m2 - m1 * m1))
    n = got.numel()
    assert got.mean().item() == pytest.approx(mean, abs=Z * std / math.sqrt(n))
    assert got.std().item() == pytest.approx(std, rel=Z * KURTOSIS / math.sqrt(2 * n))


def test_pcm_pairs_each_take_read_noise():
    """No programming noise, no drift: each device's 1/f read noise, ``g Q sqrt(ln((t +
    t_read) / (2 t_read))) xi`` with ``Q = min(0.0088 / r^0.65, 0.2)``: r = 1 and r = 1/3."""
    got, t, _ = _pcm_pairs(prog_noise_scale=0.0, drift_scale=0.0)
    spread = math.sqrt(math.log((t + 250e-9) / (2 * 250e-9)))
    q1, q3 = 0.0088, min(0.0088 / (1 / 3) ** 0.65, 0.2)
    std = spread * math.sqrt((25.0 * q1) ** 2 + (3 * 25 / 3 * q3) ** 2)
    n = got.numel()
    assert got.mean().item() == pytest.approx(50.0, abs=Z * std / math.sqrt(n))
    assert got.std().item() == pytest.approx(std, rel=Z * KURTOSIS / math.sqrt(2 * n))


def test_one_pair_pcm_chip_is_unchanged_by_the_converter():
    """f = [1] is the single pair PCM always had: the same programmed conductances."""
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    chip = PCMWeights(w, PCMConfig(drift_compensation="none"), 4, "w")
    s = 25.0 / w.abs().max()
    gen = torch.Generator().manual_seed(tensor_seed(4, "w"))
    plus, minus = (w * s).clamp(0, 25), (-w * s).clamp(0, 25)
    progs = [program(plus, PCMConfig(), gen), program(minus, PCMConfig(), gen)]
    nus = [drift_exponents(plus, PCMConfig(), gen), drift_exponents(minus, PCMConfig(), gen)]
    for a, b in zip(chip.pair.g + chip.pair.nu, progs + nus, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
