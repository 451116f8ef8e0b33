"""Training methods beyond plain HA-SGD: antithetic pairs, noise schedules, distillation, SAM."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cimsim.chip.layers as layers
import cimsim.chip.noise as noise
from cimsim import AnalogConfig, ConfigError, convert_to_analog
from cimsim.chip.noise import antithetic
from cimsim.cli.evaluate import evaluate
from cimsim.cli.train import train
from cimsim.data import DigitsDataModule
from cimsim.robustness.plots import plot_compute
from cimsim.robustness.study import Subject
from cimsim.training.classifier import AnalogClassifier
from cimsim.training.distill import distillation_loss
from cimsim.training.hasgd import hasgd_backward, sam_ascent
from cimsim.training.hessian import hessian_traces
from cimsim.training.methods import TrainingMethods, recipe_label, training_passes
from cimsim.training.schedule import NoiseSchedule
from conftest import authors_scales, compose_cfg


def quadratic_problem():
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    return layer, x, y


def gradient(layer, x, y, **kwargs):
    layer.zero_grad()
    hasgd_backward(lambda: F.mse_loss(layer(x), y), **kwargs)
    return torch.cat([layer.weight.grad.flatten(), layer.bias.grad.flatten()])


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
def test_antithetic_pair_gives_the_digital_gradient_of_a_quadratic_loss(distribution):
    # J(W + dW) is quadratic in dW: its gradient is linear in dW, so +dW and -dW cancel exactly.
    layer, x, y = quadratic_problem()
    digital = gradient(layer, x, y, L=1)
    cfg = AnalogConfig(sigma=0.1, distribution=distribution)
    analog = convert_to_analog(layer, cfg).train()
    torch.manual_seed(1)
    pair = gradient(analog, x, y, L=2, antithetic=True)
    torch.testing.assert_close(pair, digital, rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    iid = gradient(analog, x, y, L=2)
    assert (iid - digital).abs().max() > 100 * (pair - digital).abs().max() + 1e-4


def test_replayed_draws_are_the_recorded_ones_negated(monkeypatch):
    model = convert_to_analog(
        nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Identity(), nn.Flatten()),
        AnalogConfig(sigma=0.1, mean_shift=0.02),
    ).train()
    x = torch.randn(3, 2, 5, 5)
    drawn, served = [], []
    real_draw, real_noise = noise._draw, noise.standard_noise

    def spy_draw(*args):
        drawn.append(real_draw(*args).clone())
        return drawn[-1].clone()

    def spy_noise(*args, **kwargs):
        served.append(real_noise(*args, **kwargs).clone())
        return served[-1].clone()

    monkeypatch.setattr(noise, "_draw", spy_draw)
    monkeypatch.setattr(layers, "standard_noise", spy_noise)
    with antithetic("record"):
        model(x)
    with antithetic("replay"):
        model(x)
    assert len(drawn) == 5  # conv W, b; BN w, b; identity: drawn once, in the record pass
    assert len(served) == 10
    for plus, minus in zip(served[:5], served[5:], strict=True):
        assert torch.equal(minus, -plus)


def test_antithetic_needs_even_L_and_a_matching_forward():
    layer, x, y = quadratic_problem()
    with pytest.raises(ValueError, match="L=3 is invalid with antithetic pairs"):
        gradient(convert_to_analog(layer, AnalogConfig(sigma=0.1)), x, y, L=3, antithetic=True)
    analog = convert_to_analog(layer, AnalogConfig(sigma=0.1)).train()
    with pytest.raises(RuntimeError, match="fewer than recorded"):
        with antithetic("record"):
            analog(x)
        with antithetic("replay"):
            pass


# ----------------------------------------------------------------------------- schedules


def test_noise_schedules():
    assert NoiseSchedule().sigma(0.1, 3.0) == 0.1
    assert NoiseSchedule(kappa=1.5).sigma(0.1, 0.0) == pytest.approx(0.15)
    ramp = NoiseSchedule(kind="ramp", ramp_epochs=4)
    assert [ramp.sigma(0.2, e) for e in (0, 1, 2, 4, 9)] == pytest.approx([0, 0.05, 0.1, 0.2, 0.2])
    uniform = NoiseSchedule(kind="uniform", low=0.5, high=1.5)
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([uniform.sigma(0.1, 0, g) for _ in range(4000)])
    assert draws.min() >= 0.05 and draws.max() <= 0.15
    # U(0.05, 0.15): mean 0.1, std 0.1 / sqrt(12); 5 standard errors
    assert abs(draws.mean().item() - 0.1) < 5 * (0.1 / 12**0.5) / 4000**0.5
    with pytest.raises(ConfigError, match="^kind='cosine'"):
        NoiseSchedule(kind="cosine")
    with pytest.raises(ConfigError, match="^high=0.1"):
        NoiseSchedule(kind="uniform", low=0.5, high=0.1)


# ----------------------------------------------------------------------------- distillation


def test_distillation_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.arange(5) % 4
    T, beta = 3.0, 0.3
    p_t, p_s = (t / T).softmax(1), (s / T).softmax(1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    expected = (1 - beta) * F.cross_entropy(s, y) + beta * T * T * kl
    torch.testing.assert_close(distillation_loss(s, t, y, beta, T), expected)
    torch.testing.assert_close(distillation_loss(s, t, y, 0.0, T), F.cross_entropy(s, y))
    assert distillation_loss(s, s, y, 1.0, T).item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- SAM


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_ascent_moves_the_weights_by_the_formula_and_restores_them(adaptive):
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([[0.5], [3.0]])
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([[0.0], [12.0]])
    before = [a.clone(), b.clone()]
    rho = 0.1
    if adaptive:  # e = rho |w|^2 g / || |w| g ||
        scaled = [a.abs() * a.grad, b.abs() * b.grad]
        norm = torch.cat([x.flatten() for x in scaled]).norm()
        expected = [rho * a.abs() * scaled[0] / norm, rho * b.abs() * scaled[1] / norm]
    else:  # e = rho g / ||g||, ||g|| = 13
        expected = [rho * a.grad / 13, rho * b.grad / 13]
    with sam_ascent([a, b], rho, adaptive):
        torch.testing.assert_close(a - before[0], expected[0])
        torch.testing.assert_close(b - before[1], expected[1])
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["hasgd.antithetic=true", "hasgd.L=3"], r"^hasgd\.antithetic=True is invalid: .*even L"),
        (["noise.schedule.kind=cosine"], r"^noise\.schedule\.kind='cosine' is invalid"),
        (["hasgd.sam.rho=-1"], r"^hasgd\.sam\.rho=-1 is invalid"),
        (["distill.teacher=/no/such.ckpt"], r"^distill\.teacher='/no/such.ckpt' is invalid"),
        (["distill.beta=2"], r"^distill\.beta=2 is invalid"),
        (["noise=pcm", "hasgd.antithetic=true", "hasgd.L=2"], r"^hasgd\.antithetic=True .*PCM"),
    ],
)
def test_bad_method_settings_fail_before_training(train_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(train_cfg(overrides))
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- comparison


def test_recipe_labels_name_every_method_and_compute_counts_passes(tmp_path):
    chip = AnalogConfig(sigma=0.1)
    plain = recipe_label(chip, 4)
    sam = TrainingMethods(sam_rho=0.05, antithetic=True, schedule={"kind": "ramp"})
    assert plain == "train sigma=0.1, L=4"
    assert recipe_label(chip, 4, sam) == "train sigma=0.1, L=4, antithetic, ramp 10 ep, SAM 0.05"
    assert training_passes(100, 4, TrainingMethods()) == 400
    assert training_passes(100, 4, sam) == 500  # the ascent pass
    summary = [
        {"model": m, "sigma": s, "mean_shift": 0.0, "acc_mean": a, "acc_ci95": 0.01, "chips": 20}
        for m, a0, a in (("a", 0.9, 0.5), ("b", 0.95, 0.7))
        for s, a in ((0.0, a0), (0.1, a))
    ]
    subjects = [
        Subject("a", nn.Identity(), None, passes=400),
        Subject("b", nn.Identity(), None, passes=500),
    ]
    table, plot = plot_compute(summary, subjects, 0.1, tmp_path)
    rows = list(csv.DictReader(open(table)))
    assert [(r["model"], int(r["passes"]), float(r["acc_mean"])) for r in rows] == [
        ("a", 400, 0.5),
        ("b", 500, 0.7),
    ]
    assert plot.stat().st_size > 0
    with pytest.raises(ConfigError, match="^target_sigma=0.05"):
        plot_compute(summary, subjects, 0.05, tmp_path)


def test_distilled_training_runs_and_its_checkpoint_holds_no_teacher(train_cfg, tmp_path):
    common = ["logger=none", "test=false", "callbacks.robustness.final=null"]
    train(train_cfg(common, out=tmp_path / "teacher"))
    teacher = tmp_path / "teacher" / "checkpoints" / "last.ckpt"
    cfg = train_cfg([*common, "noise.sigma=0.1", f"distill.teacher={teacher}"], out=tmp_path / "s")
    train(cfg)
    ckpt = next((tmp_path / "s" / "checkpoints").glob("epoch_*.ckpt"))
    state = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("teacher") for k in state["state_dict"])
    assert state["hyper_parameters"]["methods"]["teacher"] == str(teacher)


def test_antithetic_pair_keeps_the_mean_shift():
    # a pair averages the gradient at w + R mu + dw and w + R mu - dw: on a quadratic loss this
    # is exactly the digital gradient at the shifted weights w + R mu (b + R f mu)
    layer, x, y = quadratic_problem()
    R, Rf = authors_scales(layer.weight, layer.bias)
    shifted = nn.Linear(6, 3)
    with torch.no_grad():
        shifted.weight.copy_(layer.weight + R * 0.05)
        shifted.bias.copy_(layer.bias + Rf * 0.05)
    expected = gradient(shifted, x, y, L=1)
    analog = convert_to_analog(layer, AnalogConfig(sigma=0.1, mean_shift=0.05)).train()
    torch.testing.assert_close(gradient(analog, x, y, L=2, antithetic=True), expected)


def test_hessian_monitor_logs_the_estimate_of_the_saved_weights(train_cfg, tmp_path):
    cfg = train_cfg(
        [
            "logger=csv",
            "test=false",
            "noise.sigma=0.1",
            "callbacks.robustness.final=null",
            "callbacks.hessian.every_n_epochs=1",
            "callbacks.hessian.probes=4",
        ]
    )
    train(cfg)
    logged = list(csv.DictReader(open(next(tmp_path.glob("csv/*/metrics.csv")))))
    value = next(float(r["hessian/trace_weighted"]) for r in logged if r["hessian/trace_weighted"])
    # recompute from the checkpoint of that epoch, on the same batch with the same probes
    model = AnalogClassifier.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    dm = DigitsDataModule(batch_size=64, seed=42)
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    net = model.net.eval()
    _, (total, _) = hessian_traces(
        net, lambda: F.cross_entropy(net(x), y), 4, torch.Generator().manual_seed(0)
    )
    assert value == pytest.approx(total, rel=1e-4)


def test_evaluate_hessian_writes_the_estimate_and_the_prediction(train_cfg, tmp_path):
    train(train_cfg(["logger=none", "test=false", "callbacks.robustness.final=null"]))
    ckpt = next((tmp_path / "checkpoints").glob("epoch_*.ckpt"))
    cfg = compose_cfg(
        "evaluate",
        tmp_path / "eval",
        [
            f"ckpt={ckpt}",
            "hessian=true",
            "hessian_probes=4",
            "hessian_batches=1",
            "robustness.chips=2",
            "robustness.sigmas=[0.0,0.02]",
            "progress=false",
            "wandb.enabled=false",
        ],
    )
    evaluate(cfg)
    (row,) = csv.DictReader(open(tmp_path / "eval" / "hessian.csv"))
    model = AnalogClassifier.load_from_checkpoint(ckpt)
    dm = DigitsDataModule(batch_size=64, seed=42)
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    net = model.net.eval()
    _, (total, se) = hessian_traces(
        net, lambda: F.cross_entropy(net(x), y), 4, torch.Generator().manual_seed(0)
    )
    assert float(row["weighted"]) == pytest.approx(total, rel=1e-4)
    assert float(row["weighted_se"]) == pytest.approx(se, rel=1e-4) and row["probes"] == "4"
    assert (tmp_path / "eval" / "robustness_loss_prediction.png").stat().st_size > 0


def test_a_target_sigma_off_the_grid_fails_before_any_work(tmp_path):
    ckpt = tmp_path / "never_loaded.ckpt"
    ckpt.write_bytes(b"")
    cfg = compose_cfg(
        "evaluate",
        tmp_path,
        [f"ckpt={ckpt}", "robustness.target_sigma=0.11", "wandb.enabled=false"],
    )
    with pytest.raises(ConfigError, match=r"^robustness\.target_sigma=0\.11 is invalid"):
        evaluate(cfg)
