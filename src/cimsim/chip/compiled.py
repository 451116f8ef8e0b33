"""Elementwise graphs of the crossbar periphery compiled with ``torch.compile`` where it pays.

The periphery's work outside the products is elementwise over tensors ``T`` times a layer's
outputs (every tile's partial sums) and over its inputs (the DAC, the grouping into tiles). Run
eagerly, each step is a pass over memory; compiled, they fuse into one. ``run`` calls a function
compiled (Inductor's C++/OpenMP code on the CPU) when its tensor is a large float32 CPU tensor,
and eagerly otherwise: small tensors gain nothing from it, and other devices run torch's own
kernels. The functions are written so both ways give the same values (up to float rounding). A
compiler failure (no C++ toolchain, say) is reported once, and everything then runs eagerly;
``CIMSIM_COMPILE=0`` turns compilation off.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
import torch._dynamo.config as dynamo_config
from torch._dynamo.exc import FailOnRecompileLimitHit

# Tensors with fewer elements run eagerly: compiling costs seconds once per process and kind of
# call (cached on disk by Inductor afterwards), and small tensors gain nothing from it.
COMPILE_MIN = 1 << 18
# Each layer's tiling is a distinct graph (its tile sizes are part of it): more than torch's
# default of 8 recompilations per function in a deep network.
_RECOMPILE_LIMIT = 64
# Inductor stores an elementwise result in a buffer of its own once its expression exceeds 50
# operations (its CPU default). The tile tail's noisy partial sums (the draws alone are about 40)
# would then be written out and read back by the sum over the tiles: kept fused, they stay in
# registers. (It would still store them if they had two users: an expression with a log is not
# computed twice. That is why the tail's count of possibly clipped values reads the clean sums.)
_OPTIONS = {"realize_opcount_threshold": 1000}

_COMPILED: dict[Callable, Callable] = {}
_FAILED: list[str] = []


def enabled(t: torch.Tensor, numel: int | None = None) -> bool:
    """Whether work on ``t`` runs compiled: a large floating-point CPU tensor (``numel``: the
    work's size where it is more than ``t``'s), compilation not off and not failed before."""
    return (
        t.device.type == "cpu"
        and t.is_floating_point()
        and (t.numel() if numel is None else numel) >= COMPILE_MIN
        and not _FAILED
        and os.environ.get("CIMSIM_COMPILE", "1") != "0"
    )


def run(fn: Callable, like: torch.Tensor, *args, numel: int | None = None, **kwargs):
    """``fn(*args, **kwargs)``, compiled when ``enabled(like, numel)``, else eagerly. A call past
    the recompilation limit runs eagerly (that call only); any other compiler failure turns
    compilation off for the process, with a warning."""
    if enabled(like, numel):
        if fn not in _COMPILED:
            _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True, options=_OPTIONS)
        try:
            with dynamo_config.patch(recompile_limit=_RECOMPILE_LIMIT):  # this function's only
                return _COMPILED[fn](*args, **kwargs)
        except (torch.OutOfMemoryError, MemoryError, KeyboardInterrupt):
            raise
        except FailOnRecompileLimitHit:
            pass
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager path
            _give_up(err)
    return fn(*args, **kwargs)


def _give_up(err: Exception) -> None:
    """After a compiler failure: say so once and run eagerly from now on (the same values)."""
    _FAILED.append(repr(err))
    warnings.warn(
        f"cimsim: torch.compile failed ({type(err).__name__}: {err}); the crossbar periphery "
        "runs eagerly from now on (the same values, slower). Set CIMSIM_COMPILE=0 to skip it.",
        RuntimeWarning,
        stacklevel=3,
    )
