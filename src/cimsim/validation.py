"""User-facing validation: a bad value fails early with the key, the value and what is allowed,
and leaves no empty run folder behind (``discard_failed_run``)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# When this process loaded cimsim. train.py and evaluate.py import it before Hydra makes their
# run folder, so a file there written since then was written by this process.
LOADED_AT = time.time()


class ConfigError(ValueError):
    """A user-supplied setting is invalid.

    The message always reads ``key=value: what is allowed`` so that a command-line user can find
    the override to fix. ``with_prefix`` re-keys the error under a config group (``noise.sigma``).
    """

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")

    def __reduce__(self):  # pickled as its three parts (raised in a worker process)
        return type(self), (self.key, self.value, self.allowed)

    def with_prefix(self, prefix: str) -> ConfigError:
        if not prefix or "." in self.key:  # already fully qualified
            return self
        return ConfigError(f"{prefix}.{self.key}", self.value, self.allowed)


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(key, value, "allowed values are " + ", ".join(map(repr, choices)))


def check_number(
    key: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    finite: bool = False,
) -> None:
    """A real number (not bool) in ``[minimum, maximum]`` (and not infinite with ``finite``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ConfigError(key, value, "must be a real number")
    if finite and abs(value) == float("inf"):
        raise ConfigError(key, value, "must be a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(key, value, f"must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(key, value, f"must be <= {maximum}")


def check_int(key: str, value: Any, *, minimum: int | None = None) -> None:
    """An integer (not bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, "must be an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(key, value, f"must be an integer >= {minimum}")


@contextmanager
def config_scope(prefix: str) -> Iterator[None]:
    """Re-key a ``ConfigError`` raised inside (or wrapped by Hydra's ``instantiate``) under the
    config group ``prefix``, so ``batch_size=0`` reads ``data.batch_size=0``."""
    try:
        yield
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause.with_prefix(prefix) from None


def remove_failed_run_dir(
    run_dir: str | Path, output_subdir: str | None = ".hydra", since: float = LOADED_AT
) -> Path | None:
    """After a config error, remove the run folder ``run_dir`` that Hydra made for a run that
    never started: if it holds nothing but Hydra's own files (``output_subdir``, ``*.log``), all
    written since ``since`` (by this process). A folder holding anything else (a resumed run's
    checkpoints, an earlier study's rows) stays; of it, only an ``output_subdir`` nested in
    Hydra's folder (a resume's ``.hydra/resume_<time>``) that this process wrote goes. Returns
    what was removed, or None."""
    run_dir = Path(run_dir)
    hydra_parts = Path(output_subdir).parts if output_subdir else ()
    if not run_dir.is_dir():
        return None
    top = hydra_parts[0] if hydra_parts else None  # Hydra's folder: .hydra
    hydra_own = all(
        (e.is_dir() and e.name == top) or (e.is_file() and e.suffix == ".log")
        for e in run_dir.iterdir()
    )
    cwd = Path.cwd().resolve()
    around_user = run_dir.resolve() in (cwd, *cwd.parents)  # hydra.run.dir=. in an empty folder
    if hydra_own and not around_user and _written_since(run_dir, since):
        shutil.rmtree(run_dir)
        return run_dir
    subdir = run_dir.joinpath(*hydra_parts)
    if len(hydra_parts) > 1 and subdir.is_dir() and _written_since(subdir, since):
        shutil.rmtree(subdir)
        for parent in subdir.parents:  # a .hydra/ made only to hold it goes too
            if parent == run_dir or any(parent.iterdir()):
                break
            parent.rmdir()
        return subdir
    return None


def _written_since(folder: Path, since: float) -> bool:
    """Whether every file under ``folder`` was last written at or after ``since``."""
    return all(f.stat().st_mtime >= since for f in folder.rglob("*") if f.is_file())


def discard_failed_run() -> Path | None:
    """``remove_failed_run_dir`` for the running Hydra job (its output folder and subdir)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    try:
        return remove_failed_run_dir(hydra.runtime.output_dir, hydra.output_subdir)
    except OSError:  # another process writing there: tidying up never hides the config error
        return None
