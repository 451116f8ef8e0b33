"""The PCM device model (cimsim.chip.devices.pcm) against the formulas of issue #11 / aihwkit's
``PCMLikeNoiseModel``: moments of programming noise, drift exponents and read noise; exactness
without noise; mean drift; drift compensation; seeding of chips and read repetitions.

Expected values are computed independently, in numpy/scipy closed forms (clipped and folded
normal moments, numerical integrals), never with the functions under test. Statistical checks use
fixed seeds and 5 standard errors of the estimate: a correct model fails with probability
< 1e-6, while a wrong constant, a wrong conductance in a formula or a missing clip fails.

Over 350 lines: one closed-form moment check per formula of the PCM model.
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import norm

from cimsim import ConfigError
from cimsim.chip.devices.pcm import (
    PCMConfig,
    PCMWeights,
    drift_exponents,
    from_conductances,
    pcm_training_perturbation,
    program,
    read,
    to_conductances,
)

N = 200_000  # samples per statistical check: SE of a mean is 0.22 % of the std
HOUR, YEAR = 3600.0, 31_536_000.0
EPS32 = torch.finfo(torch.float32).eps


# ---- independent references (numpy / scipy) -------------------------------------------------


def prog_sigma(r: float, g_max: float = 25.0, scale: float = 1.0) -> float:
    """Programming-noise std (uS) of issue #11: polynomial fitted at g_max = 25 uS."""
    return (0.26348 + 1.9650 * r - 1.1731 * r**2) * g_max / 25.0 * scale


def drift_params(r: float) -> tuple[float, float]:
    """(mu_nu, sigma_nu) of issue #11, with r' = max(r, 1e-7)."""
    lr = math.log(max(r, 1e-7))
    return (
        float(np.clip(-0.0155 * lr + 0.0244, 0.049, 0.1)),
        float(np.clip(-0.0125 * lr - 0.0059, 0.008, 0.045)),
    )


def clipped_normal(mu: float, s: float) -> tuple[float, float]:
    """Mean and std of max(X, 0), X ~ N(mu, s^2)."""
    if s == 0:
        return max(mu, 0.0), 0.0
    a = mu / s
    m1 = mu * norm.cdf(a) + s * norm.pdf(a)
    m2 = (mu**2 + s**2) * norm.cdf(a) + mu * s * norm.pdf(a)
    return m1, math.sqrt(max(m2 - m1**2, 0.0))


def folded_normal(mu: float, s: float) -> tuple[float, float]:
    """Mean and std of |X|, X ~ N(mu, s^2)."""
    m1 = s * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * s**2)) + mu * (
        1 - 2 * norm.cdf(-mu / s)
    )
    return m1, math.sqrt(mu**2 + s**2 - m1**2)


def expected_decay(r: float, t_inference: float, t0: float = 20.0) -> float:
    """E[(t / t0)^(-nu)], nu = |mu + sigma Z|, by quadrature over the normal density."""
    mu, s = drift_params(r)
    log_ratio = math.log((t_inference + t0) / t0)

    def integrand(z):
        return math.exp(-abs(mu + s * z) * log_ratio) * norm.pdf(z)

    kink = -mu / s
    return quad(integrand, -np.inf, kink)[0] + quad(integrand, kink, np.inf)[0]


def read_spread(t_inference: float, t0: float = 20.0, t_read: float = 250e-9) -> float:
    """sqrt(ln((t + t_read) / (2 t_read))), t = t_inference + t0."""
    t = t_inference + t0
    return math.sqrt(math.log((t + t_read) / (2 * t_read)))


def check_moments(x: torch.Tensor, mean: float, std: float):
    """Sample mean within 5 SE (true std / sqrt n); sample std within 5 SE of a std, estimated
    from the sample's fourth central moment (the clipped distributions are not normal)."""
    x = x.double().flatten()
    n = x.numel()
    m, sd = x.mean().item(), x.std().item()
    assert abs(m - mean) < 5 * std / math.sqrt(n), (m, mean)
    m4 = ((x - m) ** 4).mean().item()
    se_std = math.sqrt(max(m4 - sd**4, 0.0) / (4 * n)) / sd
    assert abs(sd - std) < 5 * se_std, (sd, std)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def half_weights(n: int = N, dtype=torch.float32) -> torch.Tensor:
    """n + 1 weights: one 1.0 (fixes the scale, s = g_max) and n at 0.5 (G+ = 12.5 uS, G- = 0)."""
    w = torch.full((n + 1,), 0.5, dtype=dtype)
    w[0] = 1.0
    return w


# ---- the device formulas -----------------------------------------------------------------------


def test_conductance_mapping():
    w = torch.tensor([[-2.0, 0.0, 1.0], [0.5, -0.25, 2.0]])
    g_plus, g_minus, scale = to_conductances(w, 25.0)
    assert scale.item() == 12.5
    assert torch.equal(g_plus, torch.tensor([[0.0, 0.0, 12.5], [6.25, 0.0, 25.0]]))
    assert torch.equal(g_minus, torch.tensor([[25.0, 0.0, 0.0], [0.0, 3.125, 0.0]]))
    assert torch.equal(from_conductances(g_plus, g_minus, scale), w)
    zeros = torch.zeros(3, 2)  # max|W| = 0 is floored: no division by zero
    assert torch.equal(from_conductances(*to_conductances(zeros, 25.0)), zeros)


@pytest.mark.parametrize(
    "r, g_max, scale",
    [(0.0, 25.0, 1.0), (1e-3, 25.0, 1.0), (0.05, 25.0, 1.0), (0.5, 25.0, 1.0), (1.0, 25.0, 1.0),
     (0.0, 10.0, 2.0), (0.3, 10.0, 2.0)],
)  # fmt: skip
def test_programming_noise_moments(r, g_max, scale):
    """Near r = 0 half the draws clip at 0 (the clipped-normal mean is the bias toward 0); at
    r = 1 the std is 1.055 uS; g_max != 25 rescales the polynomial by g_max / 25."""
    cfg = PCMConfig(g_max=g_max, prog_noise_scale=scale)
    g_p = program(torch.full((N,), r * g_max), cfg, gen(1))
    check_moments(g_p, *clipped_normal(r * g_max, prog_sigma(r, g_max, scale)))
    assert g_p.min().item() >= 0.0


@pytest.mark.parametrize(
    "r, drift_scale",
    [(0.0, 1.0), (1e-3, 1.0), (0.05, 1.0), (0.3, 1.0), (1.0, 1.0), (0.05, 2.5)],
)
def test_drift_exponent_moments(r, drift_scale):
    """r = 0 and 1e-3: mu and sigma clipped at their maxima (0.1, 0.045); r = 0.05: inside both
    ranges; r = 0.3: mu clipped at 0.049; r = 1: both clipped at their minima (0.049, 0.008)."""
    cfg = PCMConfig(drift_scale=drift_scale)
    nu = drift_exponents(torch.full((N,), r * 25.0), cfg, gen(2))
    mean, std = folded_normal(*drift_params(r))
    check_moments(nu, drift_scale * mean, drift_scale * std)


@pytest.mark.parametrize("t_inference", [0.0, HOUR, YEAR])
def test_read_noise_moments_large_conductance(t_inference):
    """g_p = 20 uS, nu = 0.05: mean g_d = g_p (t/t0)^-0.05 and std |g_d| Q(g_p) sqrt(ln(...)),
    with Q from the programmed (not drifted) conductance; clipping at 0 is > 15 std away. Read
    noise is there at t_inference = 0."""
    cfg = PCMConfig()
    g_p, nu = 20.0, 0.05
    g_d = g_p * ((t_inference + 20.0) / 20.0) ** (-nu)
    q = min(0.0088 / max((g_p / 25.0) ** 0.65, 1e-3), 0.2)
    g = read(torch.full((N,), g_p), torch.full((N,), nu), t_inference, cfg, gen(3))
    check_moments(g, g_d, g_d * q * read_spread(t_inference))


def test_read_noise_small_conductance_is_capped_and_clipped():
    """r = 1e-3: Q = 0.0088 / r^0.65 = 0.78 is capped at 0.2, and the std (0.95 g_d at 1 h)
    makes the clip at 0 matter: clipped-normal moments."""
    cfg = PCMConfig(read_noise_scale=1.0)
    g_p, nu = 0.025, 0.05
    g_d = g_p * ((HOUR + 20.0) / 20.0) ** (-nu)
    g = read(torch.full((N,), g_p), torch.full((N,), nu), HOUR, cfg, gen(4))
    check_moments(g, *clipped_normal(g_d, g_d * 0.2 * read_spread(HOUR)))


# ---- a chip over time --------------------------------------------------------------------------

TIMES = [0.0, 60.0, HOUR, 86_400.0, 2_592_000.0, YEAR]


def conv_weight(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(16, 8, 3, 3, generator=gen(5), dtype=dtype)


@pytest.mark.parametrize("compensation", ["none", "global", "per_channel"])
def test_without_drift_and_read_noise_the_chip_stays_programmed(compensation):
    w = conv_weight()
    cfg = PCMConfig(drift_scale=0.0, read_noise_scale=0.0, drift_compensation=compensation)
    chip = PCMWeights(w, cfg, seed=3, name="conv.weight")
    assert not torch.allclose(chip.programmed_weights, w, atol=1e-3)  # programming noise is on
    for t in TIMES:
        assert torch.equal(chip.weights_at(t), chip.programmed_weights)


def test_without_any_noise_the_chip_is_the_digital_weights():
    """Only round-off of the mapping remains: W -> s W -> (s W) / s is two float32 roundings,
    each within half an ulp, so |error| <= 2^-23 |W| = eps |W|; 2 eps leaves a margin."""
    w = conv_weight()
    cfg = PCMConfig(prog_noise_scale=0.0, drift_scale=0.0, read_noise_scale=0.0)
    chip = PCMWeights(w, cfg, seed=3, name="conv.weight")
    for t in TIMES:
        torch.testing.assert_close(chip.weights_at(t), w, rtol=2 * EPS32, atol=0.0)


@pytest.mark.parametrize("prog_noise_scale", [0.0, 1.0])
def test_mean_drift_at_one_hour(prog_noise_scale):
    """Without compensation (read noise off, so no clipping bias), a weight at 0.5 max reads
    E[W_t] = (E[g_p+] E[(t/t0)^-nu+] - E[g_p-] E[(t/t0)^-nu-]) / s, each device's decay
    integrated over its folded-normal nu (G+ = 12.5 uS, r = 0.5; G- = 0, r' = 1e-7)."""
    cfg = PCMConfig(prog_noise_scale=prog_noise_scale, read_noise_scale=0.0,
                    drift_compensation="none")  # fmt: skip
    w_t = PCMWeights(half_weights(), cfg, seed=11, name="w").weights_at(HOUR)[1:]
    mean_plus, _ = clipped_normal(12.5, prog_sigma(0.5) * prog_noise_scale)
    mean_minus, _ = clipped_normal(0.0, prog_sigma(0.0) * prog_noise_scale)
    expected = mean_plus * expected_decay(0.5, HOUR) - mean_minus * expected_decay(0.0, HOUR)
    expected /= 25.0
    se = w_t.double().std().item() / math.sqrt(w_t.numel())
    assert abs(w_t.double().mean().item() - expected) < 5 * se
    assert expected < 0.5 * 0.8  # an hour of drift is visible (the test can fail)


@pytest.mark.parametrize("compensation", ["global", "per_channel"])
def test_compensation_restores_the_reference(compensation):
    w = torch.randn(32, 64, generator=gen(6), dtype=torch.float64)
    chip = PCMWeights(w, PCMConfig(drift_compensation=compensation), seed=1, name="fc.weight")
    per_channel = compensation == "per_channel"
    for t in [0.0, HOUR, YEAR]:
        w_t, alpha = chip.read_out(t)
        readout = (w_t * alpha).abs().reshape(32, -1).mean(dim=1, keepdim=per_channel)
        if not per_channel:
            readout = readout.mean()
        torch.testing.assert_close(readout.reshape(chip.reference.shape), chip.reference,
                                   rtol=1e-12, atol=0.0)  # fmt: skip
    raw_year = chip.read_out(YEAR)[0].abs().mean()
    assert raw_year < 0.7 * w.abs().mean()  # a year of drift, before compensation


def test_compensation_floors_both_readouts_at_1e4():
    """aihwkit clamps the reference and the current read-out at 1e-4: a channel whose mean |W|
    is below it gets alpha = 1 (not ref / 1e-4), an all-zero channel no NaN; a channel above it
    is compensated (drift only, so W_t = W (t/t0)^-nu per weight)."""
    w = torch.zeros(4, 16, dtype=torch.float64)
    w[0] = torch.randn(16, generator=gen(18), dtype=torch.float64)
    w[1], w[2] = 1e-5, 1e-2  # row 3 stays 0
    cfg = PCMConfig(prog_noise_scale=0.0, read_noise_scale=0.0, drift_compensation="per_channel")
    w_t, alpha = PCMWeights(w, cfg, seed=2, name="w").read_out(YEAR)
    assert alpha.shape == (4, 1)
    assert alpha[1].item() == 1.0 and alpha[3].item() == 1.0 and torch.equal(w_t[3], w[3])
    torch.testing.assert_close(alpha[2, 0], 1e-2 / w_t[2].abs().mean(), rtol=1e-12, atol=0.0)
    assert alpha[2].item() > 1.2
    for factor, compensated in ((1e-6, False), (1e-2, True)):  # global: mean|W| ~ 1e-6, 1e-2
        cfg = PCMConfig(prog_noise_scale=0.0, read_noise_scale=0.0)
        w_t, alpha = PCMWeights(w[:1] * factor, cfg, seed=2, name="w").read_out(YEAR)
        assert (alpha.item() > 1.2) == compensated and (alpha.item() == 1.0) != compensated


def test_drift_exponents_come_from_the_targets():
    """Same seed, same draws: changing only the programming noise moves every programmed
    conductance but no drift exponent (they would move where unclipped if drawn from g_p)."""
    w = torch.randn(64, 64, generator=gen(17))
    low = PCMWeights(w, PCMConfig(prog_noise_scale=1.0), seed=4, name="w").pair
    high = PCMWeights(w, PCMConfig(prog_noise_scale=3.0), seed=4, name="w").pair
    assert not torch.equal(low.g_plus, high.g_plus)
    assert torch.equal(low.nu_plus, high.nu_plus) and torch.equal(low.nu_minus, high.nu_minus)


def test_same_seed_same_chip_in_any_module_order():
    cfg = PCMConfig()
    tensors = {"a.weight": torch.randn(8, 4, generator=gen(7)),
               "b.weight": torch.randn(6, 3, 3, 3, generator=gen(8))}  # fmt: skip
    first = {n: PCMWeights(w, cfg, 7, n) for n, w in tensors.items()}
    torch.randn(100)  # the global RNG plays no part
    second = {n: PCMWeights(w, cfg, 7, n) for n, w in reversed(tensors.items())}
    for name in tensors:
        assert torch.equal(first[name].weights_at(HOUR, 2), second[name].weights_at(HOUR, 2))
    other = PCMWeights(tensors["a.weight"], cfg, 8, "a.weight")
    assert not torch.equal(other.programmed_weights, first["a.weight"].programmed_weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_seed_same_chip_on_any_device():
    w = conv_weight()
    cpu = PCMWeights(w, PCMConfig(), 7, "conv.weight").weights_at(HOUR, 1)
    gpu = PCMWeights(w.cuda(), PCMConfig(), 7, "conv.weight").weights_at(HOUR, 1)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-7)  # pow/log ulps differ


def test_repetitions_redraw_only_the_read_noise():
    w = torch.randn(64, 32, generator=gen(9))
    quiet = PCMWeights(w, PCMConfig(read_noise_scale=0.0), seed=5, name="w")
    assert torch.equal(quiet.weights_at(HOUR, 0), quiet.weights_at(HOUR, 1))
    assert not torch.equal(quiet.weights_at(HOUR, 0), quiet.programmed_weights)  # drift is on

    chip = PCMWeights(w, PCMConfig(), seed=5, name="w")
    w_0, w_1 = chip.weights_at(HOUR, 0), chip.weights_at(HOUR, 1)
    assert torch.equal(w_0, chip.weights_at(HOUR, 0))  # a repetition is reproducible
    assert not torch.equal(w_0, w_1)
    diff = (w_0 - w_1).double()  # zero-mean read noise, same drift underneath
    assert abs(diff.mean().item()) < 5 * diff.std().item() / math.sqrt(diff.numel())
    assert diff.abs().max() < 0.2 * w.abs().max()


def test_remap_programmed_drifts_the_net_conductance():
    """aihwkit re-maps W_prog onto one device per pair before drift: a weight at 0.5 max then
    reads W_t = W_prog (t/t0)^-nu+, so E[W_t / W_prog] is the r = 0.5 decay alone. Issue #11's
    pair (default) also drifts the programmed partner device (about 0.1 uS, faster nu)."""
    expected = expected_decay(0.5, HOUR)
    ratios = {}
    for remap in (True, False):
        cfg = PCMConfig(read_noise_scale=0.0, drift_compensation="none", remap_programmed=remap)
        chip = PCMWeights(half_weights(dtype=torch.float64), cfg, seed=12, name="w")
        ratios[remap] = (chip.weights_at(HOUR) / chip.programmed_weights)[1:]
    se = ratios[True].std().item() / math.sqrt(ratios[True].numel())
    assert abs(ratios[True].mean().item() - expected) < 5 * se
    assert abs(ratios[False].mean().item() - expected) > 5 * se


# ---- training perturbations --------------------------------------------------------------------


def test_training_perturbation_is_programming_noise_without_drift():
    cfg = PCMConfig(drift_scale=0.0, read_noise_scale=0.0, drift_compensation="none")
    w = half_weights().requires_grad_()
    nu = pcm_training_perturbation(w, cfg, t_train=HOUR, generator=gen(13))
    assert not nu.requires_grad and nu.shape == w.shape and nu.dtype == w.dtype
    mean_plus, std_plus = clipped_normal(12.5, prog_sigma(0.5))
    mean_minus, std_minus = clipped_normal(0.0, prog_sigma(0.0))
    check_moments(nu[1:], (mean_plus - mean_minus) / 25.0 - 0.5,
                  math.hypot(std_plus, std_minus) / 25.0)  # fmt: skip
    again = pcm_training_perturbation(w, cfg, t_train=HOUR, generator=gen(13))
    assert torch.equal(nu, again)


def test_training_perturbation_compensates_the_drift():
    """Drift only (no programming or read noise): global compensation gives back mean|W|
    exactly; without it a day of drift shrinks the weights."""
    w = torch.randn(32, 16, generator=gen(14), dtype=torch.float64)
    quiet = dict(prog_noise_scale=0.0, read_noise_scale=0.0)
    nu = pcm_training_perturbation(w, PCMConfig(**quiet), 86_400.0, generator=gen(15))
    assert nu.abs().max() > 0.05 * w.abs().max()  # the drift spread remains
    torch.testing.assert_close((w + nu).abs().mean(), w.abs().mean(), rtol=1e-12, atol=0.0)
    cfg = PCMConfig(**quiet, drift_compensation="none")
    raw = w + pcm_training_perturbation(w, cfg, 86_400.0, generator=gen(15))
    assert raw.abs().mean() < 0.8 * w.abs().mean()


# ---- user errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [("g_max", 0.0), ("g_max", -1.0), ("t0", 0.0), ("t0", 1e-7), ("t_read", 0.0),
     ("prog_noise_scale", -0.1), ("read_noise_scale", float("nan")), ("drift_scale", "1"),
     ("drift_compensation", "both"), ("remap_programmed", "yes")],
)  # fmt: skip
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        PCMConfig(**{key: value})


def test_bad_time_or_repetition_names_the_key():
    chip = PCMWeights(torch.randn(4, 4, generator=gen(16)), PCMConfig(), seed=0, name="w")
    with pytest.raises(ConfigError, match="t_inference"):
        chip.weights_at(-1.0)
    with pytest.raises(ConfigError, match="repetition"):
        chip.weights_at(0.0, repetition=-1)
