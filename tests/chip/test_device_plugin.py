"""Devices are plug-ins: a toy device defined only here runs through the whole simulator.

The toy sticks a fixed fraction ``p`` of the weights at zero, drawn from the chip seed. It is
registered from ``TOY`` (the source of a plug-in module: imported here, and by ``evaluate.py
plugins=[...]`` in a subprocess) and checked with statistics (the stuck fraction within 5
binomial standard errors) and against the network computed by hand. A scan of the sources
checks that no device's name decides a branch outside its own file.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import cimsim
from cimsim import AnalogConfig, ConfigError, convert_to_analog, program_chip, set_noise, set_time
from cimsim.chip.devices import load_plugins, variant_lists
from cimsim.chip.devices.registry import RESERVED_VARIANTS
from cimsim.cli.train import chip_config, train
from cimsim.robustness.grid import EvalSettings, RobustnessGrid
from cimsim.robustness.measure import check_time_sweep, evaluate_robustness
from cimsim.training.classifier import AnalogClassifier
from cimsim.training.method import method_settings
from conftest import FAST, ROOT, compose_cfg

TOY = '''
"""A toy device: a fraction p of the weights stuck at zero."""

from dataclasses import dataclass

import torch

import cimsim
from cimsim.chip.noise import tensor_seed
from cimsim.validation import check_number


@dataclass(frozen=True)
class StuckConfig:
    p: float = 0.01  # the fraction of devices stuck at zero

    def __post_init__(self):
        check_number("p", self.p, minimum=0.0, maximum=1.0)


class StuckWeights:
    """One programmed weight tensor: which devices are stuck, drawn from the chip seed."""

    def __init__(self, weight, p, seed, name):
        g = torch.Generator().manual_seed(tensor_seed(seed, name))
        self.stuck = (torch.rand(weight.shape, generator=g) < p).to(weight.device)
        self.weight = weight.detach().clone()

    def read(self, t_inference, repetition=0, periphery=None):
        w = self.weight.masked_fill(self.stuck, 0.0)
        return w, torch.ones((), dtype=w.dtype, device=w.device)


class StuckAtZero(cimsim.Device):
    def label(self, chip):
        return f"stuck p={self.config.p:g}"

    def program(self, weight, seed, name, tiles=None):
        return StuckWeights(weight, self.config.p, seed, name)

    def training_perturbation(self, weight, t_train, tiles=None):
        stuck = torch.rand(weight.shape, device=weight.device) < self.config.p
        return torch.where(stuck, -weight, torch.zeros_like(weight)).detach()


cimsim.register_device("stuck", StuckConfig, StuckAtZero)
'''
TOY_MODULE = "toy_stuck_device"


def _import_toy() -> types.ModuleType:
    module = sys.modules[TOY_MODULE] = types.ModuleType(TOY_MODULE)
    exec(compile(TOY, f"<{TOY_MODULE}>", "exec"), module.__dict__)
    return module


toy = _import_toy()


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def within_binomial(stuck: torch.Tensor, p: float) -> None:
    """The stuck fraction of ``stuck`` (bool) is p within 5 standard errors."""
    n = stuck.numel()
    se = math.sqrt(p * (1 - p) / n)
    assert abs(stuck.float().mean().item() - p) <= 5 * se + 1e-12, (stuck.float().mean(), p, n)


# ----------------------------------------------------------------------------- the toy device


def test_the_toy_config_is_validated_and_named():
    chip = AnalogConfig(device="stuck", stuck={"p": 0.25})
    assert chip.stuck == toy.StuckConfig(p=0.25) and chip.device_model.config.p == 0.25
    assert AnalogConfig(**chip.as_dict()) == chip  # as a checkpoint stores it
    assert chip.as_dict()["stuck"] == {"p": 0.25} and "stuck" in AnalogConfig.setting_keys()
    for p in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=rf"^stuck\.p={p} is invalid"):
            AnalogConfig(device="stuck", stuck={"p": p})
    with pytest.raises(ConfigError, match=r"^stuck='x' is invalid"):
        AnalogConfig(device="stuck", stuck="x")
    with pytest.raises(ConfigError, match=r"^device='nope' is invalid: .*'stuck'"):
        AnalogConfig(device="nope")
    assert chip.override({"stuck": {"p": 0.5}}).stuck.p == 0.5
    assert AnalogConfig().override({"device": "stuck"}).stuck == toy.StuckConfig()


# A checkpoint's hparams ``chip`` as every train.py before devices were plug-ins wrote it
# (dataclasses.asdict of the AnalogConfig that had a ``pcm`` field).
OLD_CHIP = {
    "sigma": 0.0, "mean_shift": 0.0, "distribution": "gaussian", "scale": "half_range",
    "per_channel": False, "bias": "separate", "analog_bn": True, "identity_noise": True,
    "identity_draws": "element", "identity_mean_shift": False, "adc_levels": None,
    "adc_placement": "block", "device": "pcm",
    "pcm": {"g_max": 20.0, "t0": 20.0, "t_read": 2.5e-07, "prog_noise_scale": 1.0,
            "read_noise_scale": 1.0, "drift_scale": 1.0, "drift_compensation": "none",
            "compensation_read": "periphery", "mapping": "tile", "remap_programmed": False},
    "t_train": 3600.0, "tile_rows": None, "dac_levels": None, "dac_range": "per_vector",
    "out_ref": "normalized", "tile_adc_levels": None, "out_bound": 12.0, "out_noise": 0.0,
    "w_read_noise": 0.0,
}  # fmt: skip


@pytest.mark.parametrize("device", ["pcm", "relative"])
def test_checkpoints_written_before_devices_were_plugins_load_and_are_written_alike(device):
    old = {**OLD_CHIP, "device": device}
    chip = AnalogConfig(**old)
    assert chip.device == device and chip.pcm.g_max == (20.0 if device == "pcm" else 25.0)
    assert chip.device_model.timed == (device == "pcm")
    expected = old if device == "pcm" else {**old, "pcm": dataclasses.asdict(chip.pcm)}
    assert chip.as_dict() == expected and list(chip.as_dict()) == list(OLD_CHIP)
    assert AnalogConfig(**dataclasses.asdict(chip)) == chip  # the new dataclass form loads too


def test_registration_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="lowercase identifier"):
        cimsim.register_device("Stuck-2", toy.StuckConfig, toy.StuckAtZero)
    noise_keys = [s.key.split(".")[1] for s in method_settings().values() if s.key[:6] == "noise."]
    for name in ["sigma", "plugins", "schedule", *noise_keys]:  # chip_config pops noise.schedule
        with pytest.raises(ValueError, match=rf"^device name '{name}' is taken by an AnalogConf"):
            cimsim.register_device(name, toy.StuckConfig, toy.StuckAtZero)
    with pytest.raises(TypeError, match="must be a dataclass"):
        cimsim.register_device("stuck2", dict, toy.StuckAtZero)
    with pytest.raises(TypeError, match="must subclass cimsim.Device"):
        cimsim.register_device("stuck2", toy.StuckConfig, object)
    with pytest.raises(ValueError, match="built in"):
        cimsim.register_device("pcm", toy.StuckConfig, toy.StuckAtZero)
    for key, why in [
        ("compensations", "is declared by device 'pcm'"),
        ("sigmas", "is a robustness preset"),
    ]:
        variant = type("Variant", (toy.StuckAtZero,), {"variants": {key: "p"}})
        with pytest.raises(ValueError, match=rf"^device 'stuck2': variants key '{key}' {why}"):
            cimsim.register_device("stuck2", toy.StuckConfig, variant)
    assert "stuck2" not in cimsim.device_names() and "stuck" in cimsim.device_names()
    assert variant_lists() == {"compensations": ("pcm", "drift_compensation")}


def test_the_reserved_variant_keys_are_the_robustness_presets_own():
    keys = {f.name for f in dataclasses.fields(RobustnessGrid)}
    for path in (ROOT / "conf" / "robustness").rglob("*.yaml"):
        keys |= set(OmegaConf.load(path)) - set(variant_lists())  # compensations: pcm's
    assert keys - RESERVED_VARIANTS == set()


def test_an_unknown_device_key_names_itself_and_plugins(train_cfg):
    why = r"is invalid: is neither a chip setting nor a registered .* plugins=\[module\]$"
    with pytest.raises(ConfigError, match=rf"^stuck2={{'p': 0.1}} {why}"):  # a checkpoint's
        AnalogConfig(**{**OLD_CHIP, "stuck2": {"p": 0.1}})
    with pytest.raises(ConfigError, match=rf"^sigmaa=0.1 {why}"):
        AnalogConfig(sigmaa=0.1)
    with pytest.raises(ConfigError, match=why) as err:  # train.py without plugins=[module]
        chip_config(train_cfg(["noise.device=relative", "+noise.stuck2.p=0.1"]))
    assert err.value.key == "noise.stuck2"


def test_a_plugin_module_run_again_keeps_the_chips_built_before():
    model = convert_to_analog(net(), AnalogConfig(device="stuck", stuck={"p": 0.1}))
    old = model[0].config.stuck
    try:
        rerun = _import_toy()  # a notebook cell run again: new classes of the same names
        assert rerun.StuckConfig is not toy.StuckConfig
        set_noise(model, sigma=0.05)  # a chip of the old class, read as the new one
        assert model[0].config.stuck == rerun.StuckConfig(p=0.1)
        assert isinstance(model[0].config.device_model, rerun.StuckAtZero)
        assert AnalogConfig(device="stuck", stuck=old).stuck == rerun.StuckConfig(p=0.1)
        within_binomial(program_chip(model.eval(), 0)[2].device_state.stuck, 0.1)
        other = dataclasses.make_dataclass("StuckConfig2", [("p", float, 0.0)], frozen=True)
        with pytest.raises(ValueError, match=r"with config toy_stuck_device\.StuckConfig, not"):
            cimsim.register_device("stuck", other, rerun.StuckAtZero)
        cimsim.register_device("stuck", other, rerun.StuckAtZero, replace=True)  # deliberate
        with pytest.raises(ConfigError, match=r"^device_config=.* must be a types.StuckConfig2"):
            AnalogConfig(device="stuck", device_config=old)
    finally:
        sys.modules[TOY_MODULE] = toy
        cimsim.register_device("stuck", toy.StuckConfig, toy.StuckAtZero, replace=True)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_a_programmed_toy_chip_sticks_p_of_its_weights_drawn_from_the_seed(p):
    digital = net()
    chip = convert_to_analog(digital, AnalogConfig(device="stuck", stuck={"p": p})).eval()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    program_chip(chip, 7)
    masks = [chip[i].device_state.stuck for i in (0, 2)]
    for mask, i in zip(masks, (0, 2), strict=True):
        within_binomial(mask, p)
        assert torch.equal(chip[i].chip_read_weight, digital[i].weight.masked_fill(mask, 0.0))
    assert not torch.equal(masks[0][:10, :10], masks[1][:10, :10])  # per tensor name
    with torch.no_grad():  # by hand: the stuck weights, the biases digital (sigma = 0)
        h = F.relu(F.linear(x, digital[0].weight * ~masks[0], digital[0].bias))
        expected = F.linear(h, digital[2].weight * ~masks[1], digital[2].bias)
        torch.testing.assert_close(chip(x), expected, rtol=1e-6, atol=1e-6)
        program_chip(chip, 7)
        assert torch.equal(chip[0].device_state.stuck, masks[0])  # the same seed, the same chip
        program_chip(chip, 8)
        within_binomial(chip[0].device_state.stuck ^ masks[0], 2 * p * (1 - p))  # independent


def test_training_draws_a_fresh_toy_chip_each_forward():
    p = 0.3
    layer = convert_to_analog(nn.Linear(64, 128), AnalogConfig(device="stuck", stuck={"p": p}))
    layer.train()
    eye = torch.eye(64)
    torch.manual_seed(3)
    with torch.no_grad():
        w1 = (layer(eye) - layer.bias).t()  # the weights this forward computed with
        w2 = (layer(eye) - layer.bias).t()
    stuck1, stuck2 = w1 == 0, w2 == 0
    within_binomial(stuck1, p)
    within_binomial(stuck1 ^ stuck2, 2 * p * (1 - p))  # fresh draws, independent
    torch.testing.assert_close(w1[~stuck1], layer.weight[~stuck1], rtol=1e-5, atol=1e-6)
    layer(eye).sum().backward()  # the perturbation is a constant: the gradient reaches W
    assert torch.count_nonzero(layer.weight.grad) > 0


def test_set_time_refuses_a_device_that_does_not_move_in_time():
    chip = program_chip(convert_to_analog(net(), AnalogConfig(device="stuck")), 0)
    with pytest.raises(ConfigError, match=r"^device='stuck' is invalid: set_time needs a prog"):
        set_time(chip, 60.0)
    with pytest.raises(ConfigError, match=r"^times=\[60\.0\] is invalid: a time sweep needs"):
        check_time_sweep(chip, RobustnessGrid(sigmas=[0.0], chips=1, times=[60.0]))
    timed = program_chip(convert_to_analog(net(), AnalogConfig(device="pcm")).eval(), 0)
    set_time(timed, 60.0)  # a timed device moves
    assert timed[0].chip_time == (60.0, 0)


def test_the_robustness_api_measures_toy_chips():
    digital = net()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 64, generator=g)
    y = digital(x).argmax(1)  # the digital network is right on every sample
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    grid = RobustnessGrid(sigmas=[0.0], chips=4)
    accs = {}
    for p in (0.0, 0.5, 1.0):
        model = convert_to_analog(digital, AnalogConfig(device="stuck", stuck={"p": p}))
        result = evaluate_robustness(model.eval(), loader, grid, EvalSettings(progress=False))
        accs[p] = [r.acc for r in result.rows]
        assert [r.n for r in result.rows] == [64] * 4
    assert accs[0.0] == [1.0] * 4  # no stuck device: the digital network
    constant = (y == digital[2].bias.argmax()).float().mean().item()  # every weight at zero
    assert accs[1.0] == [pytest.approx(constant)] * 4  # every weight stuck: the biases decide
    assert len(set(accs[0.5])) > 1 and max(accs[0.5]) < 1.0  # chip to chip variation


def test_a_plugin_device_trains_with_hydra_and_names_its_keys(train_cfg):
    overrides = ["noise.device=stuck", "+noise.stuck.p=0.2", f"plugins=[{TOY_MODULE}]"]
    assert chip_config(train_cfg(overrides)).stuck.p == 0.2
    with pytest.raises(ConfigError) as err:
        chip_config(train_cfg(["noise.device=stuck", "+noise.stuck.p=2"]))
    assert err.value.key == "noise.stuck.p"
    with pytest.raises(ConfigError, match=r"^hasgd\.antithetic=True .*stuck draws are not"):
        train(train_cfg([*overrides, "hasgd.antithetic=true", "hasgd.L=2"]))


def test_load_plugins_names_the_key():
    assert [m.__name__ for m in load_plugins([TOY_MODULE])] == [TOY_MODULE]
    with pytest.raises(ConfigError, match=r"^plugins='no_such_module_xyz' is invalid: cannot"):
        load_plugins(["no_such_module_xyz"])
    with pytest.raises(ConfigError, match=r"^plugins='mod' is invalid: must be a list"):
        load_plugins("mod")


# ----------------------------------------------------------------------------- evaluate.py


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_ckpt")
    extra = ["logger=none", "test=false", "callbacks.robustness=null"]
    train(compose_cfg("train", out, FAST + extra))
    return out / "checkpoints" / "last.ckpt"


@torch.no_grad()
def accuracy(ckpt: Path, stuck_all: bool) -> float:
    """The checkpoint's test accuracy digitally, or with every Conv/Linear weight at zero."""
    model = AnalogClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    net = model.net.eval()
    if stuck_all:
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.zero_()
    data = instantiate(torch.load(ckpt, weights_only=True)["datamodule"])
    data.setup("test")
    correct, n = 0, 0
    for x, y in data.test_dataloader():
        correct += (net(x).argmax(1) == y).sum().item()
        n += len(y)
    return correct / n


@pytest.mark.slow  # end-to-end: a subprocess of an entry script
def test_evaluate_py_runs_a_plugin_device(tiny_checkpoint, tmp_path):
    (tmp_path / f"{TOY_MODULE}.py").write_text(TOY)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    args = [sys.executable, "evaluate.py", f"ckpt={tiny_checkpoint}", "chip.device=stuck",
            f"plugins=[{TOY_MODULE}]", "+robustness.variants=[{stuck:{p:0.0}},{stuck:{p:1.0}}]",
            "robustness.chips=2", "robustness.sigmas=[0.0]", "progress=false",
            "wandb.enabled=false", f"hydra.run.dir={tmp_path / 'out'}"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "out" / "robustness_rows.csv") as f:
        rows = list(csv.DictReader(f))
    recipe = "train sigma=0, L=1 | chip device=stuck, stuck.p="
    assert [r["model"] for r in rows] == [f"{recipe}0.0"] * 2 + [f"{recipe}1.0"] * 2
    clean, stuck = accuracy(tiny_checkpoint, False), accuracy(tiny_checkpoint, True)
    assert [float(r["acc"]) for r in rows] == pytest.approx([clean] * 2 + [stuck] * 2)
    bad = subprocess.run(args[:4] + ["plugins=[no_such_module_xyz]", *args[6:]], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: plugins='no_such_module_xyz'")


# ----------------------------------------------------------------------------- no name branches

SOURCES = sorted((ROOT / "src" / "cimsim").rglob("*.py")) + [
    ROOT / "train.py",
    ROOT / "evaluate.py",
]


def _tokens(identifier: str) -> set[str]:
    """The lowercase words of an identifier: ``is_pcm`` -> {is, pcm}, ``PCMWeights`` -> {pcm,
    weights}."""
    return {w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", identifier)}


def device_branches(source: str, names: set[str]) -> list[tuple[int, str]]:
    """``(line, what)`` for each place in ``source`` where a device decides: a comparison with a
    device's name, a test (if, while, assert, conditional expression, comprehension filter) that
    mentions a device's name or an identifier with it (``chip.pcm_device``, ``layer._pcm``,
    ``is_pcm(net)``), or a device's config looked up by name (``overrides.get("pcm")``,
    ``x["pcm"]``, ``{"pcm": ...}``)."""

    def mention(node: ast.AST) -> str | None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Constant) and sub.value in names:
                return repr(sub.value)
            ident = getattr(sub, "id", None) or getattr(sub, "attr", None)
            if isinstance(ident, str) and _tokens(ident) & names:
                return ident
        return None

    hits = []
    for node in ast.walk(ast.parse(source)):
        tests = []
        if isinstance(node, ast.If | ast.IfExp | ast.While | ast.Assert):
            tests = [node.test]
        elif isinstance(node, ast.comprehension):
            tests = node.ifs
        elif isinstance(node, ast.Compare):
            tests = [node]
        elif isinstance(node, ast.match_case) and node.guard is not None:
            tests = [node.guard]
        elif isinstance(node, ast.Subscript):
            tests = [node.slice] if isinstance(node.slice, ast.Constant) else []
        elif isinstance(node, ast.Dict):
            tests = [k for k in node.keys if isinstance(k, ast.Constant)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("get", "pop"):
            tests = node.args[:1]
        hits += [(t.lineno, m) for t in tests if (m := mention(t)) is not None]
    return sorted(set(hits))


def test_the_scan_finds_the_branches_devices_used_to_take():
    planted = """
if chip.pcm_device:
    pass
times = [t] if layer._pcm is not None else [None]
ok = config.device == "pcm" or is_pcm(net)
nested = overrides.get("pcm") or {}
merged = {**overrides, "pcm": nested}
layers = [m for m in model.modules() if isinstance(m, PCMWeights)]
assert device in ("relative", "other")
"""
    found = [line for line, _ in device_branches(planted, {"pcm", "relative"})]
    assert found == [2, 4, 5, 6, 7, 8, 9]
    assert device_branches("if chip.device_model.timed:\n    pass\n", {"pcm"}) == []


def test_no_device_name_in_branches():
    names = set(cimsim.device_names())
    assert {"relative", "pcm", "stuck"} <= names
    own = {ROOT / "src" / "cimsim" / "chip" / "devices" / f"{n}.py" for n in names}
    found = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in SOURCES
        if path not in own
        for line, what in device_branches(path.read_text(), names)
    ]
    assert not found, (
        "a device decides outside its own file (ask its Device instead):\n" + "\n".join(found)
    )
