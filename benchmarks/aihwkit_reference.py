"""Reference statistics of IBM aihwkit's crossbar periphery and PCM model, for cimsim's cross-check.

    nice -n 10 <python with aihwkit 1.2.0> benchmarks/aihwkit_reference.py   # ~20 s, 1 core

Runs in an environment that has aihwkit (never the project's: aihwkit is not a cimsim
dependency). It regenerates fixed weights and inputs from seeds (``make_data``: a CPU
``torch.Generator`` and ``torch.randn``, identical across environments with the same torch
version; the JSON keeps their sha256 so ``tests/test_aihwkit_crosscheck.py`` can verify that it
regenerates the same tensors), runs them through ``aihwkit.nn.AnalogLinear`` /
``AnalogConv2d`` with an ``InferenceRPUConfig`` (``rpu_config``), and writes the statistics of
the output error ``e = y_aihwkit - y_ideal`` (``y_ideal`` = ``F.linear`` / ``F.conv2d`` with the
same weights and bias) to ``benchmarks/aihwkit_reference.json``: settings and numbers only.

Cases (``cases``):

* periphery: out_noise in {0, 0.04, 0.06} x max_input_size in {256, 512}, 8-bit DAC and ADC
  (255 levels), abs-max noise management, no bound management, no weight noise, no
  programming: the reference (unprogrammed) weights read in eval mode, ``REPS`` forwards.
  ``out_noise = 0`` is the quantization-only companion of the noisy cases.
* pcm: ``PCMLikeNoiseModel(g_max=25)`` with ``GlobalDriftCompensation``, max_input_size 256,
  out_noise in {0.04, 0 (companion)}, at t_inference in {0, 3600, 31536000} s: ``CHIPS``
  programmings (``program_analog_weights``) x ``READS`` read-outs (``drift_analog_weights(t)``,
  which redraws read noise and re-reads the compensation) with one forward each.
* pcm, ``_exactreadout`` (a diagnostic, not aihwkit's model): the same PCM cases with the drift
  compensation read-out made exact (``exact_compensation_readout``), to tell the effect of
  aihwkit reading the compensation through the tile's periphery apart from the device model.

Statistics per case: over all output elements and all repetitions (or chips x reads), the mean
and std (population) of e and the mean of |e|; ``se_mean`` / ``se_std`` are the standard
errors from the spread of the per-unit values (a unit is one forward, or one chip with its
reads) over the units. The inputs and weights are fixed, so this is the error of the estimate
due to aihwkit's random draws (output noise, programming, drift, read noise), the part that
differs between two simulators run on the same data.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().with_suffix(".json")

# The data (also in the JSON: the test regenerates from there).
DATA = {
    "linear": {
        "seed": 20250101,
        "in_features": 1024,
        "out_features": 64,
        "batch": 64,
        "weight_std": 0.05,
        "bias_std": 0.05,
    },
    "conv": {
        "seed": 20250102,
        "in_channels": 128,
        "out_channels": 32,
        "kernel_size": 3,
        "padding": 1,
        "batch": 8,
        "image": 8,
        "weight_std": 0.05,
        "bias_std": 0.05,
    },
}
LEVELS = 255  # 8 bits: aihwkit's res 1 / (2**8 - 2), 255 levels, zero included
OUT_BOUND = 12.0
REPS = 20  # forwards per noisy periphery case
CHIPS, READS = 40, 2  # PCM programmings x read-outs per time: se of the mean ~1 % of the std
TIMES = (0.0, 3600.0, 31536000.0)
PCM_TILE = 256
PCM_OUT_NOISE = 0.04


def make_data(layer: str, spec: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weight, bias, x)``: weight and bias ~ randn * std, x = relu(randn), in this order from
    one CPU generator seeded by ``spec['seed']``."""
    g = torch.Generator().manual_seed(spec["seed"])
    if layer == "linear":
        w_shape = (spec["out_features"], spec["in_features"])
        x_shape = (spec["batch"], spec["in_features"])
        out = spec["out_features"]
    else:
        k = spec["kernel_size"]
        w_shape = (spec["out_channels"], spec["in_channels"], k, k)
        x_shape = (spec["batch"], spec["in_channels"], spec["image"], spec["image"])
        out = spec["out_channels"]
    weight = torch.randn(w_shape, generator=g) * spec["weight_std"]
    bias = torch.randn(out, generator=g) * spec["bias_std"]
    x = torch.relu(torch.randn(x_shape, generator=g))
    return weight, bias, x


def data_sha256(weight, bias, x) -> str:
    h = hashlib.sha256()
    for t in (weight, bias, x):
        h.update(t.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def ideal(layer: str, spec: dict, weight, bias, x) -> torch.Tensor:
    if layer == "linear":
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=spec["padding"])


def rpu_config(max_input_size: int, out_noise: float, pcm: bool, exact: bool = False):
    """The aihwkit configuration of a case (every field that matters set explicitly)."""
    from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel
    from aihwkit.simulator.configs import InferenceRPUConfig
    from aihwkit.simulator.parameters.enums import (
        BoundManagementType,
        NoiseManagementType,
        WeightClipType,
        WeightModifierType,
        WeightNoiseType,
        WeightRemapType,
    )

    rpu = InferenceRPUConfig()
    m = rpu.mapping
    m.digital_bias = True
    m.weight_scaling_omega = 1.0  # each tile's max |w| -> 1 (per tile: set per InferenceTile)
    m.weight_scaling_columnwise = False
    m.learn_out_scaling = False  # no out_scaling_alpha: mapping_scales alone restore the units
    m.out_scaling_columnwise = False
    m.max_input_size = max_input_size
    m.max_output_size = 0
    f = rpu.forward
    f.is_perfect = False
    f.inp_bound = 1.0
    f.inp_res = 0.0 if exact else 1 / (2**8 - 2)
    f.inp_noise = 0.0
    f.inp_sto_round = False
    f.out_bound = 0.0 if exact else OUT_BOUND  # <= 0: no bound
    f.out_res = 0.0 if exact else 1 / (2**8 - 2)
    f.out_noise = out_noise
    f.out_noise_std = 0.0
    f.out_sto_round = False
    f.noise_management = NoiseManagementType.ABS_MAX
    f.bound_management = BoundManagementType.NONE
    f.w_noise = 0.0
    f.w_noise_type = WeightNoiseType.NONE
    f.ir_drop = 0.0
    f.out_nonlinearity = 0.0
    f.slope_calibration = 0.0
    f.v_offset_std = 0.0
    f.r_series = 0.0
    rpu.modifier.type = WeightModifierType.NONE
    rpu.clip.type = WeightClipType.NONE
    rpu.remap.type = WeightRemapType.NONE
    if pcm:
        rpu.noise_model = PCMLikeNoiseModel(g_max=25.0)
        rpu.drift_compensation = GlobalDriftCompensation()
    else:
        rpu.drift_compensation = None  # alpha stays 1 either way without programming
    return rpu


def build(layer: str, spec: dict, rpu, weight, bias):
    from aihwkit.nn import AnalogConv2d, AnalogLinear

    if layer == "linear":
        mod = AnalogLinear(spec["in_features"], spec["out_features"], bias=True, rpu_config=rpu)
    else:
        mod = AnalogConv2d(
            spec["in_channels"],
            spec["out_channels"],
            spec["kernel_size"],
            padding=spec["padding"],
            bias=True,
            rpu_config=rpu,
        )
    mod.set_weights(weight, bias)
    return mod.eval()


def tiles_of(mod) -> list:
    return list(mod.analog_tiles())


def summarize(errors: list[torch.Tensor]) -> dict:
    """Statistics of e over all elements of all units (each entry of ``errors`` is one unit)."""
    e = torch.stack([u.double().flatten() for u in errors])  # (units, elements)
    units = e.shape[0]
    mean = e.mean().item()
    std = e.std(unbiased=False).item()

    def se(per_unit: torch.Tensor) -> float:
        return per_unit.std(unbiased=True).item() / math.sqrt(units) if units > 1 else 0.0

    return {
        "n": e.numel(),
        "units": units,
        "mean": mean,
        "std": std,
        "mean_abs": e.abs().mean().item(),
        "se_mean": se(e.mean(dim=1)),
        "se_std": se(e.std(dim=1, unbiased=False)),
    }


def periphery_case(layer, spec, data, max_input_size, out_noise) -> dict:
    weight, bias, x = data
    y0 = ideal(layer, spec, weight, bias, x)
    mod = build(layer, spec, rpu_config(max_input_size, out_noise, pcm=False), weight, bias)
    reps = REPS if out_noise > 0 else 2  # out_noise 0 is deterministic (checked below)
    with torch.no_grad():
        errors = [mod(x) - y0 for _ in range(reps)]
    if out_noise == 0:
        assert torch.equal(errors[0], errors[1]), "quantization-only output is not deterministic"
    tiles = tiles_of(mod)
    return {
        "kind": "periphery",
        "layer": layer,
        "max_input_size": max_input_size,
        "out_noise": out_noise,
        "tiles": len(tiles),
        "tile_rows": [t.in_size for t in tiles],
        "signal_std": y0.std(unbiased=False).item(),
        **summarize(errors),
    }


@contextlib.contextmanager
def exact_compensation_readout():
    """A diagnostic, not aihwkit's model: drift compensation reads the tile's current weights
    exactly (``eye @ W.T`` of the simulator tile's normalized weights, no DAC, output noise or
    ADC), as cimsim does, instead of ``InferenceTileWithPeriphery._forward_drift_readout_tensor``'s
    ``self.tile.forward`` through the periphery. Reference (after programming) and every
    re-read are replaced alike."""
    from aihwkit.simulator.tiles.inference import InferenceTileWithPeriphery

    original = InferenceTileWithPeriphery._forward_drift_readout_tensor

    def exact(self, reset_if=False, exact_reference=False):
        if getattr(self.rpu_config, "drift_compensation", None) is None:
            return None
        w = torch.as_tensor(self.tile.get_weights())  # (out, in), normalized units
        return torch.eye(w.shape[1], dtype=w.dtype) @ w.T

    InferenceTileWithPeriphery._forward_drift_readout_tensor = exact
    try:
        yield
    finally:
        InferenceTileWithPeriphery._forward_drift_readout_tensor = original


def pcm_cases(layer, spec, data, out_noise, exact_readout: bool = False) -> list[dict]:
    """One case per t_inference; the same CHIPS programmings for every t."""
    weight, bias, x = data
    y0 = ideal(layer, spec, weight, bias, x)
    mod = build(layer, spec, rpu_config(PCM_TILE, out_noise, pcm=True), weight, bias)
    per_t = {t: [] for t in TIMES}
    alphas = {t: [] for t in TIMES}
    patch = exact_compensation_readout() if exact_readout else contextlib.nullcontext()
    with torch.no_grad(), patch:
        for chip in range(CHIPS):
            torch.manual_seed(1000 + chip)  # PCM draws: torch's global generator (randn_like)
            mod.program_analog_weights()
            for t in TIMES:
                chip_errors = []
                for _ in range(READS):
                    mod.drift_analog_weights(t)  # fresh read noise and compensation read-out
                    chip_errors.append(mod(x) - y0)
                    alphas[t].append([float(tile.alpha.flatten()[0]) for tile in tiles_of(mod)])
                per_t[t].append(torch.stack(chip_errors))
    tiles = tiles_of(mod)
    out = []
    for t in TIMES:
        a = torch.tensor(alphas[t], dtype=torch.float64)  # (chips * reads, tiles)
        out.append(
            {
                "kind": "pcm",
                "layer": layer,
                "max_input_size": PCM_TILE,
                "out_noise": out_noise,
                "t_inference": t,
                "compensation_readout": "exact (diagnostic)" if exact_readout else "periphery",
                "chips": CHIPS,
                "reads": READS,
                "tiles": len(tiles),
                "tile_rows": [tile.in_size for tile in tiles],
                "signal_std": y0.std(unbiased=False).item(),
                "alpha_mean_per_tile": a.mean(dim=0).tolist(),
                "alpha_std_per_tile": a.std(dim=0).tolist(),
                **summarize(per_t[t]),
            }
        )
    return out


def exact_check(layer, spec, data) -> float:
    """Max |y - y_ideal| / std(y_ideal) with the periphery made exact (no quantization, bound or
    noise): checks that the mapping scales bring the output back to physical units."""
    weight, bias, x = data
    y0 = ideal(layer, spec, weight, bias, x)
    mod = build(layer, spec, rpu_config(256, 0.0, pcm=False, exact=True), weight, bias)
    with torch.no_grad():
        y = mod(x)
    return ((y - y0).abs().max() / y0.std()).item()


def case_name(c: dict) -> str:
    noise = f"noise{c['out_noise']:g}"
    if c["kind"] == "periphery":
        return f"{c['layer']}_m{c['max_input_size']}_{noise}"
    exact = "_exactreadout" if c["compensation_readout"].startswith("exact") else ""
    return f"{c['layer']}_pcm_t{c['t_inference']:.0f}_{noise}{exact}"


NOTES = {
    "units": (
        "e = y_aihwkit - y_ideal in the layer's physical output units; mean/std over all output "
        "elements and all units (forwards, or chips x reads); se_* = std over units / sqrt(units)"
    ),
    "bound_management": (
        "forward.bound_management = NONE: outputs beyond out_bound clip. cimsim has no iterative "
        "bound management (aihwkit's default ITERATIVE halves the inputs and recomputes until no "
        "output clips)."
    ),
    "quantization": (
        "C++ src/rpucuda/rpu_pulsed_meta_parameter.cpp IOMetaParameter::initializeForForward: "
        "res -> res * 2 * bound, so inp_res = out_res = 1/(2**8-2) give steps 2/254 of the "
        "input range [-1, 1] (after abs-max scaling) and 24/254 of [-12, 12] (normalized "
        "outputs): 255 levels with an exact zero. rpu_forward_backward_pass.cpp "
        "prepareInputImplStage4: x/max|x| rounded then clipped; finalizeOutputImplStage5: "
        "out_noise added, rounded (rintf: half to even, as torch.round), clipped to "
        "+-out_bound; the result is multiplied by max|x| (forwardVector, abs_max noise "
        "management), then by the tile's mapping scale max|w_tile|/omega "
        "(simulator/tiles/periphery.py TileWithPeriphery.post_forward)."
    ),
    "mapping": (
        "weight_scaling_omega=1, columnwise=False: TileModuleArray.set_weights "
        "(simulator/tiles/array.py) passes each tile its slice and TileWithPeriphery."
        "apply_weight_scaling (simulator/tiles/periphery.py) divides it by that tile's own "
        "max|w|, stored as the tile's mapping_scales and multiplied back in post_forward: "
        "per-tile normalization, output in physical units. learn_out_scaling=False so "
        "out_scaling_alpha is None and apply_out_scaling is a no-op (checked: with an exact "
        "periphery y equals y_ideal, see exact_check)."
    ),
    "tiling": (
        "TileModuleArray.get_split_sizes: ceil(in/max_input_size) tiles of balanced sizes "
        "(differ by at most one) over the layer's input rows. aihwkit's AnalogConv2d (nn/modules/"
        "conv.py, CPU: unfold, not indexed) unrolls a conv to C_in*k*k = 1152 rows in "
        "(channel, kh, kw) order, so its tiles split inside a channel's kernel: 256 -> 5 tiles of "
        "[231, 231, 230, 230, 230] rows, 512 -> 3 tiles of 384 rows. cimsim keeps whole channels "
        "per tile (tile_rows // 9 channels): 256 -> 5 tiles of [26, 26, 26, 25, 25] channels = "
        "[234, 234, 234, 225, 225] rows, 512 -> 3 tiles of [43, 43, 42] channels = [387, 387, "
        "378] rows: the same tile counts, boundaries up to 9 rows apart. A conv's input vector "
        "is one unfolded patch (one output position) restricted to the tile's rows, zero "
        "padding included: its abs-max scaling (and so the DAC grid and the output unit) is per "
        "patch and tile."
    ),
    "pcm_per_tile": (
        "Everything PCM is per tile in a tiled layer: nn/modules/base.py "
        "program_analog_weights / drift_analog_weights loop over analog_tiles(); each "
        "InferenceTile (simulator/tiles/inference.py InferenceTileWithPeriphery.program_weights) "
        "programs its own reference_combined_weights (already normalized to the tile's max|w| = "
        "1), and inference/converter/conductance.py SinglePairConductanceConverter."
        "convert_to_conductances maps abs-max of that tile's weights to g_max = 25 uS. Each tile "
        "has its own drift_baseline and alpha (drift compensation per tile), applied in "
        "InferenceTileWithPeriphery.post_forward after the tile's ADC and mapping scale (digital), "
        "before TileModuleArray adds the tiles and the digital bias."
    ),
    "pcm_drift_remap": (
        "inference/noise/base.py BaseNoiseModel.apply_drift_noise re-converts the programmed "
        "weights to conductances (new abs max, one device of each pair at 0) before drift and "
        "read noise; the drift exponents nu are those drawn from the original targets "
        "(cimsim's pcm.remap_programmed=true)."
    ),
    "pcm_t0": (
        "inference/noise/pcm.py PCMLikeNoiseModel: t_0 = 20 s, t = t_inference + t_0; drift "
        "(t/t_0)^-nu only when t > t_0; 1/f read noise sqrt(ln((t + t_read)/(2 t_read))) for any "
        "t > 0, so already at t_inference = 0. 't = 0' here is program_analog_weights() then "
        "drift_analog_weights(0.0): programmed weights + read noise, no drift, compensation "
        "re-read (a forward right after program_analog_weights alone would have no read noise "
        "and alpha = 1)."
    ),
    "pcm_compensation_readout": (
        "inference/compensation/drift.py GlobalDriftCompensation: readout = max(mean|out|, 1e-4) "
        "of the tile's outputs for the one-hot inputs eye(in_size); base.py init_baseline reads "
        "it right after programming (no read noise) with exact_reference=False, i.e. "
        "InferenceTileWithPeriphery._forward_drift_readout_tensor calls self.tile.forward: the "
        "read-out goes through the tile's periphery (abs-max scaling, DAC, out_noise, 255-level "
        "ADC over +-12 of the normalized unit), in normalized units. alpha = reference / "
        "readout(drifted) per tile, re-read (fresh output noise) at every drift_analog_weights."
    ),
    "rng": (
        "The C++ CPU simulator draws output noise from a per-tile table of 32768 Gaussians "
        "indexed by rand() (rpucuda/rng.h RNG::sampleGauss), seeded from the clock: the "
        "periphery cases are not bit-reproducible. PCM draws use torch's global generator "
        "(torch.manual_seed(1000 + chip) before each programming)."
    ),
}


def main() -> None:
    import aihwkit

    torch.set_num_threads(1)
    start = time.time()
    data = {layer: make_data(layer, spec) for layer, spec in DATA.items()}
    cases = []
    for layer, spec in DATA.items():
        for size in (256, 512):
            for noise in (0.0, 0.04, 0.06):
                cases.append(periphery_case(layer, spec, data[layer], size, noise))
                print(case_name(cases[-1]), f"{time.time() - start:.0f}s", flush=True)
        for exact_readout in (False, True):
            for noise in (PCM_OUT_NOISE, 0.0):
                cases += pcm_cases(layer, spec, data[layer], noise, exact_readout)
                print(case_name(cases[-1]), f"{time.time() - start:.0f}s", flush=True)
    named = {}
    for c in cases:
        companion = dict(c, out_noise=0.0)
        c["quantization_only"] = case_name(companion) if c["out_noise"] > 0 else None
        named[case_name(c)] = c
    exact = {layer: exact_check(layer, spec, data[layer]) for layer, spec in DATA.items()}
    result = {
        "aihwkit_version": aihwkit.__version__,
        "torch_version": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "script": "benchmarks/aihwkit_reference.py",
        "data": DATA,
        "data_sha256": {layer: data_sha256(*data[layer]) for layer in DATA},
        "settings": {
            "rpu_config": "InferenceRPUConfig; see rpu_config() in the script",
            "mapping": {
                "digital_bias": True,
                "weight_scaling_omega": 1.0,
                "weight_scaling_columnwise": False,
                "learn_out_scaling": False,
                "max_output_size": 0,
            },
            "forward": {
                "inp_bound": 1.0,
                "inp_res": 1 / (2**8 - 2),
                "out_bound": OUT_BOUND,
                "out_res": 1 / (2**8 - 2),
                "noise_management": "ABS_MAX",
                "bound_management": "NONE",
                "w_noise": 0.0,
                "inp_noise": 0.0,
                "out_noise_std": 0.0,
            },
            "levels": LEVELS,
            "pcm": {
                "noise_model": "PCMLikeNoiseModel(g_max=25.0) (defaults otherwise)",
                "drift_compensation": "GlobalDriftCompensation()",
                "max_input_size": PCM_TILE,
                "times_s": list(TIMES),
            },
            "reps": REPS,
            "chips": CHIPS,
            "reads": READS,
        },
        "exact_periphery_max_rel_error": exact,
        "notes": NOTES,
        "cases": named,
        "runtime_s": round(time.time() - start, 1),
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT} ({len(named)} cases, {time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
