"""The RRAM device (cimsim.chip.devices.rram) against aihwkit's ``ReRamWan2022NoiseModel``: the
std polynomials (moments of programmed and read conductances and weights, in closed form), the
clamp at 0, the fitted times only, reproducible chips, compensation, training draws, a converted
model moved in time, and aihwkit itself (``benchmarks/aihwkit_rram_reference.json``).

References are independent of the code under test: the polynomials typed from aihwkit's
``reram.py`` in its order (highest power first) and evaluated with numpy; clipped-normal moments
from scipy. Statistical checks use fixed seeds and 5 standard errors (of the estimate, or of the
difference of two independent estimates: ``sqrt(se_a^2 + se_c^2)``), from the sample size and
the sample's own fourth moment: a correct model fails with probability < 1e-6 per check.
"""

import dataclasses
import functools
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from cimsim import AnalogConfig, ConfigError, convert_to_analog, program_chip, set_time
from cimsim.chip.convert import device_layers
from cimsim.chip.devices.pcm_model import to_conductances
from cimsim.chip.devices.rram import (
    READ_TIMES,
    TIMES,
    RRAMConfig,
    RRAMWeights,
    program,
    read,
    rram_training_perturbation,
)
from cimsim.chip.noise import antithetic

DAY = 86400.0
# aihwkit 1.2.0 reram.py's coeff_dic, as written there (highest power first; it reverses them).
AIHWKIT = {
    1.0: [-16.815, 45.393, -43.853, 16.030, 0.348],
    DAY: [-16.458, 47.095, -50.773, 22.086, 0.701],
    2 * DAY: [-11.934, 37.062, -43.507, 20.274, 0.782],
}
RATIOS = (0.0, 0.05, 0.2, 0.5, 0.8, 1.0)  # g_T / g_max
N = 100_000  # draws per target: SE of a mean 0.3 % of the std
REF_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "aihwkit_rram_reference.json"


def sigma(r, t, scale=1.0):
    """The std (uS) at ratio ``r`` and fitted time ``t`` (programming: ``t = 1``)."""
    return float(np.polynomial.polynomial.polyval(r, AIHWKIT[t][::-1])) * scale


def clipped_normal(mu: float, s: float) -> tuple[float, float]:
    """Mean and std of max(X, 0), X ~ N(mu, s^2)."""
    a = mu / s
    m1 = mu * norm.cdf(a) + s * norm.pdf(a)
    m2 = (mu**2 + s**2) * norm.cdf(a) + mu * s * norm.pdf(a)
    return m1, math.sqrt(max(m2 - m1**2, 0.0))


def estimate(x: torch.Tensor) -> tuple[float, float, float, float]:
    """Mean, std and their SEs (the std's from the fourth central moment: not normal)."""
    x = x.double().flatten()
    n, m, sd = x.numel(), x.mean().item(), x.std().item()
    m4 = ((x - m) ** 4).mean().item()
    return m, sd, sd / math.sqrt(n), math.sqrt(max(m4 - sd**4, 0.0) / (4 * n)) / sd


def agrees(x: torch.Tensor, mean: float, std: float) -> bool:
    m, sd, se_m, se_sd = estimate(x)
    return abs(m - mean) < 5 * se_m and abs(sd - std) < 5 * se_sd


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.cache
def draws(g_max: float = 25.0, noise_scale: float = 1.0) -> dict[float, torch.Tensor]:
    """Per time (0: programming), conductances drawn at targets ``RATIOS * g_max``: (6, N)."""
    cfg = RRAMConfig(g_max=g_max, noise_scale=noise_scale)
    g = (torch.tensor(RATIOS, dtype=torch.float64) * g_max).unsqueeze(1).expand(-1, N)
    return {
        0.0: program(g, cfg, gen(1)),
        **{t: read(g, t, cfg, gen(2 + i)) for i, t in enumerate(TIMES)},
    }


# ---- conductances: the polynomials, the clamp, g_max ------------------------------------------


@pytest.mark.parametrize("t", READ_TIMES)
def test_conductance_moments_follow_the_time_s_polynomial(t):
    poly = 1.0 if t == 0 else t  # programming draws with the earliest time's polynomial
    for r, row in zip(RATIOS, draws()[t], strict=True):
        assert agrees(row, *clipped_normal(25.0 * r, sigma(r, poly))), (t, r)


# The mistakes the moment checks must catch, each as the std (uS) it would give at (r, t).
MUTANTS = {
    "the 40 uS fitting reference applied": lambda r, t: sigma(r, t) * 25.0 / 40.0,
    "r = g / 40 uS": lambda r, t: sigma(r * 25.0 / 40.0, t),
    "another time's polynomial": lambda r, t: sigma(r, {1.0: DAY, DAY: 2 * DAY, 2 * DAY: DAY}[t]),
    "coefficients not reversed": lambda r, t: abs(np.polyval(AIHWKIT[t][::-1], r)),
}


@pytest.mark.parametrize("mutant", MUTANTS)
@pytest.mark.parametrize("t", TIMES)
def test_each_wrong_model_fails_the_moment_check(mutant, t):
    rows = zip(RATIOS, draws()[t], strict=True)
    assert not all(agrees(row, *clipped_normal(25.0 * r, MUTANTS[mutant](r, t))) for r, row in rows)


def test_the_std_is_in_uS_whatever_g_max():
    """g_max = 10: the same polynomial in r (aihwkit's ``g_max / coeff_g_max_reference`` is 1);
    a std scaled with g_max (as PCM's polynomial is, or by the 40 uS reference) fails."""
    for t, rows in draws(10.0, 2.0).items():
        poly = 1.0 if t == 0 else t
        for r, row in zip(RATIOS, rows, strict=True):
            assert agrees(row, *clipped_normal(10.0 * r, sigma(r, poly, 2.0))), (t, r)
            if r >= 0.2:  # relatively noisy targets: the wrong stds are far out
                assert not agrees(row, *clipped_normal(10.0 * r, sigma(r, poly, 2.0) * 0.4))
                assert not agrees(row, *clipped_normal(10.0 * r, sigma(r, poly, 2.0) * 0.25))


def test_conductances_are_clamped_at_zero():
    for t, rows in draws().items():
        assert rows.min() >= 0
        for r, row in zip(RATIOS[:3], rows[:3], strict=True):  # P(g = 0) = Phi(-g_T / sigma)
            p = norm.cdf(-25.0 * r / sigma(r, 1.0 if t == 0 else t))
            assert (
                abs((row == 0).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / N) + 1e-12
            )


def test_only_the_fitted_times_exist():
    chip = RRAMWeights(torch.randn(4, 8), RRAMConfig(), 0, "w")
    for bad in (60.0, 3600, 0.5, 2 * DAY + 1):
        with pytest.raises(
            ConfigError,
            match=r"^t_inference=.*0 \(programmed\), 1, 86400 \(1 day\), 172800 \(2 days\)",
        ):
            chip.read_out(bad)
    with pytest.raises(ConfigError, match=r"^t_inference=0.0 .*1, 86400"):  # a draw needs a fit
        read(torch.ones(3), 0.0, RRAMConfig())
    with pytest.raises(ConfigError, match=r"^t_train=3600"):
        rram_training_perturbation(torch.randn(4, 8), RRAMConfig(), 3600.0)
    for t in (0, 1, 86400, 172800.0):
        chip.read_out(t)  # ints too: aihwkit looks the time up in a dict of floats


def test_unfitted_times_are_refused_before_anything_runs(tmp_path):
    """``noise.t_train`` is checked before training, a sweep's times before any chip is
    measured (``Device.check_time``); a test chip's ``t_train`` only names how its model was
    trained (a PCM model trained at 1 h converts to RRAM)."""
    from cimsim.cli.train import chip_config
    from conftest import compose_cfg

    cfg = compose_cfg("train", tmp_path, ["noise=rram", "noise.t_train=3600"])
    with pytest.raises(ConfigError, match=r"^noise.t_train=3600 .*86400 \(1 day\)"):
        chip_config(cfg)
    AnalogConfig(device="pcm", t_train=3600).override({"device": "rram"})
    from cimsim.robustness.grid import RobustnessGrid
    from cimsim.robustness.measure import check_time_sweep

    model = convert_to_analog(nn.Sequential(nn.Linear(4, 2)), AnalogConfig(device="rram"))
    check_time_sweep(model, RobustnessGrid(sigmas=(0.0,), times=(0.0, 86400.0)))
    with pytest.raises(ConfigError, match=r"^times=3600"):
        check_time_sweep(model, RobustnessGrid(sigmas=(0.0,), times=(0.0, 3600.0)))


# ---- weights: a chip, its reads, compensation, training ---------------------------------------


def half_weights(n: int = N) -> torch.Tensor:
    """One 1.0 (s = g_max) and n weights at 0.5: G+ = 12.5 uS, G- = 0 (both drawn)."""
    w = torch.full((n + 1,), 0.5, dtype=torch.float64)
    w[0] = 1.0
    return w


def weight_error(t: float) -> tuple[float, float]:
    """Mean and std of ``W_t - W`` at w = 0.5, uncompensated: (G+ - G-) / 25 with both devices
    drawn around their targets 12.5 and 0 uS."""
    poly = 1.0 if t == 0 else t
    mp, sp = clipped_normal(12.5, sigma(0.5, poly))
    mm, sm = clipped_normal(0.0, sigma(0.0, poly))
    return (mp - 12.5 - mm) / 25.0, math.hypot(sp, sm) / 25.0


@pytest.mark.parametrize("t", READ_TIMES)
def test_chip_reads_and_training_draws_have_the_pair_s_moments(t):
    w, cfg = half_weights(), RRAMConfig(drift_compensation="none")
    w_t, alpha = RRAMWeights(w, cfg, 5, "w").read_out(t)
    assert alpha.item() == 1.0 and agrees((w_t - w)[1:], *weight_error(t))
    torch.manual_seed(6)
    nu = rram_training_perturbation(w, cfg, t)
    assert agrees(nu[1:], *weight_error(t))


def test_the_same_chip_reads_the_same_and_each_read_out_is_a_fresh_draw():
    w = torch.randn(16, 32)
    chip = RRAMWeights(w, RRAMConfig(), 3, "layer.weight")
    again = RRAMWeights(w, RRAMConfig(), 3, "layer.weight")
    assert torch.equal(chip.programmed_weights, again.programmed_weights)
    for t in TIMES:
        a = chip.read_out(t, 1)
        assert all(torch.equal(x, y) for x, y in zip(a, chip.read_out(t, 1), strict=True))
        assert all(torch.equal(x, y) for x, y in zip(a, again.read_out(t, 1), strict=True))
        assert not torch.equal(a[0], chip.read_out(t, 0)[0])  # another read-out: another draw
    w0, alpha = chip.read_out(0.0, 2)  # t = 0: the programmed chip, gain 1, any read-out
    assert torch.equal(w0, chip.programmed_weights) and alpha.item() == 1.0
    assert not torch.equal(w0, RRAMWeights(w, RRAMConfig(), 4, "layer.weight").programmed_weights)


def test_reads_draw_around_the_targets_not_the_programmed_conductances():
    """aihwkit's ``apply_drift_noise_to_conductance`` ignores ``g_prog``: the programming error
    and the error at 1 s are uncorrelated (|corr| < 5 / sqrt(n))."""
    w = half_weights()
    chip = RRAMWeights(w, RRAMConfig(drift_compensation="none"), 8, "w")
    e_prog, e_1s = (chip.programmed_weights - w)[1:], (chip.read_out(1.0)[0] - w)[1:]
    assert abs(np.corrcoef(e_prog.numpy(), e_1s.numpy())[0, 1]) < 5 / math.sqrt(N)


def test_compensation_and_the_remapped_read_scale():
    w = torch.randn(8, 96, dtype=torch.float64)
    tiles = [slice(0, 48), slice(48, 96)]
    chip = RRAMWeights(w, RRAMConfig(compensation_read="exact"), 2, "w", tiles)
    remapped = RRAMWeights(
        w, RRAMConfig(compensation_read="exact", remap_programmed=True), 2, "w", tiles
    )
    w_prog = chip.programmed_weights
    for t in TIMES:
        (w_t, alpha), (w_r, alpha_r) = chip.read_out(t), remapped.read_out(t)
        for sl in tiles:  # global per tile: mean|W_prog| / mean|W_t| over the tile, by hand
            assert torch.allclose(
                alpha[0, sl], w_prog[:, sl].abs().mean() / w_t[:, sl].abs().mean()
            )
            # aihwkit's scale s' = g_max / max|W_prog|: the read comes back times s / s'
            factor = w_prog[:, sl].abs().max() / w[:, sl].abs().max()
            assert torch.allclose(w_r[:, sl], w_t[:, sl] * factor)
        assert torch.allclose(w_t * alpha, w_r * alpha_r)  # compensation cancels the factor
    per_channel = RRAMWeights(
        w, RRAMConfig(drift_compensation="per_channel", compensation_read="exact"), 2, "w"
    )
    w_t, alpha = per_channel.read_out(DAY)
    reference = per_channel.programmed_weights.abs().mean(1)
    assert torch.allclose(alpha.flatten(), reference / w_t.abs().mean(1))


def test_compensation_through_the_periphery_reads_it():
    w = torch.randn(8, 32)
    chip = RRAMWeights(w, RRAMConfig(), 1, "w")
    calls = []

    def exact(weights, generator):  # a periphery that reads the columns exactly
        calls.append(weights)
        return weights

    assert chip.read(0.0, 0, exact)[1].item() == 1.0 and not calls  # t = 0: no read-out
    w_t, alpha = chip.read(DAY, 0, exact)
    assert torch.allclose(alpha, chip.programmed_weights.abs().mean() / w_t.abs().mean())
    chip.read(2 * DAY, 0, exact)
    assert len(calls) == 3  # the reference once, then one read-out per read


def test_config_validation_and_the_chip_record():
    with pytest.raises(ConfigError, match=r"^rram\.noise_scale=-1"):
        AnalogConfig(device="rram", rram={"noise_scale": -1})
    bad_values = [("g_max", 0.0), ("g_max", float("inf")), ("noise_scale", float("inf"))]
    for key, bad in [*bad_values, ("drift_compensation", "x"), ("mapping", "rows")]:
        with pytest.raises(ConfigError, match=f"^{key}="):
            RRAMConfig(**{key: bad})
    for other in (AnalogConfig(), AnalogConfig(device="pcm")):  # not recorded: no fingerprint moved
        assert "rram" not in other.as_dict()
    chip = AnalogConfig(device="rram", t_train=DAY, rram={"g_max": 20.0})
    assert chip.as_dict()["rram"] == dataclasses.asdict(RRAMConfig(g_max=20.0))
    assert AnalogConfig(**chip.as_dict()) == chip
    test_chip = chip.override({"rram": {"drift_compensation": "none"}})  # chip.rram.<field>=
    assert test_chip.rram == RRAMConfig(g_max=20.0, drift_compensation="none")
    assert chip.device_model.label(chip) == "RRAM t_train=86400s" and chip.device_model.timed


def test_training_draws_are_not_symmetric():
    with pytest.raises(RuntimeError, match="antithetic"), antithetic("record"):
        rram_training_perturbation(torch.randn(4, 8), RRAMConfig(), DAY)


# ---- a converted model ----------------------------------------------------------------------


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


@pytest.mark.parametrize(
    "periphery", [{}, {"tile_rows": 18, "out_noise": 0.04, "tile_adc_levels": 255}]
)
def test_set_time_moves_a_converted_model(periphery):
    """Each layer reads its device at (t, repetition), the same again after another time; with
    tile outputs (fresh output noise at every product) the layers' read state is compared."""
    model = convert_to_analog(small_net(), AnalogConfig(device="rram", **periphery)).eval()
    program_chip(model, 7)
    x, layers = torch.randn(2, 3, 8, 8), device_layers(model)
    states, outputs = {}, {}
    for t in READ_TIMES:
        set_time(model, t, 1)
        states[t] = [(layer.chip_read_weight, layer.chip_read_alpha) for layer in layers]
        outputs[t] = model(x)
        if not periphery:  # the layers compute with the device's compensated weights
            for layer in layers:
                assert torch.equal(layer.chip_read_weight, layer.device_state.weights_at(t, 1))
    set_time(model, 1.0, 0)
    for t in READ_TIMES:
        set_time(model, t, 1)
        for (w, alpha), layer in zip(states[t], layers, strict=True):
            assert torch.equal(layer.chip_read_weight, w)
            assert alpha is None or torch.equal(layer.chip_read_alpha, alpha)
        if not periphery:
            torch.testing.assert_close(model(x), outputs[t], rtol=0, atol=0)
    assert not torch.equal(states[1.0][0][0], states[DAY][0][0])
    assert torch.isfinite(outputs[2 * DAY]).all()
    with pytest.raises(ConfigError, match=r"^t_inference=3600.*86400 \(1 day\)"):
        set_time(model, 3600.0)


def test_training_draws_a_fresh_chip_at_t_train():
    model = convert_to_analog(small_net(), AnalogConfig(device="rram", t_train=DAY)).train()
    x = torch.randn(2, 3, 8, 8)
    a = model(x)
    assert not torch.equal(a, model(x))
    a.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    bad = convert_to_analog(small_net(), AnalogConfig(device="rram", t_train=60.0)).train()
    with pytest.raises(ConfigError, match=r"^t_train=60"):
        bad(x)


def test_hydra_noise_rram(tmp_path):
    from cimsim.cli.train import chip_config
    from conftest import compose_cfg

    cfg = compose_cfg(
        "train", tmp_path, ["noise=rram", "noise.t_train=172800", "noise.rram.g_max=20"]
    )
    chip = chip_config(cfg)
    assert (chip.device, chip.t_train, chip.rram) == ("rram", 2 * DAY, RRAMConfig(g_max=20.0))


# ---- aihwkit itself -------------------------------------------------------------------------


@functools.cache
def reference() -> dict:
    return json.loads(REF_PATH.read_text())


def reference_weights() -> torch.Tensor:
    spec = importlib.util.spec_from_file_location("ref", REF_PATH.with_suffix(".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports aihwkit only inside the functions that run it
    w = module.make_weights(reference()["weights"])
    assert module.sha256(w) == reference()["weights_sha256"]
    return w


def close(a: float, se_a: float, c: float, se_c: float) -> bool:
    return abs(a - c) <= 5 * math.hypot(se_a, se_c)


def test_aihwkit_s_code_as_recorded():
    q = reference()["quirks"]
    assert {float(k): v for k, v in q["coeff_dic"].items()} == {
        t: c[::-1] for t, c in AIHWKIT.items()
    }
    assert (q["coeff_g_max_reference"], q["prog_coeff_g_max_reference"]) == (25.0, 40.0)
    assert q["drift_ignores_g_prog"] and q["coeff_g_max_reference_given"].startswith(
        "AttributeError"
    )
    assert reference()["tile"]["drift_at_3600_s"].startswith("t_inference should be one of")


def matches(rows: list[dict], ours: torch.Tensor) -> bool:
    """Every target's mean and std within 5 SE of the difference of aihwkit's and ours."""
    return all(
        close(a["mean"], a["se_mean"], m, se_m) and close(a["std"], a["se_std"], sd, se_sd)
        for a, (m, sd, se_m, se_sd) in zip(rows, map(estimate, ours), strict=True)
    )


def targets(spec: dict) -> torch.Tensor:
    g = torch.tensor(spec["ratios"], dtype=torch.float64) * spec["g_max"]
    return g.unsqueeze(1).expand(-1, spec["stats"]["0"][0]["n"])


@pytest.mark.parametrize("case", ["g25", "g10_scale2"])
def test_conductances_match_aihwkit(case):
    spec = reference()["conductance"][case]
    cfg, g = RRAMConfig(g_max=spec["g_max"], noise_scale=spec["noise_scale"]), targets(spec)
    for key, rows in spec["stats"].items():
        t = float(key)
        assert matches(rows, program(g, cfg, gen(11)) if t == 0 else read(g, t, cfg, gen(12))), t


@pytest.mark.parametrize("mutant", ["40 uS reference", "r = g / 40 uS", "another time"])
def test_a_wrong_model_does_not_match_aihwkit(mutant):
    """The reference check catches the mistakes: the std times 25 / 40 (``noise_scale`` 0.625),
    the polynomial in g / 40 (``g_max`` 40 on the same targets), or a neighbouring time's fit."""
    spec, swap = reference()["conductance"]["g25"], {1.0: DAY, DAY: 2 * DAY, 2 * DAY: DAY}
    cfg = {
        "40 uS reference": RRAMConfig(noise_scale=25 / 40),
        "r = g / 40 uS": RRAMConfig(g_max=40.0),
    }
    for t in TIMES:
        t_used = swap[t] if mutant == "another time" else t
        drawn = read(targets(spec), t_used, cfg.get(mutant, RRAMConfig()), gen(12))
        assert not matches(spec["stats"][f"{t:g}"], drawn), t


CHIPS = 40  # cimsim's chips per reference check (aihwkit's count is in the JSON)


def binned_errors(w: torch.Tensor, cfg: RRAMConfig, bins: int) -> dict:
    """Per time, per ``|W| / max|W|`` bin, over ``CHIPS`` chips: (mean, se) of each chip's mean
    and std of ``(W_t - W) sign(W)``, as the reference script computes them."""
    index = (w.abs() / w.abs().max() * bins).long().clamp_max(bins - 1).flatten()
    n = torch.bincount(index, minlength=bins).double()
    per_chip = {t: [] for t in READ_TIMES}
    for seed in range(CHIPS):
        chip = RRAMWeights(w, cfg, seed, "w")
        for t in READ_TIMES:
            e = ((chip.read_out(t)[0] - w) * w.sign()).flatten().double()
            s1, s2 = (torch.bincount(index, e**k, minlength=bins) for k in (1, 2))
            per_chip[t].append(torch.stack([s1 / n, ((s2 - s1**2 / n) / (n - 1)).sqrt()], 1))
    return {
        t: (torch.stack(v).mean(0), torch.stack(v).std(0) / CHIPS**0.5) for t, v in per_chip.items()
    }


def test_weights_match_aihwkit_with_its_remapped_scale():
    """``remap_programmed=True`` is aihwkit's ``apply_programming_noise`` / ``apply_drift_noise``
    per bin; the default (the programmed scale) departs from it at t > 0 without compensation."""
    ref, w = reference()["weights_case"], reference_weights()
    for remap in (True, False):
        cfg = RRAMConfig(drift_compensation="none", remap_programmed=remap)
        ours = binned_errors(w, cfg, ref["bins"])
        for key, rows in ref["stats"].items():
            mean, se = ours[float(key)]
            agree = all(
                close(a["mean"], a["se_mean"], mean[b, 0], se[b, 0])
                and close(a["std"], a["se_std"], mean[b, 1], se[b, 1])
                for b, a in enumerate(rows)
            )
            assert agree == (remap or key == "0"), (key, remap)


def test_compensation_gains_match_aihwkit_s_tiles():
    ref, w = reference()["tile"], reference_weights()
    assert ref["drift_compensation"] == "GlobalDriftCompensation"
    assert ref["alpha_after_first_program"] == [1.0] * ref["tiles"]
    size = ref["max_input_size"]
    tiles = [slice(i, i + size) for i in range(0, w.shape[1], size)]
    cfg = RRAMConfig(compensation_read="exact", remap_programmed=True)
    chips = [RRAMWeights(w, cfg, seed, "w", tiles) for seed in range(CHIPS)]
    for key, per_tile in ref["stats"].items():
        alphas = torch.stack(
            [c.read_out(float(key))[1][0, [sl.start for sl in tiles]] for c in chips]
        )
        mean, se = alphas.double().mean(0), alphas.double().std(0) / math.sqrt(len(chips))
        for i, a in enumerate(per_tile):
            assert close(a["mean"], a["se_mean"], mean[i].item(), se[i].item()), (key, i)


def test_the_mapping_is_aihwkit_s_single_pair():
    w = torch.tensor([[-2.0, 0.0, 1.0]])
    g_plus, g_minus, scale = to_conductances(w, 25.0)
    assert (
        scale.item() == 12.5
        and g_plus.tolist() == [[0.0, 0.0, 12.5]]
        and g_minus.tolist() == [[25.0, 0.0, 0.0]]
    )


@pytest.mark.slow
def test_train_and_sweep_an_rram_model_over_its_times(tmp_path):
    """``train.py noise=rram`` then ``evaluate.py robustness=drift_sweep`` at RRAM's times (the
    command docs/devices.md gives): the programmed chip (t = 0) reads the same at every read-out,
    each later read-out is a fresh draw."""
    from cimsim.cli.evaluate import evaluate
    from cimsim.cli.train import train
    from conftest import FAST, compose_cfg

    quiet = ["logger=none", "test=false", "callbacks.robustness=null"]
    train(compose_cfg("train", tmp_path, FAST + ["noise=rram", "noise.t_train=86400", *quiet]))
    sweep = ["robustness=drift_sweep", "robustness.times=[0,1,86400,172800]", "robustness.chips=2",
             "robustness.compensations=null", "robustness.max_batches=1", "progress=false",
             "wandb.enabled=false", f"ckpt={tmp_path / 'checkpoints' / 'last.ckpt'}"]  # fmt: skip
    rows = evaluate(compose_cfg("evaluate", tmp_path / "eval", sweep)).rows
    assert len(rows) == 2 * 4 * 3  # chips x times x read-outs (the preset's 3)
    for t in READ_TIMES:
        losses = {r.chip: [] for r in rows}
        for r in rows:
            if r.t_inference == t:
                losses[r.chip].append(r.loss)
        assert all(len(set(v)) == (1 if t == 0 else 3) for v in losses.values()), t
    assert rows[0].model.startswith("train sigma=0, L=1, RRAM t_train=86400s | chip device=rram")
