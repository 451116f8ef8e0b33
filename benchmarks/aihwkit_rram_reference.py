"""Reference statistics of IBM aihwkit's ReRAM model, for cimsim's ``rram`` device.

    nice -n 10 /work/aihwkit-venv/bin/python benchmarks/aihwkit_rram_reference.py  # ~30 s

Runs in an environment that has aihwkit 1.2.0 (never the project's: aihwkit is not a cimsim
dependency) and writes ``benchmarks/aihwkit_rram_reference.json`` (settings, numbers and what
aihwkit said; ``tests/chip/test_rram.py`` reads it and never aihwkit). Three levels:

* ``conductance``: ``ReRamWan2022NoiseModel(g_max, noise_scale)`` on fixed target conductances
  ``g_T = r * g_max``, r = 0, 0.1, ..., 1, ``N`` copies each: ``apply_programming_noise_to_
  conductance(g_T)`` (t = 0) and ``apply_drift_noise_to_conductance(g_p, g_T, t)`` at each key.
  Per target: mean and std of the conductances and their standard errors (from the sample's
  second and fourth central moments; all draws independent).
* ``weights``: fixed weights ``W`` (``make_weights``), ``apply_programming_noise(W)`` then
  ``apply_drift_noise(W_prog, params, t)``, ``CHIPS`` times: the error ``e = W_t - W`` times
  sign(W), binned by ``|W| / max|W|`` (the target's ``r``); per bin the mean over chips of each
  chip's mean and std of it, with standard errors over the chips (a chip is the unit: its draws
  at t > 0 share the re-mapped scale).
* ``tile``: ``AnalogLinear(1024, 64)`` with ``InferenceRPUConfig`` (``is_perfect`` forward, so
  compensation read-outs are exact; default ``GlobalDriftCompensation``; 2 tiles of 512 inputs)
  holding ``W``: ``program_analog_weights`` then ``drift_analog_weights(t)``, ``CHIPS`` times;
  each tile's gain ``alpha`` at each time: its mean and std over chips (and the gain right
  after programming, which ``program_analog_weights`` does not reset).

The draws come from torch's global RNG, seeded per case (``torch.manual_seed``); the weights from
a CPU generator (their sha256 is in the JSON, so the test checks it regenerates them).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().with_suffix(".json")
TIMES = (1.0, 86400.0, 172800.0)
RATIOS = [i / 10 for i in range(11)]  # target conductances r * g_max
N = 20_000  # copies per target: SE of a std ~0.5 % of it
CONDUCTANCE_CASES = {
    "g25": {"g_max": 25.0, "noise_scale": 1.0, "seed": 1},  # aihwkit's defaults
    "g10_scale2": {"g_max": 10.0, "noise_scale": 2.0, "seed": 2},  # the std is in uS whatever g_max
}
WEIGHTS = {"seed": 20260101, "out_features": 64, "in_features": 1024, "bound": 0.1}
BINS = 10  # |W| / max|W| in [0, 0.1), ..., [0.9, 1.0]
CHIPS = 100
WEIGHT_SEED, TILE_SEED = 3, 4


def make_weights(spec: dict = WEIGHTS) -> torch.Tensor:
    """Uniform in ``[-bound, bound)``, ``(out, in)``, from a CPU generator seeded by
    ``spec['seed']``: every bin of ``|W| / max|W|`` holds about a tenth of the weights."""
    g = torch.Generator().manual_seed(spec["seed"])
    u = torch.rand(spec["out_features"], spec["in_features"], generator=g)
    return (2 * u - 1) * spec["bound"]


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().float().numpy().tobytes()).hexdigest()


def moments(x: torch.Tensor) -> dict:
    """Mean, std and their standard errors of independent draws ``x`` (1-d)."""
    x = x.double()
    n, m, sd = x.numel(), x.mean().item(), x.std().item()
    m4 = ((x - m) ** 4).mean().item()
    se_std = math.sqrt(max(m4 - sd**4, 0.0) / (4 * n)) / sd if sd > 0 else 0.0
    return {"n": n, "mean": m, "std": sd, "se_mean": sd / math.sqrt(n), "se_std": se_std}


def over_units(values: list[float]) -> tuple[float, float]:
    """Mean of per-unit values and its standard error."""
    v = torch.tensor(values, dtype=torch.float64)
    return v.mean().item(), (v.std() / math.sqrt(len(v))).item()


def conductance_case(spec: dict) -> dict:
    from aihwkit.inference import ReRamWan2022NoiseModel

    model = ReRamWan2022NoiseModel(g_max=spec["g_max"], noise_scale=spec["noise_scale"])
    torch.manual_seed(spec["seed"])
    g = (torch.tensor(RATIOS) * spec["g_max"]).unsqueeze(1).expand(-1, N).contiguous()
    prog = model.apply_programming_noise_to_conductance(g)
    out = {"0": [moments(row) for row in prog]}
    for t in TIMES:
        drawn = model.apply_drift_noise_to_conductance(prog, g, t)
        out[f"{t:g}"] = [moments(row) for row in drawn]
    return {**spec, "ratios": RATIOS, "stats": out}


def binned(w: torch.Tensor, w_t: torch.Tensor) -> list[tuple[float, float]]:
    """Per ``|W| / max|W|`` bin: the mean and std of ``(W_t - W) sign(W)`` on one chip."""
    r = w.abs() / w.abs().max()
    index = (r * BINS).long().clamp_max(BINS - 1)
    e = (w_t - w) * w.sign()
    return [(e[index == b].mean().item(), e[index == b].std().item()) for b in range(BINS)]


def weight_case(w: torch.Tensor) -> dict:
    from aihwkit.inference import ReRamWan2022NoiseModel

    model = ReRamWan2022NoiseModel()
    torch.manual_seed(WEIGHT_SEED)
    per_time: dict[str, list] = {"0": [], **{f"{t:g}": [] for t in TIMES}}
    for _ in range(CHIPS):
        w_prog, params = model.apply_programming_noise(w)
        per_time["0"].append(binned(w, w_prog))
        for t in TIMES:
            per_time[f"{t:g}"].append(binned(w, model.apply_drift_noise(w_prog, params, t)))
    stats = {}
    for key, chips in per_time.items():
        rows = []
        for b in range(BINS):
            mean, se_mean = over_units([c[b][0] for c in chips])
            std, se_std = over_units([c[b][1] for c in chips])
            rows.append({"mean": mean, "se_mean": se_mean, "std": std, "se_std": se_std})
        stats[key] = rows
    r = w.abs() / w.abs().max()
    counts = torch.bincount(
        (r * BINS).long().clamp_max(BINS - 1).flatten(), minlength=BINS
    ).tolist()
    return {"bins": BINS, "chips": CHIPS, "seed": WEIGHT_SEED, "counts": counts, "stats": stats}


def tile_case(w: torch.Tensor) -> dict:
    from aihwkit.exceptions import ArgumentError
    from aihwkit.inference import ReRamWan2022NoiseModel
    from aihwkit.nn import AnalogLinear
    from aihwkit.simulator.configs import InferenceRPUConfig

    rpu = InferenceRPUConfig()
    rpu.noise_model = ReRamWan2022NoiseModel()
    rpu.forward.is_perfect = True  # exact compensation read-outs
    rpu.mapping.max_input_size = 512
    layer = AnalogLinear(w.shape[1], w.shape[0], bias=False, rpu_config=rpu).eval()
    layer.set_weights(w)
    tiles = list(layer.analog_tiles())
    torch.manual_seed(TILE_SEED)
    alphas: dict[str, list] = {f"{t:g}": [] for t in TIMES}
    after_program = []  # the gain right after programming, before any drift
    for _ in range(CHIPS):
        layer.program_analog_weights()
        after_program.append([tile.alpha.item() for tile in tiles])
        for t in TIMES:
            layer.drift_analog_weights(t)
            alphas[f"{t:g}"].append([tile.alpha.item() for tile in tiles])
    try:
        layer.drift_analog_weights(3600.0)
        refused = None
    except ArgumentError as err:
        refused = str(err)
    stats = {
        key: [dict(zip(("mean", "se_mean"), over_units([c[i] for c in chips]), strict=True))
              | {"std": torch.tensor([c[i] for c in chips]).std().item()}
              for i in range(len(tiles))]
        for key, chips in alphas.items()
    }  # fmt: skip
    return {
        "tiles": len(tiles),
        "max_input_size": 512,
        "chips": CHIPS,
        "seed": TILE_SEED,
        "drift_compensation": type(rpu.drift_compensation).__name__,
        "drift_at_3600_s": refused,
        # 1 on the fresh layer; programming again keeps the last drift's gain (not reset)
        "alpha_after_first_program": after_program[0],
        "alpha_after_second_program": after_program[1],
        "stats": stats,
    }


def quirks() -> dict:
    """What aihwkit's code does where its docstrings say otherwise (recorded, not asserted)."""
    from aihwkit.inference import ReRamWan2022NoiseModel

    model = ReRamWan2022NoiseModel()
    try:
        ReRamWan2022NoiseModel(coeff_g_max_reference=40.0).apply_programming_noise_to_conductance(
            torch.ones(2)
        )
        given = "ok"
    except AttributeError as err:
        given = f"AttributeError: {err}"
    torch.manual_seed(0)
    a = model.apply_drift_noise_to_conductance(torch.zeros(4), torch.full((4,), 10.0), 86400.0)
    torch.manual_seed(0)
    b = model.apply_drift_noise_to_conductance(
        torch.full((4,), 1e3), torch.full((4,), 10.0), 86400.0
    )
    return {
        "coeff_g_max_reference": model.coeff_g_max_reference,
        "prog_coeff_g_max_reference": model.prog_coeff_g_max_reference,
        "coeff_dic": {f"{k:g}": v for k, v in model.coeff_dic.items()},
        "coeff_g_max_reference_given": given,
        "drift_ignores_g_prog": bool(torch.equal(a, b)),
    }


def main() -> None:
    import aihwkit

    start = time.time()
    w = make_weights()
    result = {
        "aihwkit_version": aihwkit.__version__,
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "script": "benchmarks/aihwkit_rram_reference.py",
        "times": list(TIMES),
        "weights": WEIGHTS,
        "weights_sha256": sha256(w),
        "quirks": quirks(),
        "conductance": {name: conductance_case(spec) for name, spec in CONDUCTANCE_CASES.items()},
        "weights_case": weight_case(w),
        "tile": tile_case(w),
    }
    result["seconds"] = round(time.time() - start, 1)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT} in {result['seconds']} s")


if __name__ == "__main__":
    main()
