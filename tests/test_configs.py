"""Every file of every config group composes, and what it describes instantiates."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cimsim import AnalogConfig, ConfigError
from cimsim.chip.convert import build_network
from cimsim.cli.train import chip_config, training_methods
from cimsim.validation import config_scope
from conftest import CONF, compose_cfg

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
CHOICES = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_choices():
    assert {
        "data",
        "model",
        "noise",
        "hasgd",
        "quant",
        "trainer",
        "logger",
        "callbacks",
        "experiment",
        "paths",
    } <= set(GROUPS)


def image_tree(root):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (12, 12), (40, 80, 120)).save(root / split / cls / "0.png")
    return root


def check_data(cfg, tmp_path):
    if cfg.data._target_.endswith("CIFARDataModule"):
        with pytest.raises(ConfigError, match=r"^data\.root=.*download"):  # no CIFAR files here
            with config_scope("data"):
                instantiate(cfg.data)
        return
    if cfg.data._target_.endswith("ImageFolderDataModule"):
        cfg.data.root = str(image_tree(tmp_path / "images"))
    dm = instantiate(cfg.data)
    assert dm.num_classes >= 2 and dm.in_channels in (1, 3)


def check(cfg, group, tmp_path):
    """Instantiate the part of ``cfg`` that ``group`` configures."""
    if group in ("noise", "quant"):
        assert chip_config(cfg).noisy == (cfg.noise.sigma != 0 or cfg.noise.mean_shift != 0)
    elif group == "model":
        net = build_network(
            {**OmegaConf.to_container(cfg.model), "num_classes": 10, "in_channels": 1}
        )
        assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    elif group == "hasgd":
        hasgd = instantiate(cfg.hasgd)
        opt = hasgd.optimizer([torch.nn.Parameter(torch.zeros(2))])
        assert hasgd.L >= 1 and hasgd.scheduler(opt) is not None
    elif group == "data":
        check_data(cfg, tmp_path)
    elif group == "trainer":
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            assert cfg.trainer._target_ == "pytorch_lightning.Trainer"  # composes; no GPU here
        else:
            instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    elif group in ("logger", "callbacks"):
        for node in (cfg.get(group) or {}).values():
            assert instantiate(node) is not None
    elif group == "robustness":
        from cimsim.cli.evaluate import grid_for
        from cimsim.robustness.grid import SWEEPS

        assert (
            grid_for(cfg).for_chip(AnalogConfig(sigma=0.05)).chips >= 1
            and cfg.robustness.x in SWEEPS
        )
    elif group == "method":
        assert OmegaConf.to_container(cfg, resolve=True)
        if cfg.distill.teacher:  # the sweep's job 0 is the teacher: it does not exist yet here
            with pytest.raises(ConfigError, match=r"^distill\.teacher=.*/0/checkpoints/last"):
                training_methods(cfg)
        else:
            assert training_methods(cfg).schedule.kappa > 0
    elif group == "experiment":
        check_data(cfg, tmp_path)
        assert OmegaConf.to_container(cfg, resolve=True)
    else:
        assert OmegaConf.to_container(cfg[group], resolve=True) is not None


@pytest.mark.parametrize("group, choice", CHOICES, ids=[f"{g}/{c}" for g, c in CHOICES])
def test_config_composes_and_instantiates(train_cfg, tmp_path, group, choice):
    if group == "robustness":  # evaluate.py's group
        cfg = compose_cfg("evaluate", tmp_path, [f"{group}={choice}"])
    else:
        cfg = train_cfg([f"{group}={choice}"])
    check(cfg, group, tmp_path)


def test_paper_experiment_has_the_authors_settings(tmp_path):
    cfg = compose_cfg("train", tmp_path, ["experiment=paper_wrn28_10_cifar100"])
    assert cfg.data.name == "cifar100" and cfg.data.batch_size == 200
    assert (cfg.model.depth, cfg.model.widen_factor, cfg.model.dropout) == (28, 10, 0.3)
    opt = cfg.hasgd.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay) == (0.01, 0.9, 5e-4)
    assert (cfg.hasgd.scheduler.step_size, cfg.hasgd.scheduler.gamma) == (60, 0.2)
    assert cfg.trainer.max_epochs == 200


def test_both_loggers_or_none(train_cfg):
    assert set(train_cfg(["logger=[wandb,csv]"]).logger) == {"wandb", "csv"}
    assert not train_cfg(["logger=none"]).get("logger")


def test_the_chip_groups_mirror_analog_config():
    """conf/noise, conf/quant and conf/crossbar hold exactly ``AnalogConfig``'s settings, each in
    the group ``cimsim.chip.config.GROUPS`` names (a device's own settings are noise's), and
    together they cover every setting."""
    import dataclasses

    from cimsim.chip.config import GROUPS
    from cimsim.chip.devices import device_names

    fields = {f.name for f in dataclasses.fields(AnalogConfig)} - {"device_config"}
    assert sorted(k for keys in GROUPS.values() for k in keys) == sorted(fields)
    extra = {"noise": {"schedule", *device_names()}}  # the schedule is a training method's
    for group, keys in GROUPS.items():
        seen = set()
        for path in sorted((CONF / group).glob("*.yaml")):
            node = OmegaConf.load(path)
            own = {k for k in node if k != "defaults"}
            stray = own - set(keys) - extra.get(group, set())
            assert not stray, f"{path.name} sets {sorted(stray)}, not {group} settings"
            seen |= own
        assert set(keys) <= seen, f"{group}: no file sets {sorted(set(keys) - seen)}"
