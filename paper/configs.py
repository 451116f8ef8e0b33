"""The plan's Hydra configs: composed from the repository's conf/ as the CLI composes them."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from cimsim import ConfigError
from cimsim.chip.devices import load_plugins
from cimsim.cli import register
from cimsim.cli.train import training_methods
from cimsim.training.methods import TrainingMethods
from paper.plan import RUN

ROOT = Path(__file__).resolve().parents[1]  # the repository: paper/..
CONF = ROOT / "conf"


def compose_cfg(config_name: str, out_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The real config as the CLI composes it, with its run directory set to ``out_dir`` (the
    tests compose theirs with it too)."""
    register()  # evaluate.yaml's eval_dir resolver and its `chip: checkpoint` node
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def override_error(override: str, err: HydraException, config_name: str) -> ConfigError:
    """Hydra's error for the user's ``override`` as one line: its key, its value, what is wrong."""
    key, _, value = override.partition("=")
    if isinstance(err, MissingConfigException) and err.options:
        why = f"no such {key} config; allowed values are {', '.join(err.options)}"
    elif isinstance(err.__cause__, ConfigAttributeError | ConfigKeyError):
        why = f"no such key in conf/{config_name}.yaml or its groups (a new key: +{override})"
    elif isinstance(err, OverrideParseException):
        why = f"does not parse as a Hydra override ({str(err).splitlines()[0]})"
    else:
        why = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return ConfigError(key, value, why)


# check_plan composes every config once (~0.2 s each); the trainings and studies reuse them
COMPOSED: dict[tuple, DictConfig] = {}


def composed(config_name: str, out_dir: Path, overrides: list[str], mine: list[str]) -> DictConfig:
    """``compose_cfg``, composed once per distinct call (later ones get a copy); when Hydra
    refuses, the ``ConfigError`` names the user's override (one of ``mine``) that it refuses."""
    key = (config_name, str(out_dir), tuple(overrides))
    if key not in COMPOSED:
        COMPOSED[key] = checked_compose(config_name, out_dir, overrides, mine)
    cfg = copy.deepcopy(COMPOSED[key])
    HydraConfig().set_config(cfg)  # as compose_cfg does: ${hydra:...} resolves from it
    return cfg


def checked_compose(config_name: str, out_dir: Path, overrides: list[str], mine: list[str]):
    """``compose_cfg``, a Hydra error blamed on the one of ``mine`` that Hydra refuses alone
    (composed with the plan's overrides)."""
    try:
        return compose_cfg(config_name, out_dir, overrides)
    except HydraException:
        plan = [o for o in overrides if o not in mine]
        for o in mine:
            try:
                compose_cfg(config_name, out_dir, [*plan, o])
            except HydraException as err:
                raise override_error(o, err, config_name) from None
        raise  # none of the user's alone: the plan itself is broken, a bug worth its traceback


def config_sha256(cfg: DictConfig) -> str:
    """A hash of the resolved config, Hydra's own node left out."""
    doc = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def without_teacher(cfg: DictConfig) -> DictConfig:
    """``cfg`` with no distillation teacher: one that is only planned, not yet trained."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.distill = {**OmegaConf.to_container(cfg.get("distill") or {}), "teacher": None}
    return cfg


@functools.cache
def planned_training(run: str) -> tuple[int, TrainingMethods]:
    """(HA-SGD's L, the training methods) of the plan's run ``run``, from its composed config; a
    distillation teacher stands in by its run's name (it need not be trained yet)."""
    cfg = compose_cfg("train", ROOT / "outputs" / "plan" / run, RUN[run].resolved(1))
    load_plugins(cfg.get("plugins"))  # a plug-in method's settings are registered by its module
    methods = training_methods(without_teacher(cfg))
    teacher = OmegaConf.to_container(cfg.get("distill") or {}).get("teacher")
    if teacher is not None:
        methods = TrainingMethods(**{**methods.asdict(), "teacher": RUN[run].teacher or teacher})
    return int(cfg.hasgd.L), methods
