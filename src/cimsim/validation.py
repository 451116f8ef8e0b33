"""User-facing validation: a bad value fails early with the key, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class ConfigError(ValueError):
    """A user-supplied setting is invalid.

    The message always reads ``key=value: what is allowed`` so that a command-line user can find
    the override to fix. ``with_prefix`` re-keys the error under a config group (``noise.sigma``).
    """

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is invalid: {allowed}")

    def with_prefix(self, prefix: str) -> ConfigError:
        if not prefix or "." in self.key:  # already fully qualified
            return self
        return ConfigError(f"{prefix}.{self.key}", self.value, self.allowed)


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(key, value, "allowed values are " + ", ".join(map(repr, choices)))


def check_number(
    key: str, value: Any, *, minimum: float | None = None, maximum: float | None = None
) -> None:
    """A real number (not bool) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ConfigError(key, value, "must be a real number")
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
