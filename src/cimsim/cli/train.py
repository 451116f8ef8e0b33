"""train.py's library code: the training config checked, built and fitted, and resumes."""

from __future__ import annotations

import copy
import os
import secrets
import string
from pathlib import Path

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from cimsim import AnalogConfig, ConfigError
from cimsim.chip.config import GROUPS
from cimsim.chip.devices import load_plugins
from cimsim.tracking import default_wandb_mode, finish_wandb
from cimsim.training.checkpoint import (
    ResumeState,
    read_checkpoint,
    resumed_run,
    run_record,
    stored_run,
)
from cimsim.training.classifier import AnalogClassifier
from cimsim.training.methods import TrainingMethods, method_settings
from cimsim.validation import check_choice, check_int, config_scope

RESUME_OVERRIDES = ("refuse", "allow")


def chip_config(cfg: DictConfig) -> AnalogConfig:
    """The training chip from the ``noise`` (device), ``quant`` (ADC) and ``crossbar`` (tiles,
    DACs, tile ADCs) groups."""
    noise, quant = OmegaConf.to_container(cfg.noise), OmegaConf.to_container(cfg.quant)
    crossbar = OmegaConf.to_container(cfg.get("crossbar") or {})
    noise.pop("schedule", None)  # a training method, not the chip
    try:
        chip = AnalogConfig(**noise, **quant, **crossbar)
        chip.device_model.check_time(chip.t_train, "t_train")  # the training chip's read time
        return chip
    except ConfigError as err:  # nested keys too: pcm.drift_compensation is noise's
        head = err.key.split(".")[0]
        group = next((g for g, keys in GROUPS.items() if head in keys), "noise")  # or a device's
        raise ConfigError(f"{group}.{err.key}", err.value, err.allowed) from None


def training_methods(cfg: DictConfig) -> TrainingMethods:
    """Every registered method's settings (``cimsim.training.methods``), each read from its key
    in ``cfg`` (``hasgd.antithetic``, ``noise.schedule``, ``hasgd.sam.rho``, ``distill.*``, a
    plug-in's own); an error names that key."""
    settings = method_settings()
    values = {name: config_value(cfg, s.key, s.default) for name, s in settings.items()}
    try:
        return TrainingMethods.for_training(**values)
    except ConfigError as err:
        head = err.key.split(".")[0]
        key = settings[head].key + err.key[len(head) :] if head in settings else err.key
        raise ConfigError(key, err.value, err.allowed) from None


def config_value(cfg: DictConfig, key: str, default):
    """The value at dotted ``key`` as plain containers; ``default`` where the key, or a node on
    its way, is missing or null (a null value itself stays null; a null ``noise.schedule`` is
    the default schedule)."""
    node = cfg
    *path, leaf = key.split(".")
    for part in path:
        node = node.get(part) if isinstance(node, DictConfig | dict) else None
        if node is None:
            return default
    if not isinstance(node, DictConfig | dict) or leaf not in node:
        return default
    value = node.get(leaf)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def build_loggers(cfg: DictConfig) -> list:
    default_wandb_mode()
    with config_scope("logger"):
        return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]


def build_callbacks(cfg: DictConfig, run: dict | None = None) -> list:
    """The configured callbacks, plus ``ResumeState`` (RNG streams, data spec and the ``run``
    record in every checkpoint: resuming and ``evaluate.py`` depend on it, so it is not
    optional)."""
    configured = []
    for name, c in (cfg.get("callbacks") or {}).items():
        if not c:
            continue
        final = c.get("final") if isinstance(c, DictConfig) else None
        if final is not None:  # the end-of-fit grid first, so its errors name it
            with config_scope(f"callbacks.{name}.final"):
                instantiate(final)
        with config_scope(f"callbacks.{name}"):
            configured.append(instantiate(c))
    return [*configured, ResumeState(run)]


def check_required(cfg: DictConfig) -> None:
    """A ``???`` in the config (``data=image_folder``'s ``data.root``) is a setting without a
    default: the user must give it."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        why = f"not set, and it has no default: add {missing[0]}=VALUE to the command line"
        raise ConfigError(missing[0], "???", why)


def check_max_epochs(value) -> None:
    """``trainer.max_epochs`` as Lightning reads it: null is its default (1000 epochs, or no
    limit with ``max_steps``), -1 no epoch limit, 0 no training at all."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < -1):
        why = (
            "must be the number of epochs to train (an integer >= 0; 0 trains nothing), or -1 "
            "for no epoch limit (training then stops at trainer.max_steps or trainer.max_time)"
        )
        raise ConfigError("trainer.max_epochs", value, why)


def check_settings(cfg: DictConfig) -> None:
    """The settings no object of the run checks itself."""
    check_required(cfg)
    check_int("seed", cfg.seed, minimum=0)
    check_int("val_chips", cfg.val_chips, minimum=0)
    check_max_epochs(cfg.trainer.get("max_epochs"))


def build(cfg: DictConfig, run: dict | None = None):
    """Every object of the run, built (and so validated) before any training starts; ``run`` is
    the record every checkpoint stores (``run_config``). ``check_settings`` comes first."""
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
            scheduler_interval=hasgd.get("scheduler_interval", "epoch"),
            val_chips=cfg.val_chips,
            calib_batches=cfg.val_calib_batches,
            calib_momentum=cfg.val_calib_momentum,
            methods=training_methods(cfg),
        )
    loggers, callbacks = build_loggers(cfg), build_callbacks(cfg, run)
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


def hydra_task() -> tuple[list[str], dict]:
    """This job's task overrides and config-group choices (not Hydra's own groups)."""
    if not HydraConfig.initialized():
        return [], {}
    hydra_cfg = HydraConfig.get()
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
    # unresolved: an override such as noise.sigma=${nosuch} is a string here, refused later
    return list(OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)), choices


def plain(cfg: DictConfig) -> dict:
    """``cfg`` resolved to plain containers, without Hydra's own node."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:  # noise.sigma=${nosuchkey}
        raise ConfigError(err.full_key, None, str(err).splitlines()[0]) from None
    return {k: v for k, v in config.items() if k != "hydra"}


def new_wandb_id() -> str:
    """A W&B run id (W&B's own form: 8 lowercase letters and digits)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def with_wandb_id(config: dict, resuming: bool) -> dict:
    """``config`` with the W&B logger's run id fixed, so that the id is in every checkpoint and
    a resume continues the same W&B run."""
    wandb_cfg = (config.get("logger") or {}).get("wandb")
    if wandb_cfg is not None:
        wandb_cfg["id"] = wandb_cfg.get("id") or new_wandb_id()
        if resuming:
            wandb_cfg["resume"] = "allow"
    return config


def run_config(cfg: DictConfig) -> tuple[DictConfig, dict]:
    """The config to train with and the run record every checkpoint stores (``run_record``).

    A new run trains with ``cfg``. A resume (``ckpt_path``) trains with the run's own config from
    its checkpoint, this command line's overrides checked against it (``resumed_run``).
    """
    check_choice("resume_overrides", cfg.get("resume_overrides"), RESUME_OVERRIDES)
    overrides, choices = hydra_task()
    path = cfg.get("ckpt_path")
    if not path:
        run = run_record(with_wandb_id(plain(cfg), resuming=False), overrides, choices)
        cfg = copy.deepcopy(cfg)  # the caller's stays without the id: its next run gets its own
        with open_dict(cfg):
            cfg.logger = run["config"]["logger"]
        return cfg, run
    if not Path(path).is_file():
        raise ConfigError("ckpt_path", path, "no such checkpoint file to resume from")
    stored = stored_run(path, read_checkpoint(path))
    allow = cfg.resume_overrides == "allow"
    run = resumed_run(stored, plain(cfg), overrides, choices, allow)
    with_wandb_id(run["config"], resuming=True)
    resumed = OmegaConf.create(run["config"])
    OmegaConf.set_struct(resumed, True)  # a typo in a key fails as it does in a composed config
    return resumed, run


def train(cfg: DictConfig) -> float | None:
    """Fit, checkpoint and test one model; return ``cfg.optimized_metric`` for sweeps. With
    ``ckpt_path``, the run resumes with its own settings (``run_config``)."""
    group_sweep_runs(cfg)
    cfg, run = run_config(cfg)
    load_plugins(cfg.get("plugins"))  # plug-in devices, before the chip is built
    check_settings(cfg)  # before the seed's log line: a bad value is the only line printed
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # errors stay one line
    datamodule, model, trainer = build(cfg, run)
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


def resume_in_place(args: list[str]) -> list[str]:
    """The Hydra overrides that keep a resume (``ckpt_path=RUN/checkpoints/last.ckpt``) in its
    own folder RUN, with the run's original ``.hydra/`` kept (the resume's goes to
    ``.hydra/resume_<time>``); none if the command line sets ``hydra.run.dir`` itself, sweeps,
    or names no checkpoint file in a run's ``checkpoints/`` (``train`` then says what is wrong,
    or resumes in a new folder)."""
    if {"-m", "--multirun"} & set(args):
        return []
    overrides = []
    for arg in args:
        try:
            overrides += OverridesParser.create().parse_overrides([arg])
        except HydraException:  # not an override (--help, ...): Hydra handles it
            continue
    keys = {o.key_or_group: o for o in overrides}
    path = keys["ckpt_path"].value() if "ckpt_path" in keys else None
    if "hydra.run.dir" in keys or not isinstance(path, str) or not Path(path).is_file():
        return []
    if Path(path).parent.name != "checkpoints":  # not RUN/checkpoints/*.ckpt: no run folder
        return []
    run_dir = os.path.abspath(Path(path).parent.parent)
    quoted = run_dir.replace("\\", "\\\\").replace("'", "\\'")
    return [
        f"hydra.run.dir='{quoted}'",
        "hydra.output_subdir=.hydra/resume_${now:%Y-%m-%d_%H-%M-%S}",
    ]
