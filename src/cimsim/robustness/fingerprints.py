"""Fingerprints of the settings that determined a row, their sidecar file, and what changed.

The sidecar ``robustness_rows.fingerprints.json`` says what each fingerprint stands for.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cimsim.chip.convert import analog_layers
from cimsim.files import atomic_write
from cimsim.robustness.grid import chip_settings


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of ``model.state_dict()``: every entry's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if not isinstance(value, torch.Tensor):  # a module's extra state
            digest.update(f"{name}={value!r};".encode())
            continue
        t = value.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def model_chip(model: nn.Module) -> dict | list[dict]:
    """The test chip of ``model``'s analog layers (a list when layers differ)."""
    chips = []
    for _, layer in analog_layers(model):
        settings = chip_settings(layer.config)
        if settings not in chips:
            chips.append(settings)
    return chips[0] if len(chips) == 1 else chips


# The generator of the crossbar's per-read output and read noise, part of a row's settings where
# the chip draws any: rows measured with torch's chunked normal_ (before 2026-12-03) have none and
# become stale rather than mix with rows of the counter-based draws (``cimsim.chip.draws``); the
# tiles' output noise pairs tiles 2k and 2k + 1 on one Box-Muller counter since 2026-12-04
# (``READOUT_DRAWS_PAIRED``), so rows with output noise from before are stale too.
READOUT_DRAWS = "splitmix64-box-muller"
READOUT_DRAWS_PAIRED = "splitmix64-box-muller-tile-pairs"


def readout_draws(model: nn.Module) -> str | None:
    """The generator of ``model``'s per-read noise: ``READOUT_DRAWS_PAIRED`` when an analog layer
    draws output noise, ``READOUT_DRAWS`` when read noise only, None when neither."""
    layers = [layer for _, layer in analog_layers(model)]
    if any(layer.config.out_noise > 0 for layer in layers):
        return READOUT_DRAWS_PAIRED
    return READOUT_DRAWS if any(layer.config.w_read_noise > 0 for layer in layers) else None


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A 16-hex-digit digest of the settings that determine a row (their canonical JSON)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sidecar(rows_path: Path) -> Path:
    return rows_path.with_suffix(".fingerprints.json")


def read_fingerprints(rows_path: str | os.PathLike) -> dict[str, dict]:
    """The sidecar of a rows file, ``<rows>.fingerprints.json``: fingerprint -> settings."""
    sidecar = _sidecar(Path(rows_path))
    return json.loads(sidecar.read_text()) if sidecar.exists() else {}


def record_fingerprints(rows_path: str | os.PathLike, entries: Mapping[str, dict]) -> Path:
    """Add ``entries`` (fingerprint -> settings) to the sidecar of ``rows_path``, atomically."""
    known = read_fingerprints(rows_path)
    sidecar = _sidecar(Path(rows_path))
    if sidecar.exists() and all(known.get(k) == v for k, v in entries.items()):
        return sidecar
    known.update(entries)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(known, f, indent=1, sort_keys=True)
            f.write("\n")

    return atomic_write(sidecar, write)


def _flat(value, prefix: str = "") -> dict:
    """``{"data": {"seed": 1}}`` -> ``{"data.seed": 1}``."""
    if not isinstance(value, dict) or not value:
        return {prefix.rstrip("."): value}
    flat = {}
    for key, item in value.items():
        flat.update(_flat(item, f"{prefix}{key}."))
    return flat


_UNSET = object()


def _show(key: str, value) -> str:
    if value is _UNSET:
        return "unset"
    if isinstance(value, str):
        return value[:12] + "..." if key.endswith("sha256") else value
    return repr(value)


def describe_changes(old: dict | None, new: dict, limit: int | None = None) -> str:
    """``key: old -> new`` for every setting that differs, e.g. ``max_batches: 1 -> None``; past
    ``limit`` of them, how many more."""
    if old is None:
        return "settings not recorded in the fingerprint sidecar"
    a, b = _flat(old), _flat(new)
    changed = [
        f"{k}: {_show(k, a.get(k, _UNSET))} -> {_show(k, b.get(k, _UNSET))}"
        for k in sorted(set(a) | set(b))
        if a.get(k, _UNSET) != b.get(k, _UNSET)
    ]
    if limit is not None and len(changed) > limit:
        changed = [*changed[:limit], f"and {len(changed) - limit} more"]
    return ", ".join(changed)
