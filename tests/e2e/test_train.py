"""HA-SGD training: the step's maths, the LightningModule, and the real train() end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import cimsim
from cimsim import AnalogConfig, ConfigError, convert_to_analog
from cimsim.chip.adc import adcs
from cimsim.chip.convert import build_network
from cimsim.cli.train import train
from cimsim.training.classifier import AnalogClassifier
from cimsim.training.hasgd import hasgd_backward
from conftest import ROOT, authors_scales

WRN = {
    "_target_": "cimsim.wide_resnet.WideResNet",
    "depth": 10,
    "widen_factor": 1,
    "num_classes": 10,
    "in_channels": 1,
}


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


# ----------------------------------------------------------------------------- the HA-SGD step


def test_hasgd_step_is_one_step_on_the_mean_of_per_sample_gradients():
    sigma, L = 0.1, 3
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    analog = convert_to_analog(mlp(), AnalogConfig(sigma=sigma)).train()
    opt = sgd(analog.parameters())
    torch.manual_seed(123)
    opt.zero_grad()
    hasgd_backward(lambda: F.cross_entropy(analog(x), y), L)
    opt.step()

    # By hand: replay the same draws (layer by layer, weight then bias), take the gradient of
    # the digital network at each perturbed point, average, and step once.
    digital = mlp()
    params = dict(digital.named_parameters())
    scales = {}  # the bi-scale mapping: W relative to R, b to R f (authors' match_range)
    for layer in ("0", "2"):
        R, Rf = authors_scales(params[f"{layer}.weight"], params[f"{layer}.bias"])
        scales[f"{layer}.weight"], scales[f"{layer}.bias"] = float(R), float(Rf)
    torch.manual_seed(123)
    mean_grad = {k: torch.zeros_like(p) for k, p in params.items()}
    for _ in range(L):
        perturbed = {
            k: (p + sigma * scales[k] * torch.randn(p.shape)).detach().requires_grad_()
            for k, p in params.items()
        }
        loss = F.cross_entropy(functional_call(digital, perturbed, (x,)), y)
        for k, g in zip(
            perturbed, torch.autograd.grad(loss, list(perturbed.values())), strict=True
        ):
            mean_grad[k] += g / L
    hand_opt = sgd(digital.parameters())
    for k, p in params.items():
        p.grad = mean_grad[k]
    hand_opt.step()
    for (k, a), b in zip(analog.named_parameters(), digital.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)


def tiny_loader(n=32, batch_size=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)  # no shuffle: no RNG used


def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kwargs,
    )


def test_clean_single_sample_is_plain_sgd_bit_for_bit():
    torch.manual_seed(0)
    model = AnalogClassifier(WRN, AnalogConfig(sigma=0.0), L=1, optimizer=sgd)
    torch.manual_seed(0)
    digital = build_network(WRN)
    assert all(
        torch.equal(a, b) for a, b in zip(model.net.parameters(), digital.parameters(), strict=True)
    )
    quiet_trainer(max_steps=2).fit(model, train_dataloaders=tiny_loader())
    opt = sgd(digital.parameters())
    for x, y in tiny_loader():
        opt.zero_grad()
        F.cross_entropy(digital(x), y).backward()
        opt.step()
    for a, b in zip(model.net.state_dict().values(), digital.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_one_optimizer_step_per_batch_whatever_L():
    model = AnalogClassifier(WRN, AnalogConfig(sigma=0.05), L=3, optimizer=sgd)
    calls = []
    model.net.register_forward_hook(lambda *_: calls.append(1))
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(model, train_dataloaders=tiny_loader())
    assert trainer.global_step == 2  # 2 batches -> 2 steps
    assert len(calls) == 6  # L = 3 forwards per step
    tracked = {
        int(m.num_batches_tracked) for m in model.net.modules() if isinstance(m, nn.BatchNorm2d)
    }
    assert tracked == {2}  # BN statistics move once per step, not once per sample


def test_checkpoint_loads_as_the_readme_says(tmp_path):
    model = AnalogClassifier(WRN, AnalogConfig(sigma=0.05), L=2, optimizer=sgd)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, train_dataloaders=tiny_loader())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    # exactly the README's calls (torch's default weights_only=True: no code runs from a file)
    same = AnalogClassifier.load_from_checkpoint(path)
    assert same.L == 2 and same.chip == AnalogConfig(sigma=0.05)
    other = AnalogClassifier.load_from_checkpoint(path, chip=cimsim.AnalogConfig(sigma=0.1))
    assert other.chip.sigma == 0.1
    adc8 = AnalogClassifier.load_from_checkpoint(path, chip=AnalogConfig(sigma=0.2, adc_levels=8))
    assert {a.levels for a in adcs(adc8.net)} == {8}  # the new chip's ADCs are in place
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not any("chip" in k for k in state)  # clean weights only


# ----------------------------------------------------------------------------- train() end to end


def test_a_real_run_checkpoint_is_weights_only_loadable(train_cfg, tmp_path):
    train(train_cfg(["noise.sigma=0.05", "logger=none", "callbacks.robustness=null"]))
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        ckpt = torch.load(path, weights_only=True)  # optimizer, RNG states, data spec: all plain
        assert {"rng_states", "datamodule", "optimizer_states"} <= set(ckpt)


# ----------------------------------------------------------------------------- train() end to end


@pytest.mark.parametrize("L", [1, 3])
def test_train_end_to_end_writes_checkpoint_and_offline_wandb_run(train_cfg, tmp_path, L):
    cfg = train_cfg([f"hasgd.L={L}", "noise.sigma=0.05"])
    metric = train(cfg)
    best = next((tmp_path / "checkpoints").glob("epoch_*.ckpt"))
    # the returned metric is the one the best checkpoint was chosen on
    callbacks = torch.load(best, weights_only=True)["callbacks"]
    scores = [v["best_model_score"] for k, v in callbacks.items() if "ModelCheckpoint" in k]
    assert metric == pytest.approx(float(scores[0]))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_fast_dev_run_still_leaves_a_checkpoint(train_cfg, tmp_path):
    train(train_cfg(["+trainer.fast_dev_run=true", "hasgd.L=3", "logger=none"]))
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("extra", [[], ["quant=in_loop", "quant.adc_levels=4"]])
def test_resume_continues_where_the_run_stopped(train_cfg, tmp_path, extra):
    common = [
        "noise.sigma=0.05",
        "hasgd.L=2",
        "logger=none",
        "test=false",
        "trainer.limit_train_batches=3",
        "hasgd.scheduler.step_size=1",  # the learning rate steps inside the resumed span
        "callbacks.robustness=null",
        *extra,
    ]
    full = train_cfg(common + ["trainer.max_epochs=2"], out=tmp_path / "full")
    train(full)
    first = train_cfg(common + ["trainer.max_epochs=1"], out=tmp_path / "part")
    train(first)  # "killed" after one epoch: last.ckpt is what a crash leaves
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    resumed = train_cfg(
        common + ["trainer.max_epochs=2", f"ckpt_path={last}"], out=tmp_path / "part"
    )
    train(resumed)
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 2 * 3 * 1
    lr = b["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.05 * 0.2**2)  # two schedule steps, one of them after resuming
    # weights, optimizer, schedule and random streams restored: the same run, bit for bit
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    if extra:  # trained with ADCs in the loop: their ranges are part of the checkpoint
        assert any(k.endswith("adc_stem._calibrated") and v for k, v in b["state_dict"].items())


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override, key",
    [
        ("hasgd.L=0", "hasgd.L=0"),
        ("noise.sigma=-1", "noise.sigma=-1"),
        ("noise.distribution=cauchy", "noise.distribution='cauchy'"),
        ("quant.adc_levels=1", "quant.adc_levels=1"),
        ("data.batch_size=0", "data.batch_size=0"),
        ("model.depth=11", "model.depth=11"),
        ("val_chips=-1", "val_chips=-1"),
        ("ckpt_path=/no/such/last.ckpt", "ckpt_path='/no/such/last.ckpt'"),
        ("trainer.max_epochs=-2", "trainer.max_epochs=-2 is invalid: must be the number"),
        ("data=image_folder", "data.root='???' is invalid: not set"),  # root: ???
        ("resume_overrides=sometimes", "resume_overrides='sometimes'"),
    ],
)
def test_bad_values_fail_before_training_naming_the_key(train_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError) as info:
        train(train_cfg([override]))
    assert str(info.value).startswith(key)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["noise=pcm", "noise.pcm.drift_compensation=bogus"], "noise.pcm.drift_compensation"),
        (["+noise.pcm.g_max=-1"], "noise.pcm.g_max"),
        (["quant.adc_levels=1"], "quant.adc_levels"),
    ],
)
def test_a_nested_chip_key_keeps_its_group(train_cfg, overrides, key):
    with pytest.raises(ConfigError) as info:
        train(train_cfg(overrides))
    assert info.value.key == key


@pytest.mark.parametrize(
    "contents, why",
    [
        (lambda path: torch.save({"weights": torch.zeros(2)}, path), "not a checkpoint of train"),
        (lambda path: path.write_bytes(b"not a checkpoint"), "not a PyTorch checkpoint"),
    ],
)
def test_a_foreign_checkpoint_is_refused_naming_ckpt_path(train_cfg, tmp_path, contents, why):
    path = tmp_path / "foreign.ckpt"
    contents(path)
    with pytest.raises(ConfigError, match=why) as info:
        train(train_cfg([f"ckpt_path={path}"]))
    assert info.value.key == "ckpt_path"


def test_missing_cifar_offline_says_where_to_put_it(train_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.root=.*download"):
        train(train_cfg(["data=cifar100", f"paths.data_dir={tmp_path}/nothing"]))


def test_unknown_dataset_is_rejected_with_the_choices(train_cfg):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="digits"):
        train_cfg(["data=imagenet"])


@pytest.mark.parametrize(
    ("bad", "key"), [("hasgd.L=0", "hasgd.L=0"), ("noise.sigma=${nosuch}", "noise.sigma=")]
)
def test_cli_reports_a_bad_value_and_exits_2(tmp_path, bad, key):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", bad, f"hydra.run.dir={run_dir}", "logger=none"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {key}"), lines  # one line
    assert not run_dir.exists()  # the run never started: no folder of Hydra's files left


@pytest.mark.parametrize(
    "script, bad", [("train.py", "trainer.max_epochs=-2"), ("evaluate.py", "ckpt=/no/such.ckpt")]
)
def test_a_run_that_fails_before_starting_leaves_no_folder(tmp_path, script, bad):
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), bad],
        cwd=tmp_path,  # the default run folder: outputs/<task>/...
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("config error:"), proc.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
