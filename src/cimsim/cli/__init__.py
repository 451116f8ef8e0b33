"""The library code of the entry points: train.py and evaluate.py are Hydra shells over it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from cimsim.validation import ConfigError, discard_failed_run


def output_dir(sweep_dir: str | None, task_name: str, run_name: str) -> str:
    """Where a study writes: next to the sweep it evaluates, else outputs/<task>/<run_name>."""
    return f"{sweep_dir}/evaluate/{run_name}" if sweep_dir else f"outputs/{task_name}/{run_name}"


def register() -> None:
    """What conf/ needs from Python before it composes: the ``eval_dir`` resolver of
    evaluate.yaml's run folder and the ``chip: checkpoint`` test chip. Idempotent."""
    OmegaConf.register_new_resolver("eval_dir", output_dir, replace=True)
    # The test chip, `chip.<field>=VALUE`: an open node, so an override needs no '+' (Hydra closes
    # a `chip: {}` written in YAML).
    node = OmegaConf.create({})
    OmegaConf.set_struct(node, False)
    ConfigStore.instance().store(group="chip", name="checkpoint", node=node)


def run(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """``task(cfg)``; a ``ConfigError`` ends the process with one line on stderr and exit status
    2, and a run that never started leaves no empty folder behind."""
    try:
        return task(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        discard_failed_run()
        sys.exit(2)
