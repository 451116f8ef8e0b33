"""Train an analog-robust network with HA-SGD (Wan et al. 2022).

    python train.py                                  # digits, WRN-10-2, clean training
    python train.py noise.sigma=0.05 hasgd.L=4       # HA-SGD at 5 % relative weight noise
    python train.py -m noise.sigma=0,0.05,0.1        # a sweep, one run per value
    python train.py ckpt_path=PATH/last.ckpt         # resume an interrupted run

The config lives in conf/ (train.yaml and one folder per concern); `python train.py --help`
prints it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from cimsim import AnalogConfig, ConfigError
from cimsim.checkpoint import ResumeState
from cimsim.classifier import AnalogClassifier
from cimsim.hasgd import TrainingMethods
from cimsim.tracking import default_wandb_mode, finish_wandb
from cimsim.validation import check_int, config_scope


def chip_config(cfg: DictConfig) -> AnalogConfig:
    """The training chip from the ``noise`` (device), ``quant`` (ADC) and ``crossbar`` (tiles,
    DACs, tile ADCs) groups."""
    noise, quant = OmegaConf.to_container(cfg.noise), OmegaConf.to_container(cfg.quant)
    crossbar = OmegaConf.to_container(cfg.get("crossbar") or {})
    noise.pop("schedule", None)  # a training method, not the chip
    try:
        return AnalogConfig(**noise, **quant, **crossbar)
    except ConfigError as err:
        group = "quant" if err.key in quant else "crossbar" if err.key in crossbar else "noise"
        raise err.with_prefix(group) from None
    except TypeError as err:  # an unknown key such as noise.sigmaa
        keys = sorted(noise) + sorted(quant) + sorted(crossbar)
        raise ConfigError("noise", keys, str(err)) from None


def training_methods(cfg: DictConfig) -> TrainingMethods:
    """Antithetic pairs and SAM (``hasgd``), the noise schedule (``noise.schedule``) and
    distillation (``distill``)."""
    hasgd, distill = cfg.hasgd, cfg.get("distill") or {}
    fields = {
        "hasgd.antithetic": ("antithetic", hasgd.get("antithetic", False)),
        "noise.schedule": ("schedule", OmegaConf.to_container(cfg.noise.get("schedule") or {})),
        "hasgd.sam.rho": ("sam_rho", (hasgd.get("sam") or {}).get("rho", 0.0)),
        "hasgd.sam.adaptive": ("sam_adaptive", (hasgd.get("sam") or {}).get("adaptive", False)),
        "distill.teacher": ("teacher", distill.get("teacher")),
        "distill.beta": ("distill_beta", distill.get("beta", 0.5)),
        "distill.temperature": ("distill_temperature", distill.get("temperature", 4.0)),
    }
    teacher = fields["distill.teacher"][1]
    if teacher is not None:  # needed to train, not to load: stored absolute, checked here
        if not Path(teacher).is_file():
            raise ConfigError("distill.teacher", teacher, "no such checkpoint file")
        fields["distill.teacher"] = ("teacher", str(Path(teacher).resolve()))
    try:
        return TrainingMethods(**{name: value for name, value in fields.values()})
    except ConfigError as err:
        key = err.key.split(".")[0]
        path = next(k for k, (name, _) in fields.items() if name == key)
        rest = err.key[len(key) :]
        raise ConfigError(path + rest, err.value, err.allowed) from None


def build_loggers(cfg: DictConfig) -> list:
    default_wandb_mode()
    with config_scope("logger"):
        return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]


def build_callbacks(cfg: DictConfig) -> list:
    """The configured callbacks, plus ``ResumeState`` (RNG streams and data spec in every
    checkpoint: resuming and ``evaluate.py`` depend on it, so it is not optional)."""
    with config_scope("callbacks"):
        configured = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    return [*configured, ResumeState()]


def build(cfg: DictConfig):
    """Every object of the run, built (and so validated) before any training starts."""
    check_int("val_chips", cfg.val_chips, minimum=0)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError("ckpt_path", cfg.ckpt_path, "no such checkpoint file to resume from")
    with config_scope("data"):
        datamodule = instantiate(cfg.data)
    net = {
        **OmegaConf.to_container(cfg.model),
        "num_classes": datamodule.num_classes,
        "in_channels": datamodule.in_channels,
    }
    with config_scope("hasgd"):
        hasgd = instantiate(cfg.hasgd)
        model = AnalogClassifier(
            net=net,
            chip=chip_config(cfg),
            L=hasgd.L,
            optimizer=hasgd.optimizer,
            scheduler=hasgd.get("scheduler"),
            val_chips=cfg.val_chips,
            calib_batches=cfg.val_calib_batches,
            calib_momentum=cfg.val_calib_momentum,
            methods=training_methods(cfg),
        )
    loggers, callbacks = build_loggers(cfg), build_callbacks(cfg)
    with config_scope("trainer"):
        trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    return datamodule, model, trainer


def group_sweep_runs(cfg: DictConfig) -> None:
    """The jobs of one ``train.py -m`` sweep share a W&B group named after the sweep folder."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if wandb_cfg is None or wandb_cfg.get("group") or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        with open_dict(cfg):
            wandb_cfg.group = f"{cfg.task_name}-{Path(hydra_cfg.sweep.dir).name}"


def train(cfg: DictConfig) -> float | None:
    """Fit, checkpoint and test one model; return ``cfg.optimized_metric`` for sweeps."""
    pl.seed_everything(cfg.seed, workers=True)
    group_sweep_runs(cfg)
    datamodule, model, trainer = build(cfg)
    try:
        return fit_and_test(cfg, datamodule, model, trainer)
    finally:
        finish_wandb()


def fit_and_test(cfg: DictConfig, datamodule, model, trainer) -> float | None:
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not best:  # fast_dev_run and friends save nothing: every run still ends with a checkpoint
        best = str(ckpt_dir / "last.ckpt")
        trainer.save_checkpoint(best)
    metrics = dict(trainer.callback_metrics)  # test() replaces them
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update(trainer.callback_metrics)
    report(cfg, trainer, best, metrics)
    metric = metrics.get(cfg.optimized_metric)
    return None if metric is None else float(metric)


def report(cfg: DictConfig, trainer: pl.Trainer, best: str, metrics: dict) -> None:
    """Print where everything went and the final metrics."""
    lines = [f"output dir : {cfg.paths.output_dir}", f"checkpoint : {best}"]
    for logger in trainer.loggers:
        lines.append(f"{type(logger).__name__:<11}: {logger.save_dir or logger.log_dir}")
    shown = {k: round(float(v), 4) for k, v in sorted(metrics.items()) if "/" in k}
    lines.append(f"metrics    : {shown}")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
