"""What a training checkpoint holds besides the weights, as tensors and plain types only, and
how a resumed run gets its settings back from it.

``ResumeState`` adds the random streams (so a resumed run draws the same noise and shuffles the
same batches as an uninterrupted one), the datamodule spec (so ``evaluate.py`` finds the test
set without being told) and the run record: the run's composed config, resolved, with its Hydra
task overrides and config-group choices (so ``train.py ckpt_path=...`` resumes the run with its
own settings, ``resumed_run``). Everything is a tensor, a number, a string or a container of
them, so a checkpoint loads with ``torch.load(..., weights_only=True)``: loading one never runs
its code.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning_fabric.utilities.seed import _collect_rng_states, _set_rng_states
from omegaconf import OmegaConf

from cimsim.validation import ConfigError

M = TypeVar("M", bound=pl.LightningModule)


def load_module(cls: type[M], source, **kwargs) -> M:
    """``cls.load_from_checkpoint(source, **kwargs)``, without Lightning's guard against calls on
    an instance: to tell whether TorchScript is compiling, that guard runs ``inspect.stack()``,
    which looks up the source line of every frame of the call stack at every load (0.1 s and
    more under a deep stack; a report loads hundreds of checkpoints). Here it is always a class.
    The method is read from the class statically: a classmethod (Lightning's guarded subclass
    included) keeps the plain function in ``__func__``."""
    return inspect.getattr_static(cls, "load_from_checkpoint").__func__(cls, source, **kwargs)


RUN = "run"  # the checkpoint key of the run record
# Keys a resume may change without resume_overrides=allow: where to resume from, how long to
# train, Hydra's own settings, where files go, and whether W&B is online.
RESUME_FREE = (
    "ckpt_path",
    "resume_overrides",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "hydra",
    "paths",
    "logger.wandb.offline",
)
_UNSET = object()  # a key the config does not have


def plain_rng_states() -> dict:
    """Lightning's RNG states with numpy's key array as a tensor (no numpy objects to unpickle)."""
    states = _collect_rng_states()
    name, keys, pos, has_gauss, cached = states["numpy"]
    states["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    return states


def restore_rng_states(states: dict) -> None:
    """Inverse of ``plain_rng_states``."""
    states = dict(states)
    name, keys, pos, has_gauss, cached = states["numpy"]
    keys = keys.numpy().astype(np.uint32) if isinstance(keys, torch.Tensor) else keys
    states["numpy"] = (name, keys, pos, has_gauss, cached)
    _set_rng_states(states)


def datamodule_spec(datamodule: pl.LightningDataModule) -> dict:
    """``{"_target_": "module.Class", **hparams}``: enough to rebuild the datamodule."""
    cls = type(datamodule)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **dict(datamodule.hparams)}


def run_record(config: dict, overrides: list[str], choices: dict) -> dict:
    """What a checkpoint stores of its run: the composed config (resolved, plain containers), the
    Hydra task overrides and the config-group choices (``{"data": "digits", ...}``)."""
    return {"config": config, "overrides": list(overrides), "choices": dict(choices)}


class ResumeState(pl.Callback):
    """Save the random streams, the datamodule spec and the run record (``run_record``, if given)
    in every checkpoint; restore the streams when a run resumes. ``train.py`` always adds it."""

    def __init__(self, run: dict | None = None):
        self.run = run

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["rng_states"] = plain_rng_states()
        if trainer.datamodule is not None:
            checkpoint["datamodule"] = datamodule_spec(trainer.datamodule)
        if self.run is not None:
            checkpoint[RUN] = self.run

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:120] if text else ''}"


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict:
    """A training checkpoint of ``train.py``, loaded with ``weights_only=True``; anything else (a
    truncated or foreign file, a weights-only save) fails with a ``ConfigError`` naming ``key``."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or objects beyond tensors
        why = "is not a PyTorch checkpoint that loads with weights_only=True (truncated, another"
        why += f" format, or objects other than tensors and plain types): {_first_line(err)}"
        raise ConfigError(key, str(path), why) from None
    if not isinstance(ckpt, dict) or not {"state_dict", "hyper_parameters"} <= set(ckpt):
        why = "is not a checkpoint of train.py: it has no state_dict/hyper_parameters"
        raise ConfigError(key, str(path), why)
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        why = "holds weights only (no optimizer or loop state): there is no training to resume"
        raise ConfigError(key, str(path), why)
    return ckpt


def stored_run(path: str | Path, ckpt: dict) -> dict:
    """The run record of ``ckpt`` (at ``path``). A checkpoint written before checkpoints held one
    falls back to its run folder's ``.hydra/`` files (``path``'s parent's parent)."""
    if RUN in ckpt:
        return ckpt[RUN]
    hydra_dir = Path(path).parent.parent / ".hydra"
    if not (hydra_dir / "config.yaml").is_file():
        why = (
            f"holds no run config (written before checkpoints stored one) and "
            f"{hydra_dir / 'config.yaml'} does not exist: the run's settings are unknown, so it "
            "cannot be resumed as the same run"
        )
        raise ConfigError("ckpt_path", str(path), why)
    try:
        config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=True)
        overrides = _load_yaml(hydra_dir / "overrides.yaml", None) or []
        choices = _load_yaml(hydra_dir / "hydra.yaml", "hydra.runtime.choices") or {}
    except Exception as err:  # a hand-edited or truncated file
        why = f"its run config {hydra_dir / 'config.yaml'} does not load: {_first_line(err)}"
        raise ConfigError("ckpt_path", str(path), why) from None
    return run_record(config, overrides, choices)


def _load_yaml(path: Path, key: str | None) -> Any:
    """The plain value at ``key`` (``None``: all) of a YAML file, unresolved; None if absent."""
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    node = node if key is None else OmegaConf.select(node, key)
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


def resumed_run(
    stored: dict, current: dict, overrides: list[str], choices: dict, allow: bool
) -> dict:
    """The run record of a resumed run: the ``stored`` run's config, with this command line's
    ``overrides`` (as composed into ``current``, a resolved plain config; group ``choices``).

    An override that contradicts the stored run is refused with a ``ConfigError`` naming its key,
    unless ``allow`` or the key is one a resume naturally changes (``RESUME_FREE``). The run's
    own folder follows ``paths``: a stored value under an old ``paths.*`` folder (checkpoints,
    logs) moves to the new one, so a moved run folder resumes where it now is. A top-level
    setting added to ``conf/train.yaml`` since the run was written takes its value from
    ``current``.
    """
    config = _current_targets(copy.deepcopy(stored["config"]))
    for key, value in current.items():  # not a group: a missing group node means "none"
        if key not in config and key not in choices:
            config[key] = copy.deepcopy(value)
    stored_choices = dict(stored.get("choices") or {})
    old_paths = dict(config.get("paths") or {})
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        free = allow or any(key == k or key.startswith((k + ".", k + "/")) for k in RESUME_FREE)
        if key in choices:  # a config group: data=cifar10
            _resume_group(config, stored_choices, current, choices, key, free)
        else:
            _resume_value(config, current, key, free)
    config.setdefault("paths", {})["output_dir"] = current["paths"]["output_dir"]  # this run's
    for name, old in old_paths.items():
        new = config["paths"].get(name)
        if isinstance(old, str) and isinstance(new, str) and old and new != old:
            old, new = old.rstrip("/"), new.rstrip("/")
            config = {k: v if k == "paths" else _relocate(v, old, new) for k, v in config.items()}
    config["ckpt_path"] = current.get("ckpt_path")
    config["resume_overrides"] = current.get("resume_overrides")
    return run_record(config, [*stored.get("overrides", []), *overrides], stored_choices)


# Modules that moved since a run could have stored their classes as ``_target_``s (cimsim 0.1's
# flat layout): a resumed run builds its callbacks from the new ones. ``cimsim.robustness``
# re-exports RobustnessGrid, so its old target still resolves.
MOVED_MODULES = {"cimsim.callbacks": "cimsim.training.callbacks"}


def _current_targets(value: Any) -> Any:
    """``value`` (a plain config), each ``_target_`` in a moved module pointed at its new one."""
    if isinstance(value, list):
        return [_current_targets(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _current_targets(v) for k, v in value.items()}
    target = out.get("_target_")
    if isinstance(target, str):
        module, _, name = target.rpartition(".")
        out["_target_"] = f"{MOVED_MODULES.get(module, module)}.{name}"
    return out


def _resume_value(config: dict, current: dict, key: str, free: bool) -> None:
    """Check (and if ``free``, apply) the override of the value at dotted ``key``."""
    given, was = _get(current, key), _get(config, key)
    if given == was:
        return
    if not free:
        raise _contradiction(
            key, given, f"{key}={_short(was)}" if was is not _UNSET else f"no {key}"
        )
    _set(config, key, given)


def _resume_group(
    config: dict, stored_choices: dict, current: dict, choices: dict, key: str, free: bool
) -> None:
    """Check (and if ``free``, apply) the override of config group ``key`` (``data=cifar10``).
    Without the run's choice (an old run folder without ``.hydra/hydra.yaml``) the run's group
    stays, unless ``free``."""
    node = key.replace("/", ".")
    if stored_choices.get(key, _UNSET) == choices[key]:
        return
    if not free:
        if key not in stored_choices:
            return
        raise _contradiction(key, choices[key], f"{key}={stored_choices[key]}")
    if _get(current, node) is _UNSET:  # a `# @package _global_` group (experiment, method)
        why = (
            f"sets keys all over the config, so it cannot change on resume even with "
            f"resume_overrides=allow (the run has {key}={stored_choices.get(key)}): give the "
            "keys it sets instead"
        )
        raise ConfigError(key, choices[key], why)
    _set(config, node, _get(current, node))
    stored_choices[key] = choices[key]


def _contradiction(key: str, given: Any, was: str) -> ConfigError:
    given = None if given is _UNSET else given
    why = (
        f"contradicts the run being resumed ({was}): drop it to resume the run as it was, or "
        "add resume_overrides=allow to change it"
    )
    return ConfigError(key, given, why)


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _get(config: dict, key: str) -> Any:
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _UNSET
        node = node[part]
    return node


def _set(config: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    if value is _UNSET:
        node.pop(last, None)
    else:
        node[last] = copy.deepcopy(value)


def _relocate(value: Any, old: str, new: str) -> Any:
    """``value`` with every string that is ``old`` or under it (``old/...``) moved to ``new``."""
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + "/")):
        return new + value[len(old) :]
    return value
