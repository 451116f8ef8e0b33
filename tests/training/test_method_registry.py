"""A training method defined and registered outside the package joins every place methods act."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from cimsim import AnalogConfig, ConfigError
from cimsim.cli.train import train, training_methods
from cimsim.training.method import METHODS, RESERVED_SETTINGS
from cimsim.training.methods import (
    Setting,
    TrainingMethod,
    TrainingMethods,
    passes_per_step,
    recipe_label,
    register_method,
    training_passes,
)
from cimsim.validation import check_number


class Probe(TrainingMethod):
    """Scales the loss, one extra pass per step; records the hooks that ran."""

    settings = {
        "probe_scale": Setting(0.0, "probe.scale"),
        "probe_even": Setting(False, "probe.even"),
    }
    calls: list[str] = []

    def validate(self, s):
        check_number("probe_scale", s["probe_scale"], minimum=0.0)

    def check(self, m, chip, L):
        if m.probe_even and L % 2:
            raise ConfigError("probe.even", True, f"needs an even L (hasgd.L={L})")

    def label(self, m):
        return [f"probe {m.probe_scale:g}"] if m.probe_scale else []

    def extra_passes(self, m):
        return 1 if m.probe_scale else 0

    def loss(self, m, module, x, y, loss):
        if not m.probe_scale:
            return loss
        self.calls.append("loss")
        return lambda logits: m.probe_scale * loss(logits)

    @contextmanager
    def around_samples(self, m, step):
        self.calls.append("around")
        yield
        self.calls.append(f"grads {all(p.grad is not None for p in step.net.parameters())}")

    def sample(self, m, i):
        self.calls.append(f"sample {i}")
        return super().sample(m, i)


@pytest.fixture
def probe():
    method = register_method("probe", Probe())
    Probe.calls = []
    yield method
    METHODS.pop("probe")  # later tests' checkpoints must not carry its settings


def test_a_registered_method_has_settings_a_label_and_passes(probe):
    assert TrainingMethods().probe_scale == 0.0
    m = TrainingMethods(probe_scale=0.5, sam_rho=0.05)
    assert m.asdict()["probe_scale"] == 0.5 and m.asdict()["sam_rho"] == 0.05
    chip = AnalogConfig(sigma=0.1)
    assert recipe_label(chip, 4, m) == "train sigma=0.1, L=4, SAM 0.05, probe 0.5"
    assert training_passes(10, 4, m) == 60 and passes_per_step(4, m) == 6
    with pytest.raises(ConfigError, match="^probe_scale=-1 is invalid"):
        TrainingMethods(probe_scale=-1)
    with pytest.raises(ConfigError, match="^probe.even=True is invalid: needs an even L"):
        TrainingMethods(probe_even=True).check(chip, 3)


def test_settings_belong_to_one_method_and_unknown_ones_fail(probe):
    class Thief(TrainingMethod):
        settings = {"sam_rho": Setting(0.0, "thief.rho")}

    with pytest.raises(ValueError, match="belong to another method"):
        register_method("thief", Thief())
    METHODS.pop("probe")
    with pytest.raises(ConfigError, match="^probe_scale=0.5 is invalid: no registered"):
        TrainingMethods(probe_scale=0.5)
    register_method("probe", probe)


@pytest.mark.parametrize("field", ["passes", "label", "check", "sigma", "asdict", "_x", "a-b"])
def test_a_setting_may_not_hide_an_attribute_of_training_methods(field):
    class Shadow(TrainingMethod):
        settings = {field: Setting(4, "shadow.value")}

    with pytest.raises(ValueError, match=rf"^shadow: setting '{field}' (is taken|must be an id)"):
        register_method("shadow", Shadow())
    assert "shadow" not in METHODS and TrainingMethods().passes(4) == 4


def test_the_reserved_settings_cover_every_attribute_of_training_methods():
    assert set(dir(TrainingMethods)) <= RESERVED_SETTINGS


def test_a_registered_method_trains_from_its_config_keys(probe, train_cfg, tmp_path):
    common = ["logger=none", "test=false", "callbacks.robustness.final=null", "noise.sigma=0.1"]
    with pytest.raises(ConfigError, match=r"^probe\.scale=-2 is invalid"):
        training_methods(train_cfg([*common, "+probe.scale=-2"]))
    train(train_cfg([*common, "hasgd.L=2", "+probe.scale=0.5"]))
    assert Probe.calls[:5] == ["loss", "around", "sample 0", "sample 1", "grads True"]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["hyper_parameters"]["methods"]["probe_scale"] == 0.5
