"""IR drop (``AnalogConfig.ir_drop``, issue 21 item 3) against aihwkit's C++ tile and by hand.

aihwkit 1.2.0's C++ forward (``rpu_forward_backward_pass.cpp``, ``applyIrDrop``), per tile of
``n`` rows, in normalized units (weights over the tile's max ``|w|``, inputs over their max
``|x|``): ``a_i = n / g_ratio * sum_j |w_ij| |x_j|``, ``c_i = a_i (a_i (0.05 a_i - 0.2) + 0.5)``,
``y_i -= ir_drop * c_i * sum_j w_ij x_j (1 - (1 - j/n)^2)``, before output noise and the ADC.

``benchmarks/aihwkit_ir_drop_reference.json`` holds aihwkit's ``delta = y(ir_drop) - y(0)`` for
every output of fixed layers (written by ``benchmarks/aihwkit_ir_drop_reference.py`` where aihwkit
is installed; never imported here). cimsim must match it within 2 % of the case's largest
``|delta|``: the honest scale is the IR drop's own size, since it is 0.001 % to 50 % of the output
(relative to the output, 2 % would accept no IR drop at all in most cases). aihwkit computes in
float32, so its ``delta`` carries the outputs' rounding (a float32 step of ``|y|``, 0.5 % of
``max |delta|`` in the smallest case; each case checks it is under 2 %); cimsim runs in float64.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cimsim.chip.crossbar as crossbar
from cimsim import AnalogConfig, ConfigError, convert_to_analog
from cimsim.chip.config import LATER_SETTINGS
from cimsim.chip.ir_drop import DEFAULT_G_RATIO, drop_coefficient, ir_drop
from cimsim.chip.periphery import layer_tiles

REF_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "aihwkit_ir_drop_reference.json"
REF = json.loads(REF_PATH.read_text())
TOLERANCE = 0.02  # of the case's max |delta| (the brief's 2 %)


def _make_data():
    spec = importlib.util.spec_from_file_location("ir_ref", REF_PATH.with_suffix(".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports aihwkit only inside the functions that run it
    return module.make_data


make_data = _make_data()


def layer_of(spec: dict, weight: torch.Tensor) -> nn.Module:
    if spec["layer"] == "linear":
        layer = nn.Linear(spec["in_features"], spec["out_features"], bias=False)
    else:
        c_out, c_in, k = weight.shape[:3]
        layer = nn.Conv2d(c_in, c_out, k, padding=spec["padding"], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer.double()


def analog(layer: nn.Module, **chip) -> nn.Module:
    return convert_to_analog(layer, AnalogConfig(bias="digital", **chip)).eval()


def test_regenerates_the_reference_data():
    for name, spec in REF["data"].items():
        h = hashlib.sha256()
        for t in make_data(spec):
            h.update(t.contiguous().float().numpy().tobytes())
        assert h.hexdigest() == REF["data_sha256"][name], name
    assert REF["default_ir_drop_g_ratio"] == DEFAULT_G_RATIO == AnalogConfig().ir_drop_g_ratio


@pytest.mark.parametrize("name", sorted(REF["cases"]))
def test_matches_aihwkits_cpp_tile(name):
    case = REF["cases"][name]
    spec = REF["data"][case["data"]]
    weight, x = make_data(spec)
    layer = layer_of(spec, weight)
    tiles = layer_tiles(layer, case["cimsim_tile_rows"])
    per_line = 1 if spec["layer"] == "linear" else weight[0, 0].numel()
    rows = [(sl.stop - sl.start) * per_line for sl in tiles or [slice(0, weight.shape[1])]]
    assert rows == case["aihwkit_tile_rows"]  # the same tiles on both sides
    chip = {"tile_rows": case["cimsim_tile_rows"], "dac_levels": case["dac_levels"]}
    drop = {"ir_drop": case["ir_drop"], "ir_drop_g_ratio": case["ir_drop_g_ratio"]}
    with torch.no_grad():
        y_ir = analog(layer, **chip, **drop)(x.double())
        y_0 = analog(layer, **chip)(x.double())
    delta = (y_ir - y_0).flatten()
    ref = torch.tensor(case["delta"], dtype=torch.float64)
    scale = ref.abs().max().item()
    # aihwkit's delta resolves the effect: its largest value is >= 100 float32 eps of max |y|,
    # so the rounding of its float32 outputs (a step or two of eps max |y|) is < 2 % of it
    assert scale >= 100 * torch.finfo(torch.float32).eps * y_0.abs().max().item(), name
    err = (delta - ref).abs().max().item()
    assert err <= TOLERANCE * scale, (name, err / scale)


def one_tile(weight: list[float], x: list[float], scale: float, g_ratio: float, wx=(1.0, 1.0)):
    """A 1-output Linear of one tile (``len(weight)`` rows) read at ``x``: its output and the
    ideal one; ``wx`` scales weights and inputs (physical units)."""
    layer = nn.Linear(len(weight), 1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight], dtype=torch.float64) * wx[0])
        model = analog(layer, ir_drop=scale, ir_drop_g_ratio=g_ratio)
        inp = torch.tensor([x], dtype=torch.float64) * wx[1]
        return model(inp).item(), layer(inp).item()


@pytest.mark.parametrize("wx", [(1.0, 1.0), (0.2, 3.0)])
def test_three_row_tile_by_hand(wx):
    # n = 3 rows, w = [1, 0.5, 0.5] (max |w| = 1), x = [1, 1, 1] (max |x| = 1), g_ratio = 3,
    # ir_drop = 1: current sum |w||x| = 2, a = n / g * 2 = 2, c = 2 (2 (0.1 - 0.2) + 0.5) = 0.6;
    # profile 1 - (1 - j/3)^2 = [0, 5/9, 8/9], weighted = 5/9 * 0.5 + 8/9 * 0.5 = 13/18;
    # drop = 0.6 * 13/18 = 13/30, y = 2 - 13/30 = 47/30 in normalized units. Physical weights
    # 0.2 w and inputs 3 x scale y and the drop by 0.6 (u = w_max s_x; the current a is the same).
    y, ideal = one_tile([1.0, 0.5, 0.5], [1.0, 1.0, 1.0], 1.0, 3.0, wx)
    unit = wx[0] * wx[1]
    assert ideal == pytest.approx(2 * unit, rel=1e-12)
    assert y == pytest.approx(47 / 30 * unit, rel=1e-12)


def test_two_row_tile_by_hand():
    # n = 2, w = [-1, 1], x = [1, 0.5], g_ratio = 2, ir_drop = 0.5: current = 1 + 0.5 = 1.5,
    # a = 2 / 2 * 1.5 = 1.5, c = 1.5 (1.5 (0.075 - 0.2) + 0.5) = 1.5 * 0.3125 = 0.46875; profile
    # [0, 1 - (1/2)^2] = [0, 3/4], weighted = 3/4 * 1 * 0.5 = 0.375; drop = 0.5 * 0.46875 *
    # 0.375 = 0.087890625; y = (-1 + 0.5) - 0.087890625 = -0.587890625: the drop follows the
    # far rows' signal (here the positive last row), not the sign of the total.
    y, ideal = one_tile([-1.0, 1.0], [1.0, 0.5], 0.5, 2.0)
    assert ideal == -0.5
    assert y == pytest.approx(-0.587890625, rel=1e-12)


def test_later_rows_drop_more_and_the_first_row_none():
    # One-hot inputs e_j on a tile of equal weights: s_x = 1, current 1, so the drop is
    # ir_drop * c(n / g) * f_j with f_j = 1 - (1 - j/n)^2 rising from 0 (aihwkit's code: the
    # first row is nearest the output, whatever its docstring says).
    n, g = 16, 4.0
    outputs = [one_tile([0.5] * n, [float(i == j) for i in range(n)], 1.0, g) for j in range(n)]
    ys = torch.tensor([y for y, _ in outputs], dtype=torch.float64)
    assert ys[0].item() == 0.5  # the first row: no drop at all
    assert (ys.diff() < 0).all()  # strictly more drop, row after row
    f = 1 - (1 - torch.arange(n, dtype=torch.float64) / n) ** 2
    expected = 0.5 - drop_coefficient(torch.tensor(n / g)) * f * 0.5
    torch.testing.assert_close(ys, expected, rtol=1e-12, atol=0)


def test_more_current_more_drop_and_the_drop_shrinks_the_signal():
    # Two outputs read the last row alike (w = 1 there); the second also draws current through
    # the first row (w = 1, no drop of its own): its last row drops more. Same-sign weights and
    # inputs: the output falls short of the ideal, never beyond it.
    n = 8
    layer = nn.Linear(n, 2, bias=False).double()
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, n - 1] = 1.0
        layer.weight[1, 0] = 1.0
        model = analog(layer, ir_drop=1.0, ir_drop_g_ratio=80.0)
        y = model(torch.ones(1, n, dtype=torch.float64))[0]
    ideal = torch.tensor([1.0, 2.0], dtype=torch.float64)
    drops = ideal - y
    assert 0 < drops[0] < drops[1] and (y > 0).all()  # a = 0.1, 0.2: a small drop
    f_last = 1 - (1 / n) ** 2
    a = torch.tensor([n / 80 * 1.0, n / 80 * 2.0], dtype=torch.float64)
    torch.testing.assert_close(drops, drop_coefficient(a) * f_last, rtol=1e-12, atol=0)
    current = torch.linspace(0.0, 10.0, 101)  # c(a) rises with the current, from 0
    c = ir_drop(current, torch.ones_like(current), torch.ones(()), torch.ones(()), 1.0, 1.0)
    assert c[0] == 0 and (c.diff() > 0).all()


def unfolded_reference(layer: nn.Module, x, tiles, scale: float, g: float) -> torch.Tensor:
    """The layer's ideal output less aihwkit's drop, written per tile on explicit input vectors
    (``F.unfold`` patches for a conv, zero padding included)."""
    w = layer.weight.detach()
    k = w[0, 0].numel() if w.dim() == 4 else 1
    vectors = x if w.dim() == 2 else F.unfold(x, w.shape[2:], padding=layer.padding)
    vectors = vectors if w.dim() == 2 else vectors.transpose(1, 2)  # (..., rows)
    w2, drop = w.flatten(1), 0
    for sl in tiles or [slice(0, w.shape[1])]:
        rows = slice(sl.start * k, sl.stop * k)
        xt, wt = vectors[..., rows], w2[:, rows]
        s_x = xt.abs().amax(-1, keepdim=True)
        s_x, w_max, n = (
            torch.where(s_x > 0, s_x, torch.ones_like(s_x)),
            wt.abs().max(),
            xt.shape[-1],
        )
        a = n / g * (xt.abs() / s_x) @ (wt.abs() / w_max).T
        f = 1 - (1 - torch.arange(n, dtype=x.dtype) / n) ** 2
        c = a * (a * (0.05 * a - 0.2) + 0.5)
        drop = drop + scale * c * ((xt * f) @ wt.T)
    ideal = layer(x)
    if w.dim() == 2:
        return ideal - drop
    return ideal - drop.transpose(1, 2).reshape(ideal.shape)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_unequal_tiles_match_the_formula_on_explicit_vectors(kind):
    # Tiles of unequal size are padded to equal groups: each keeps its own n and profile.
    gen = torch.Generator().manual_seed(5)
    if kind == "linear":
        layer, tile_rows = nn.Linear(301, 6, bias=False).double(), 256  # 151 + 150 rows
        x = torch.randn(4, 301, generator=gen, dtype=torch.float64)
    else:
        layer, tile_rows = nn.Conv2d(17, 5, 3, padding=1, bias=False).double(), 81  # 9 + 8
        x = torch.randn(2, 17, 6, 6, generator=gen, dtype=torch.float64)
    scale, g = 0.7, DEFAULT_G_RATIO / 100
    tiles = layer_tiles(layer, tile_rows)
    assert len({sl.stop - sl.start for sl in tiles}) == 2
    with torch.no_grad():
        y = analog(layer, tile_rows=tile_rows, ir_drop=scale, ir_drop_g_ratio=g)(x)
        expected = unfolded_reference(layer, x, tiles, scale, g)
        assert (layer(x) - expected).abs().max() > 1e-3  # a drop to see
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)


def test_the_drop_comes_before_the_tile_adc():
    # aihwkit's order: y_t = ADC(p_t - drop_t). 15 levels over +-12 normalized units (a step of
    # 24/14) and a strong drop: the other order, ADC(p_t) - drop_t, is off the grid.
    layer = nn.Linear(32, 4, bias=False).double()
    x = torch.rand(3, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scale, g, bound, levels = 1.0, 4.0, 12.0, 15
    chip = {"tile_rows": 16, "ir_drop": scale, "ir_drop_g_ratio": g}
    with torch.no_grad():
        y = analog(layer, tile_adc_levels=levels, out_bound=bound, **chip)(x)
        tiles, w = layer_tiles(layer, 16), layer.weight
        expected, other = 0, 0
        for sl in tiles:
            part = nn.Linear(16, 4, bias=False).double()
            part.weight.copy_(w[:, sl])
            u = w[:, sl].abs().max() * x[:, sl].abs().amax(1, keepdim=True)
            dropped = unfolded_reference(part, x[:, sl], None, scale, g)
            step = 2 * bound / (levels - 1)
            expected = expected + (torch.round(dropped / u / step) * step).clamp(-bound, bound) * u
            ideal_q = (torch.round(part(x[:, sl]) / u / step) * step).clamp(-bound, bound) * u
            other = other + ideal_q - (part(x[:, sl]) - dropped)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert (y - other).abs().max() > 1e-3


def test_ir_drop_zero_is_todays_path(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("IR drop applied")

    monkeypatch.setattr(crossbar, "apply_ir_drop_", fail)
    layer = nn.Linear(64, 8).double()
    x = torch.randn(5, 64, dtype=torch.float64)
    tiles = {"tile_rows": 32, "dac_levels": 255, "tile_adc_levels": 255}
    with torch.no_grad():
        base = analog(layer, **tiles)(x)
        assert torch.equal(analog(layer, ir_drop=0.0, ir_drop_g_ratio=10.0, **tiles)(x), base)
        with pytest.raises(AssertionError, match="IR drop applied"):
            analog(layer, ir_drop=0.5, **tiles)(x)  # the hook is where the check looks
    assert not AnalogConfig(ir_drop=0.0).tile_outputs and not AnalogConfig().periphery
    assert AnalogConfig(ir_drop=0.1).tile_outputs
    assert {"ir_drop", "ir_drop_g_ratio"} <= LATER_SETTINGS
    assert AnalogConfig(ir_drop=0.0).as_dict() == AnalogConfig().as_dict()  # fingerprints stay
    assert AnalogConfig(ir_drop=0.5).as_dict()["ir_drop"] == 0.5


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradients_pass_as_through_the_ideal_product(kind):
    # The drop is a constant for autograd (aihwkit's backward is the ideal transposed product).
    gen = torch.Generator().manual_seed(3)
    if kind == "linear":
        layer, x = nn.Linear(40, 6).double(), torch.randn(4, 40, generator=gen).double()
    else:
        layer = nn.Conv2d(6, 4, 3, padding=1).double()
        x = torch.randn(2, 6, 5, 5, generator=gen).double()
    model = analog(layer, tile_rows=27 if kind == "conv" else 16, ir_drop=1.0, ir_drop_g_ratio=5.0)
    model.train()  # deterministic: the same drop in training as on the chip
    xa = x.clone().requires_grad_(True)
    y = model(xa)
    g_out = torch.randn(y.shape, generator=gen).double()
    (y * g_out).sum().backward()
    xd = x.clone().requires_grad_(True)
    ((layer(xd) * g_out).sum()).backward()
    assert (y - layer(x)).abs().max() > 1e-3  # the forward does drop
    torch.testing.assert_close(xa.grad, xd.grad)
    torch.testing.assert_close(model.weight.grad, layer.weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), y.detach())


@pytest.mark.parametrize(
    "chip, key", [({"ir_drop": -0.1}, "ir_drop"), ({"ir_drop_g_ratio": 0.0}, "ir_drop_g_ratio")]
)
def test_bad_ir_drop_settings_fail_with_their_key(chip, key):
    with pytest.raises(ConfigError, match=key):
        AnalogConfig(**chip)


@pytest.mark.parametrize("key", ["ir_drop", "ir_drop_g_ratio"])
def test_infinite_settings_are_refused(key):
    with pytest.raises(ConfigError, match=rf"^{key}=inf .*finite"):
        AnalogConfig(tile_rows=16, **{key: float("inf")})
