"""Reference outputs of IBM aihwkit's IR drop (C++ tile), for cimsim's cross-check.

    nice -n 10 <python with aihwkit 1.2.0> benchmarks/aihwkit_ir_drop_reference.py   # ~5 s

Runs in an environment that has aihwkit (never the project's: aihwkit is not a cimsim
dependency). It regenerates fixed weights and inputs from seeds (``make_data``: a CPU
``torch.Generator``; the JSON keeps their sha256 so ``tests/chip/test_ir_drop.py`` can check that
it regenerates the same tensors), runs them through ``aihwkit.nn.AnalogLinear`` /
``AnalogConv2d`` on aihwkit's C++ CPU tile (``InferenceRPUConfig``) twice, with
``forward.ir_drop`` set and with it 0, and writes the IR drop's effect on every output,
``delta = y(ir_drop) - y(0)``, to ``benchmarks/aihwkit_ir_drop_reference.json``.

Everything else is made exact so that ``delta`` is the IR drop alone: no input or output
quantization (``inp_res = out_res = 0``; one case keeps aihwkit's 8-bit DAC, whose quantized
inputs the drop is computed from), no output noise, no output bound (``out_bound = 0``), no
bound management, no weight noise; abs-max noise management (cimsim's per-vector input scale);
each tile's weights mapped to ``max |w| = 1`` (``weight_scaling_omega = 1``, per tile, so the
drop's current is in aihwkit's normalized units, as on a chip) with a digital bias (none here).
The forward is deterministic (checked: two forwards agree bit for bit).

Cases: Linear layers of 1 tile (64 rows), 4 tiles (1024 rows, 256 per tile), 2 unequal tiles
(301 rows: 151 + 150, which cimsim pads to equal groups), signed inputs, aihwkit's 8-bit DAC;
Conv2d layers of 2 tiles (32 channels x 3 x 3 = 288 rows, 144 per tile: 16 whole channels, the
same split in aihwkit, which splits unrolled rows, and cimsim, which splits channels) and of 2
unequal channel tiles (17 channels as 9 + 8, built as two single-tile aihwkit convs on the
channel slices, summed: aihwkit's own split of 153 rows would cut a channel's kernel); ir_drop
in {0.1, 0.5, 1.0} at aihwkit's ``ir_drop_g_ratio`` (1 / 0.35 / 5e-6) and 1.0 at 1/100 of it,
where the current ``a`` reaches the cubic terms of the drop's fit.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().with_suffix(".json")
G_RATIO = 1.0 / 0.35 / 5e-6  # aihwkit's IOParameters.ir_drop_g_ratio default

# The data (also in the JSON: the test regenerates from there). inputs: relu(randn) or randn.
DATA = {
    "lin64": {"layer": "linear", "seed": 31, "in_features": 64, "out_features": 8, "batch": 8},
    "lin1024": {"layer": "linear", "seed": 32, "in_features": 1024, "out_features": 8, "batch": 8},
    "lin301": {"layer": "linear", "seed": 33, "in_features": 301, "out_features": 8, "batch": 8},
    "lin512_signed": {
        "layer": "linear",
        "seed": 34,
        "in_features": 512,
        "out_features": 8,
        "batch": 8,
        "signed": True,
    },
    "conv32": {"layer": "conv", "seed": 35, "in_channels": 32, "out_channels": 4, "image": 5},
    "conv17": {"layer": "conv", "seed": 36, "in_channels": 17, "out_channels": 4, "image": 5},
}
for _spec in DATA.values():
    _spec.setdefault("weight_std", 0.05)
    _spec.setdefault("signed", False)
    if _spec["layer"] == "conv":
        _spec.update(kernel_size=3, padding=1, batch=2)

# (data, aihwkit max_input_size, cimsim tile_rows, ir_drop, g_ratio factor, 8-bit DAC); for
# conv17 the aihwkit tiles are the channel slices ``parts`` (max_input_size unused).
CASES = [
    *[("lin64", 64, None, ir, 1.0, False) for ir in (0.1, 0.5, 1.0)],
    *[("lin1024", 256, 256, ir, 1.0, False) for ir in (0.1, 0.5, 1.0)],
    ("lin1024", 256, 256, 1.0, 0.01, False),
    ("lin1024", 256, 256, 1.0, 0.01, True),
    ("lin301", 256, 256, 1.0, 1.0, False),
    ("lin301", 256, 256, 1.0, 0.01, False),
    ("lin512_signed", 256, 256, 1.0, 0.01, False),
    *[("conv32", 144, 144, ir, 1.0, False) for ir in (0.5, 1.0)],
    ("conv32", 144, 144, 1.0, 0.01, False),
    ("conv17", None, 81, 1.0, 0.01, False),
]
PARTS = {"conv17": [9, 8]}  # channels per aihwkit single-tile conv


def make_data(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, x)``: weight ~ randn * weight_std, then x = relu(randn) (or randn when
    ``signed``), in this order from one CPU generator seeded by ``spec['seed']``."""
    g = torch.Generator().manual_seed(spec["seed"])
    if spec["layer"] == "linear":
        w_shape = (spec["out_features"], spec["in_features"])
        x_shape = (spec["batch"], spec["in_features"])
    else:
        k = spec["kernel_size"]
        w_shape = (spec["out_channels"], spec["in_channels"], k, k)
        x_shape = (spec["batch"], spec["in_channels"], spec["image"], spec["image"])
    weight = torch.randn(w_shape, generator=g) * spec["weight_std"]
    x = torch.randn(x_shape, generator=g)
    return weight, (x if spec["signed"] else torch.relu(x))


def data_sha256(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def rpu_config(max_input_size: int, ir_drop: float, g_ratio: float, dac: bool):
    """The aihwkit configuration of a case (every field that matters set explicitly)."""
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
    m.weight_scaling_omega = 1.0  # each tile's max |w| -> 1 (its mapping scale restores units)
    m.weight_scaling_columnwise = False
    m.learn_out_scaling = False
    m.out_scaling_columnwise = False
    m.max_input_size = max_input_size
    m.max_output_size = 0
    f = rpu.forward
    f.is_perfect = False
    f.inp_bound = 1.0
    f.inp_res = 1 / (2**8 - 2) if dac else 0.0
    f.inp_noise = 0.0
    f.inp_sto_round = False
    f.out_bound = 0.0  # <= 0: no bound
    f.out_res = 0.0
    f.out_noise = 0.0
    f.out_noise_std = 0.0
    f.noise_management = NoiseManagementType.ABS_MAX
    f.bound_management = BoundManagementType.NONE
    f.w_noise = 0.0
    f.w_noise_type = WeightNoiseType.NONE
    f.ir_drop = ir_drop
    f.ir_drop_g_ratio = g_ratio
    f.out_nonlinearity = 0.0
    f.slope_calibration = 0.0
    f.v_offset_std = 0.0
    f.r_series = 0.0
    rpu.modifier.type = WeightModifierType.NONE
    rpu.clip.type = WeightClipType.NONE
    rpu.remap.type = WeightRemapType.NONE
    rpu.drift_compensation = None
    return rpu


def forward(spec: dict, weight, x, rpu) -> tuple[torch.Tensor, list[int]]:
    """aihwkit's output and its tiles' row counts."""
    from aihwkit.nn import AnalogConv2d, AnalogLinear

    if spec["layer"] == "linear":
        mod = AnalogLinear(spec["in_features"], spec["out_features"], bias=False, rpu_config=rpu)
    else:
        c_in, c_out, k = weight.shape[1], spec["out_channels"], spec["kernel_size"]
        mod = AnalogConv2d(c_in, c_out, k, padding=spec["padding"], bias=False, rpu_config=rpu)
    mod.set_weights(weight, None)
    mod.eval()
    with torch.no_grad():
        y = mod(x)
        assert torch.equal(y, mod(x)), "the exact periphery's forward is not deterministic"
    return y.double(), [tile.in_size for tile in mod.analog_tiles()]


def layer_output(name: str, spec: dict, data, max_input_size, ir_drop, g_ratio, dac):
    weight, x = data
    if name not in PARTS:
        return forward(spec, weight, x, rpu_config(max_input_size, ir_drop, g_ratio, dac))
    y, rows, start = 0.0, [], 0
    for c in PARTS[name]:  # one single-tile conv per channel slice, summed
        sl = slice(start, start + c)
        part, part_rows = forward(
            spec, weight[:, sl], x[:, sl], rpu_config(0, ir_drop, g_ratio, dac)
        )
        y, rows, start = y + part, rows + part_rows, start + c
    return y, rows


def run_case(name, max_input_size, tile_rows, ir_drop, g_factor, dac, data) -> dict:
    spec, g_ratio = DATA[name], G_RATIO * g_factor
    y_ir, rows = layer_output(name, spec, data, max_input_size, ir_drop, g_ratio, dac)
    y_0, _ = layer_output(name, spec, data, max_input_size, 0.0, g_ratio, dac)
    delta = y_ir - y_0
    return {
        "data": name,
        "aihwkit_max_input_size": max_input_size,
        "aihwkit_tile_rows": rows,
        "cimsim_tile_rows": tile_rows,
        "ir_drop": ir_drop,
        "ir_drop_g_ratio": g_ratio,
        "dac_levels": 255 if dac else None,
        "output_std": y_0.std(unbiased=False).item(),
        "delta_mean": delta.mean().item(),
        "delta_max_abs": delta.abs().max().item(),
        "delta_shape": list(delta.shape),
        # float32 outputs: 7 significant digits are all they hold
        "delta": [float(f"{v:.7g}") for v in delta.flatten().tolist()],
    }


def case_name(c: dict) -> str:
    g = "" if c["ir_drop_g_ratio"] == G_RATIO else f"_g{c['ir_drop_g_ratio'] / G_RATIO:g}"
    dac = "_dac" if c["dac_levels"] else ""
    return f"{c['data']}_ir{c['ir_drop']:g}{g}{dac}"


def main() -> None:
    import aihwkit

    start = time.time()
    data = {name: make_data(spec) for name, spec in DATA.items()}
    cases = {}
    for name, max_input_size, tile_rows, ir, g_factor, dac in CASES:
        case = run_case(name, max_input_size, tile_rows, ir, g_factor, dac, data[name])
        cases[case_name(case)] = case
    out = {
        "aihwkit_version": aihwkit.__version__,
        "torch_version": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "script": "benchmarks/aihwkit_ir_drop_reference.py",
        "data": DATA,
        "data_sha256": {name: data_sha256(*data[name]) for name in DATA},
        "default_ir_drop_g_ratio": G_RATIO,
        "notes": {
            "delta": (
                "y(ir_drop) - y(ir_drop=0) of aihwkit's layer (C++ CPU tile, float32), in the "
                "layer's physical output units, flattened in the output's (B, C_out[, H, W]) "
                "order; everything but the IR drop exact (see the script's docstring)"
            ),
            "source": (
                "src/rpucuda/rpu_forward_backward_pass.cpp: computeAnalogMV = prepareInput "
                "(abs-max scaling, DAC, bound, input noise) -> gemv -> applyNonIdealities "
                "(applyIrDrop, then voltage offsets, then w_noise) -> finalizeOutput (output "
                "noise, ADC, out_bound). applyIrDrop: a_i = n / ir_drop_g_ratio * sum_j |w_ij| "
                "|x_j|, c_i = a_i (a_i (0.05 a_i - 0.2) + 0.5), y_i -= ir_drop c_i sum_j w_ij x_j "
                "(1 - (1 - j/n)^2), with the scaled (and quantized) inputs and the tile's "
                "normalized weights"
            ),
        },
        "cases": cases,
        "runtime_s": round(time.time() - start, 1),
    }
    text = json.dumps(out, indent=1)
    # lists of numbers on one line each (the deltas: one line per case)
    numbers = re.compile(r"\[\s*([-0-9.e, \n]+?)\s*\]")
    text = numbers.sub(lambda m: "[" + " ".join(m[1].split()) + "]", text)
    OUT.write_text(text + "\n")
    print(f"wrote {OUT} ({len(cases)} cases, {out['runtime_s']} s)")


if __name__ == "__main__":
    main()
