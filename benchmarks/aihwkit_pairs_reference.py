"""Reference conductances of IBM aihwkit's ``NPairConductanceConverter``, for cimsim's pairs.

    nice -n 10 <python with aihwkit 1.2.0> benchmarks/aihwkit_pairs_reference.py   # ~2 s

Runs in an environment that has aihwkit (never the project's: aihwkit is not a cimsim
dependency). For fixed weight tensors (hand-picked values that fill the pairs to and across their
boundaries, and a seeded random tensor: a CPU ``torch.Generator``, its sha256 in the JSON so
``tests/chip/test_pairs.py`` can check it regenerates the same) and several ``f_lst``, it writes
``convert_to_conductances`` (the ``2 N`` conductances and ``scale_ratio``) and
``convert_back_to_weights`` to ``benchmarks/aihwkit_pairs_reference.json``, with ``g_max = 25``
and ``g_min = 0`` (cimsim's mapping). It also records which ``f_lst`` aihwkit's constructor
refuses (its checks are ``isinstance(f_lst, list)`` and ``max(f_lst) >= 0`` only).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import torch

OUT = Path(__file__).resolve().with_suffix(".json")
G_MAX = 25.0
# max|w| = 1 in each: the hand-picked values put s W at pair boundaries (25, 50, 100 uS ...).
HAND = [0.0, 0.05, 0.1, 0.25, 0.3, 0.4, 0.5, 0.75, 0.9, 1.0, -0.1, -0.25, -0.4, -0.6, -1.0, 1e-9]
F_LISTS = [[1.0], [1.0, 3.0], [1.0, 1.0], [1.0, 2.0, 4.0], [3.0, 1.0], [0.5, 2.0]]
# What the constructor does with each (recorded, not assumed): None = accepted.
F_CHECKS = [[1.0, 0.0], [1.0, -1.0], [-1.0, -2.0], [], (1.0, 3.0)]
RANDOM = {"seed": 7, "shape": [4, 6]}


def random_weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(RANDOM["seed"])
    return torch.randn(RANDOM["shape"], generator=g, dtype=torch.float64)


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def convert(weights: torch.Tensor, f_lst: list[float]) -> dict:
    from aihwkit.inference.converter.conductance import NPairConductanceConverter

    converter = NPairConductanceConverter(f_lst=f_lst, g_max=G_MAX, g_min=0.0)
    g, params = converter.convert_to_conductances(weights)
    back = converter.convert_back_to_weights(g, params)
    return {
        "f": f_lst,
        "scale_ratio": float(params["scale_ratio"]),
        "conductances": [gi.tolist() for gi in g],
        "back": back.tolist(),
    }


def refusal(f_lst) -> str | None:
    from aihwkit.inference.converter.conductance import NPairConductanceConverter

    try:
        NPairConductanceConverter(f_lst=f_lst, g_max=G_MAX, g_min=0.0)
    except Exception as err:  # the constructor's own refusal, recorded as aihwkit words it
        return f"{type(err).__name__}: {err}"
    return None


def main() -> None:
    import aihwkit

    hand = torch.tensor(HAND, dtype=torch.float64)
    rand = random_weights()
    doc = {
        "aihwkit": aihwkit.__version__,
        "written": datetime.date.today().isoformat(),
        "g_max": G_MAX,
        "g_min": 0.0,
        "hand": HAND,
        "random": {**RANDOM, "sha256": sha256(rand)},
        "cases": {
            "hand": [convert(hand, f) for f in F_LISTS],
            "random": [convert(rand, f) for f in F_LISTS],
        },
        "f_checks": [
            {"f": list(f), "list": isinstance(f, list), "refusal": refusal(f)} for f in F_CHECKS
        ],  # fmt: skip
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
