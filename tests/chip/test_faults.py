"""Stuck-at faults (``chip.faults``) on any device with conductances: relative, PCM and a
``ConductanceDevice`` plug-in (the conductance-level hook).

The fraction of stuck devices against p within binomial error (5 standard errors, fixed seeds:
a correct draw fails with probability < 1e-6); a weight read against the value the converter
implies for its stuck devices, computed here scalar by scalar from the pairs' fill rule; faults
drawn per chip (nested across rates, apart from the programming noise), afresh per training
sample (shared by an antithetic pair), and applied once per programmed chip, not per forward.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types

import pytest
import torch
from docs_blocks import section_blocks
from torch import nn

import cimsim
from cimsim import AnalogConfig, ConfigError, convert_to_analog, program_chip, set_time
from cimsim.chip.devices import register_device
from cimsim.chip.devices.conductance import ConductanceDevice
from cimsim.chip.devices.faults import OFF, OK, ON, FaultsConfig, fault_codes, fault_uniforms
from cimsim.chip.noise import antithetic
from cimsim.cli.chip import chip_overrides
from cimsim.cli.train import chip_config
from conftest import ROOT, compose_cfg

Z = 5.0


# ----------------------------------------------------------------------------- a plug-in


@dataclasses.dataclass(frozen=True)
class IdealConfig:
    """No fields: the device stays out of every chip record and setting list."""


class IdealPairs(ConductanceDevice):
    """A plug-in through the hook only: programs each device exactly, reads it as programmed."""

    @property
    def g_max(self) -> float:
        return 10.0

    def program_conductances(self, targets, generator):
        return [g.clone() for g in targets]

    def read_conductances(self, programmed, t_inference, generator):
        return programmed


@dataclasses.dataclass(frozen=True)
class PlainConfig:
    """A plug-in without conductances."""


class PlainWeights(cimsim.Device):
    def program(self, weight, seed, name, tiles=None):
        raise NotImplementedError


register_device("ideal_pairs", IdealConfig, IdealPairs)
register_device("plain_weights", PlainConfig, PlainWeights)


# ----------------------------------------------------------------------------- helpers


def _net(shape=(64, 32), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(shape[1], shape[0], bias=False))


def _chip(config: AnalogConfig, net: nn.Sequential, seed: int = 3, t: float | None = None):
    """The weights of chip ``seed`` (one-hot reads of the layer) and the layer."""
    model = convert_to_analog(net, config).eval()
    program_chip(model, seed)
    if t is not None:
        set_time(model, t)
    with torch.no_grad():
        return model(torch.eye(net[0].in_features)).t(), model[0]


def _codes(layer) -> torch.Tensor:
    """The programmed chip's fault codes, ``(2 N, *W.shape)``."""
    if layer.device_state is None:
        return layer.chip_cells[1]
    state = layer.device_state  # PCM's pair, RRAM's chip, a ConductanceDevice's own
    return (getattr(state, "pair", None) or getattr(state, "chip", None) or state).codes


def implied(w: float, peak: float, f: tuple, codes: list[int]) -> float:
    """The weight read from pairs ``f`` whose devices have ``codes`` (G+_1, G-_1, ...): each
    device not stuck holds its share of ``|w|`` by the fill rule (pair k takes what the pairs
    before it leave, at most one full device), a stuck one 0 or full; in units of a full device
    the weight is ``sum_k f_k (G+_k - G-_k) / sum f`` times ``peak``."""
    full, left, value = sum(f), abs(w) / peak * sum(f), 0.0  # left: in full-device units
    for k, fk in enumerate(f):
        share = min(max(left, 0.0) / fk, 1.0)
        left -= fk
        g = [share if w > 0 else 0.0, share if w < 0 else 0.0]
        for d in (0, 1):
            g[d] = {OK: g[d], OFF: 0.0, ON: 1.0}[codes[2 * k + d]]
        value += fk * (g[0] - g[1])
    return value / full * peak


DEVICES = {
    "relative": {"sigma": 0.1, "mean_shift": 0.02},
    "pcm": {"device": "pcm", "pcm": {"drift_compensation": "none"}},
    "rram": {"device": "rram", "rram": {"drift_compensation": "none"}},
    "ideal_pairs": {"device": "ideal_pairs"},
}


# ----------------------------------------------------------------------------- fractions


@pytest.mark.parametrize("device", list(DEVICES))
def test_the_fraction_of_stuck_devices_is_p(device):
    """2 pairs x 2 devices x 64 x 32 x 12 weights = 98 304 devices; the stuck-off and stuck-on
    fractions within 5 binomial standard errors sqrt(p (1 - p) / n) of p."""
    p_off, p_on = 0.02, 0.05
    config = AnalogConfig(faults={"stuck_off": p_off, "stuck_on": p_on}, pairs={"f": [1, 3]},
                          **DEVICES[device])  # fmt: skip
    codes = torch.cat([_codes(_chip(config, _net(), seed)[1]) for seed in range(12)])
    n = codes.numel()
    for p, code in ((p_off, OFF), (p_on, ON)):
        got = (codes == code).double().mean().item()
        assert got == pytest.approx(p, abs=Z * math.sqrt(p * (1 - p) / n))


def test_fresh_draws_stick_at_p_too():
    """A training sample's uniforms (``|v| / sqrt(3)`` of a standard uniform): U[0, 1] too."""
    codes = fault_codes(fault_uniforms((400_000,), 1), FaultsConfig(0.1, 0.3))
    n = codes.numel()
    for p, code in ((0.1, OFF), (0.3, ON)):
        got = (codes == code).double().mean().item()
        assert got == pytest.approx(p, abs=Z * math.sqrt(p * (1 - p) / n))


def test_weights_change_as_often_as_their_device_sticks():
    """Black box, relative device at sigma 0, one pair: a weight w != 0 has one device at
    |w| s, the other at 0, so it reads 0 exactly when that device is off (the other one off
    changes nothing): a fraction stuck_off of the weights, binomially."""
    p, chips = 0.1, 10
    changed = []
    for seed in range(chips):
        net = _net()
        w = net[0].weight.detach()
        got, _ = _chip(AnalogConfig(faults={"stuck_off": p}), net, seed)
        assert torch.all((got == 0) | torch.isclose(got, w))  # only ever 0
        changed.append((got == 0).flatten())
    frac, n = torch.cat(changed).double().mean().item(), 64 * 32 * chips
    assert frac == pytest.approx(p, abs=Z * math.sqrt(p * (1 - p) / n))


# ----------------------------------------------------------------------------- what is read


@pytest.mark.parametrize("f", [(1.0,), (1.0, 3.0)])
@pytest.mark.parametrize("device", list(DEVICES))
def test_stuck_devices_read_the_value_the_converter_implies(device, f):
    """Half the devices stuck off, half on: every weight reads the value of its stuck devices,
    exactly, whatever the device's noise (PCM at 1 day: programming noise, drift and read noise
    on; RRAM at 1 day: drawn afresh around its targets; the relative device at sigma 0.1, mu
    0.02)."""
    config = AnalogConfig(faults={"stuck_off": 0.5, "stuck_on": 0.5}, pairs={"f": list(f)},
                          **DEVICES[device])  # fmt: skip
    net = _net((16, 8))
    w = net[0].weight.detach()
    got, layer = _chip(config, net, t=86400.0 if device in ("pcm", "rram") else None)
    codes = _codes(layer)
    assert not (codes == OK).any()
    peak = w.abs().max().item()
    for i, j in [(i, j) for i in range(16) for j in range(8)]:
        want = implied(w[i, j].item(), peak, f, codes[:, i, j].tolist())
        assert got[i, j].item() == pytest.approx(want, abs=1e-5 * peak)


@pytest.mark.parametrize("f", [(1.0,), (1.0, 3.0)])
def test_a_noise_free_chip_reads_the_fill_rule_of_every_weight(f):
    """Some devices stuck, the others exact (the relative device at sigma 0, the ideal
    plug-in): every weight, stuck or not, is the scalar fill rule's value."""
    faults = {"stuck_off": 0.2, "stuck_on": 0.2}
    for device in ({}, {"device": "ideal_pairs"}):
        net = _net((16, 8))
        w = net[0].weight.detach()
        got, layer = _chip(AnalogConfig(faults=faults, pairs={"f": list(f)}, **device), net)
        codes, peak = _codes(layer), w.abs().max().item()
        assert 0 < (codes == OK).double().mean() < 1
        for i in range(16):
            for j in range(8):
                want = implied(w[i, j].item(), peak, f, codes[:, i, j].tolist())
                assert got[i, j].item() == pytest.approx(want, abs=1e-6 * peak)


def test_without_faults_the_ideal_plugin_reads_its_weights():
    """The hook alone (pairs, no faults): the converter's inverse is exact."""
    net = _net()
    got, _ = _chip(AnalogConfig(device="ideal_pairs", pairs={"f": [1, 2, 4]}), net)
    torch.testing.assert_close(got, net[0].weight.detach())


# ----------------------------------------------------------------------------- one chip


def test_faults_nest_across_rates_and_leave_the_programming_noise():
    """The same chip at a higher rate keeps every device stuck at the lower one (one uniform per
    device), and a PCM chip's programmed conductances of the devices not stuck are those of the
    same chip without faults (the faults have their own stream)."""
    pcm = {"device": "pcm"}
    low = _codes(_chip(AnalogConfig(faults={"stuck_off": 0.01, "stuck_on": 0.02}, **pcm),
                       _net())[1])  # fmt: skip
    high = _codes(_chip(AnalogConfig(faults={"stuck_off": 0.05, "stuck_on": 0.1}, **pcm),
                        _net())[1])  # fmt: skip
    assert torch.all(high[low == OFF] == OFF) and torch.all(high[low == ON] == ON)
    assert (high != OK).sum() > (low != OK).sum()
    _, clean = _chip(AnalogConfig(**pcm), _net())
    _, faulty = _chip(AnalogConfig(faults={"stuck_off": 0.05}, **pcm), _net())
    ok = _codes(faulty) == OK
    for d in range(2):
        a, b = clean.device_state.pair.g[d], faulty.device_state.pair.g[d]
        assert torch.equal(a[ok[d]], b[ok[d]]) and not torch.equal(a, b)


def test_training_draws_fresh_faults_that_an_antithetic_pair_shares():
    """HA-SGD with faults in the loop: each training forward draws new faults; the replay of an
    antithetic pair negates the noise but keeps the faults, so the pair's mean perturbation is
    the faults' alone: ``(nu_+ + nu_-) / 2 = W_f - W``."""
    net = _net()
    model = convert_to_analog(net, AnalogConfig(sigma=0.1, faults={"stuck_off": 0.2})).train()
    x = torch.eye(32)
    with torch.no_grad():
        first, second = model(x), model(x)
        assert not torch.equal(first, second)
        with antithetic("record"):
            plus = model(x).t()
        with antithetic("replay"):
            minus = model(x).t()
    mean, w = (plus + minus) / 2, net[0].weight.detach()
    assert torch.all(torch.isclose(mean, w, atol=1e-6) | (mean.abs() < 1e-6))  # w or 0 (off)
    assert ((mean.abs() < 1e-6) & (w.abs() > 1e-6)).double().mean() > 0.1


def test_a_programmed_faulty_chip_is_read_once(monkeypatch):
    """The faults act at programming (PCM: ``set_time``) and the relative device's perturbation
    is computed once per chip: forwards only multiply, at the cost of a digital pass."""
    from cimsim.chip import layers

    calls = []
    real = layers.relative_cells
    monkeypatch.setattr(layers, "relative_cells", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = convert_to_analog(_net(), AnalogConfig(sigma=0.05, faults={"stuck_on": 0.01})).eval()
    program_chip(model, 1)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 32))
    assert len(calls) == 1


# ----------------------------------------------------------------------------- configuration


def test_the_defaults_change_no_record():
    chip = AnalogConfig(sigma=0.05)
    assert not chip.faults.active and "faults" not in chip.as_dict()
    faulty = AnalogConfig(sigma=0.05, faults={"stuck_on": 0.01})
    assert faulty.as_dict()["faults"] == {"stuck_off": 0.0, "stuck_on": 0.01}
    assert AnalogConfig(**faulty.as_dict()) == faulty
    assert faulty.override({"faults": {"stuck_off": 0.02}}).faults.rate == pytest.approx(0.03)


def test_bad_faults_name_their_key(train_cfg, tmp_path):
    for bad, key in (({"stuck_off": -0.1}, "stuck_off"), ({"stuck_on": 1.5}, "stuck_on"),
                     ({"stuck_off": 0.6, "stuck_on": 0.5}, "stuck_on"),
                     ({"stuck_off": "x"}, "stuck_off")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"^faults\.{key}="):
            AnalogConfig(faults=bad)
    with pytest.raises(ConfigError, match=r"^noise\.faults\.stuck_off=2\.0 is invalid"):
        chip_config(train_cfg(["noise.faults.stuck_off=2.0"]))
    with pytest.raises(ConfigError, match=r"^noise\.pairs\.f=\[\] is invalid"):
        chip_config(train_cfg(["noise.pairs.f=[]"]))
    chip = chip_config(train_cfg(["noise.faults.stuck_on=0.01", "noise.pairs.f=[1,3]"]))
    assert chip.faults.stuck_on == 0.01 and chip.pairs.f == (1.0, 3.0)
    cfg = compose_cfg("evaluate", tmp_path, ["ckpt=x.ckpt", "chip.faults.stuck_on=-1"])
    with pytest.raises(ConfigError, match=r"^chip\.faults\.stuck_on=-1 is invalid"):
        chip_overrides(cfg)


def test_a_device_without_conductances_refuses_them():
    with pytest.raises(ConfigError, match=r"^faults\.stuck_off=.*no conductance pairs"):
        AnalogConfig(device="plain_weights", faults={"stuck_on": 0.1})
    with pytest.raises(ConfigError, match=r"^pairs\.f=.*no conductance pairs"):
        AnalogConfig(device="plain_weights", pairs={"f": [1, 3]})
    assert AnalogConfig(device="plain_weights").device == "plain_weights"


def test_the_extending_guide_device_gets_faults_and_pairs():
    """docs/extending.md's "A device on conductance pairs", run as written in a module that has
    the "Add a device" example's imports: its chips read the fill rule at std 0 and differ
    per chip otherwise; it trains (a fresh chip per sample)."""
    ((lang, code),) = section_blocks(
        ROOT / "docs" / "extending.md", "A device on conductance pairs"
    )
    assert lang == "python"
    module = types.ModuleType("docs_noisy_cell")
    header = "from dataclasses import dataclass\nimport torch\nimport cimsim\n"
    header += "from cimsim.validation import check_number\n"
    sys.modules[module.__name__] = module
    exec(compile(header + code, "extending.md", "exec"), module.__dict__)
    faults, f = {"stuck_off": 0.2, "stuck_on": 0.2}, (1.0, 3.0)
    config = AnalogConfig(
        device="noisy_cell", noisy_cell={"std": 0.0}, faults=faults, pairs={"f": f}
    )
    net = _net((16, 8))
    w = net[0].weight.detach()
    got, layer = _chip(config, net)
    codes, peak = _codes(layer), w.abs().max().item()
    for i, j in [(i, j) for i in range(16) for j in range(8)]:
        want = implied(w[i, j].item(), peak, f, codes[:, i, j].tolist())
        assert got[i, j].item() == pytest.approx(want, abs=1e-6 * peak)
    noisy = AnalogConfig(device="noisy_cell", noisy_cell={"std": 0.5})
    a, _ = _chip(noisy, net, seed=1)
    b, _ = _chip(noisy, net, seed=2)
    assert not torch.equal(a, b) and torch.equal(a, _chip(noisy, net, seed=1)[0])
    model = convert_to_analog(net, noisy).train()
    out = model(torch.randn(4, 8))
    out.sum().backward()  # the gradient reaches the clean weights
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("device", ["relative", "pcm"])
def test_each_crossbar_tile_maps_its_own_range(device):
    """With tiles of 4 input rows, a weight whose devices are all stuck reads its own tile's
    max|W| (PCM's mapping='tile'; the relative device maps per tile too)."""
    config = AnalogConfig(tile_rows=4, faults={"stuck_off": 0.5, "stuck_on": 0.5},
                          **DEVICES[device])  # fmt: skip
    net = _net((16, 8))
    with torch.no_grad():
        net[0].weight[:, 4:] *= 3.0  # the second tile's range is larger
    w = net[0].weight.detach()
    got, layer = _chip(config, net)
    codes = _codes(layer)
    for i, j in [(i, j) for i in range(16) for j in range(8)]:
        peak = w[:, (j // 4) * 4 : (j // 4) * 4 + 4].abs().max().item()
        want = implied(w[i, j].item(), peak, (1.0,), codes[:, i, j].tolist())
        assert got[i, j].item() == pytest.approx(want, abs=1e-5 * peak)


def test_pcm_refuses_to_remap_a_chip_with_stuck_devices():
    """The re-mapping of programmed conductances would move the stuck devices (review finding):
    refused when the chip is built, naming the key."""
    with pytest.raises(ConfigError, match=r"^pcm.remap_programmed=True"):
        AnalogConfig(device="pcm", pcm={"remap_programmed": True}, faults={"stuck_off": 0.01})
    AnalogConfig(device="pcm", pcm={"remap_programmed": True})  # without faults: fine
