"""Monte Carlo robustness evaluation over programmed chip instances (MODEL.md section 2).

Accuracy under noise is a distribution over chips: each chip instance is one frozen draw of the
perturbation, reproducible from ``chip_seed(seed, chip)``. Every chip is programmed once and then
swept over the grid (sigma x mean shift x ADC levels) with the same standard draws, so the curves
differ only by the swept variable (common random numbers). Per grid point we report the mean,
the standard deviation and a Student-t 95 % confidence interval over chips.

Rows go to a CSV one chip at a time (flushed and fsync'd), so a killed run resumes where it
stopped and returns exactly the rows an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats
from torch import nn
from tqdm import tqdm

from cimsim.adc import adcs, calibrate_adc, set_adc
from cimsim.convert import analog_layers, program_chip, set_noise
from cimsim.validation import ConfigError, check_int, check_number

ROW_COLUMNS = ("chip", "chip_seed", "sigma", "mean_shift", "adc_levels", "acc", "loss", "n")
SWEEPS = ("sigma", "mean_shift", "adc_levels")
ROWS_FILE = "robustness_rows.csv"
SUMMARY_FILE = "robustness_summary.csv"
JSON_FILE = "robustness.json"

Point = tuple[float, float, int | None]  # (sigma, mean_shift, adc_levels)


def _non_empty_tuple(key: str, values: Any) -> tuple:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise ConfigError(key, values, "must be a non-empty list")
    values = tuple(values)
    if not values:
        raise ConfigError(key, list(values), "must be a non-empty list")
    return values


@dataclass(frozen=True)
class RobustnessGrid:
    """The Monte Carlo evaluation grid: every chip is measured at every point of the product.

    Attributes:
        sigmas: test noise levels, relative std as a fraction of each tensor's range (>= 0).
        mean_shifts: test mean shifts (systematic drift), same units, any sign.
        adc_levels: ADC output levels per point; ``None`` = no ADC, else an integer >= 2. These
            override the levels the model was converted with (restored afterwards).
        chips: number of chip instances N (the authors used 20, Joshi et al. 100).
    """

    sigmas: tuple[float, ...]
    mean_shifts: tuple[float, ...] = (0.0,)
    adc_levels: tuple[int | None, ...] = (None,)
    chips: int = 20

    def __post_init__(self):
        # Lists from a config file become tuples, numbers become floats: a frozen, hashable grid
        # whose values compare equal to the ones read back from a rows CSV.
        sigmas = _non_empty_tuple("sigmas", self.sigmas)
        shifts = _non_empty_tuple("mean_shifts", self.mean_shifts)
        levels = _non_empty_tuple("adc_levels", self.adc_levels)
        for s in sigmas:
            check_number("sigmas", s, minimum=0.0)
        for m in shifts:
            check_number("mean_shifts", m)
        for n in levels:
            if n is not None:
                check_int("adc_levels", n, minimum=2)
        check_int("chips", self.chips, minimum=1)
        object.__setattr__(self, "sigmas", tuple(float(s) for s in sigmas))
        object.__setattr__(self, "mean_shifts", tuple(float(m) for m in shifts))
        object.__setattr__(self, "adc_levels", tuple(levels))

    def points(self) -> Iterator[Point]:
        """``(sigma, mean_shift, adc_levels)`` for every grid point, ADC levels varying fastest."""
        return itertools.product(self.sigmas, self.mean_shifts, self.adc_levels)


@dataclass
class RobustnessResult:
    """Per-chip rows and their per-grid-point summary (see ``summarize``)."""

    rows: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)


def chip_seed(seed: int, chip: int) -> int:
    """The seed of chip instance ``chip`` of an evaluation with base ``seed``.

    A 63-bit integer from BLAKE2b of ``"cimsim-chip:{seed}:{chip}"``: it depends on nothing else
    (not the grid, the model or the process), is the same on every platform and Python version
    (unlike ``hash``), and does not collide for nearby seeds the way ``seed + chip`` would
    (``seed=0, chip=1`` and ``seed=1, chip=0`` are different chips).
    """
    digest = hashlib.blake2b(f"cimsim-chip:{int(seed)}:{int(chip)}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") >> 1


# ----------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class _Data:
    test_loader: Iterable
    calib_loader: Iterable | None
    max_batches: int | None
    calib_batches: int | None


@torch.no_grad()
def _measure(model: nn.Module, data: _Data, device: torch.device) -> tuple[float, float, int]:
    """Top-1 accuracy, mean cross-entropy and sample count on the test set."""
    correct, loss_sum, n = 0, 0.0, 0
    for i, (x, y) in enumerate(data.test_loader):
        if data.max_batches is not None and i >= data.max_batches:
            break
        x, y = x.to(device), y.to(device)
        logits = model(x)  # (B, classes)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
        n += y.shape[0]
    if n == 0:
        raise ValueError("the test loader gave no samples")
    return correct / n, loss_sum / n, n


def _evaluate_chip(
    model: nn.Module, chip: int, seed: int, points: Sequence[Point], data: _Data
) -> list[dict]:
    """Program chip ``chip`` once and measure it at every point (common random numbers)."""
    device = next(model.parameters()).device
    program_chip(model, seed)
    model.eval()
    rows = []
    for sigma, mean_shift, levels in points:
        # Both reset the ADC calibration: the ranges depend on the noisy chip, so recalibrate.
        set_noise(model, sigma=sigma, mean_shift=mean_shift)
        set_adc(model, levels)
        if levels is not None:
            calibrate_adc(model, data.calib_loader, max_batches=data.calib_batches)
        acc, loss, n = _measure(model, data, device)
        rows.append(
            {
                "chip": chip,
                "chip_seed": seed,
                "sigma": sigma,
                "mean_shift": mean_shift,
                "adc_levels": levels,
                "acc": acc,
                "loss": loss,
                "n": n,
            }
        )
    return rows


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore noise settings, chip, ADC levels and ranges, and train/eval modes on exit."""
    modes = [(m, m.training) for m in model.modules()]
    layers = [(name, layer, layer.config, layer.chip_seed) for name, layer in analog_layers(model)]
    converters = [
        (a, a.levels, a.lo.clone(), a.hi.clone(), a.calibrated)
        for a in adcs(model, active_only=False)
    ]
    try:
        yield
    finally:
        for name, layer, config, seed in layers:
            layer.config = config
            if seed is None:
                layer.clear()
            else:  # draws depend only on (seed, qualified name): the same chip again
                layer.program(seed, name)
        for adc, levels, lo, hi, calibrated in converters:
            adc.levels, adc.calibrated = levels, calibrated
            adc.lo.copy_(lo)
            adc.hi.copy_(hi)
        for module, training in modes:
            module.training = training


# ----------------------------------------------------------------------------- the rows CSV


def _columns(extra: dict) -> list[str]:
    return list(ROW_COLUMNS) + list(extra)


def _csv_text(value) -> str:
    """How ``csv`` writes a value (``None`` as an empty field)."""
    return "" if value is None else str(value)


def _repair(path: Path) -> None:
    """Drop a torn last line (a run killed mid-write) so appends start on a fresh line."""
    with open(path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)  # 0 when not even the header is complete


def _parse(raw: dict) -> dict:
    """A row read back from CSV with the types ``_evaluate_chip`` writes."""
    levels = raw["adc_levels"]
    return {
        "chip": int(raw["chip"]),
        "chip_seed": int(raw["chip_seed"]),
        "sigma": float(raw["sigma"]),
        "mean_shift": float(raw["mean_shift"]),
        "adc_levels": None if levels == "" else int(levels),
        "acc": float(raw["acc"]),
        "loss": float(raw["loss"]),
        "n": int(raw["n"]),
    }


def _read_done(
    path: Path, seed: int, chips: Sequence[int], grid: RobustnessGrid, extra: dict
) -> dict[tuple[int, Point], dict]:
    """Rows already in ``path`` for this seed, these chips, grid points and ``extra`` values."""
    if not path.exists():
        return {}
    _repair(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and reader.fieldnames != _columns(extra):
            raise ConfigError(
                "rows_path",
                str(path),
                f"exists with columns {reader.fieldnames};"
                f" this run writes {_columns(extra)}: use another file",
            )
        raws = list(reader)
    points, wanted = set(grid.points()), set(chips)
    done = {}
    for raw in raws:
        # Another model's (or seed's) rows may share the file: match every identifying value.
        if any(raw[k] != _csv_text(v) for k, v in extra.items()):
            continue
        row = _parse(raw)
        key = (row["chip"], (row["sigma"], row["mean_shift"], row["adc_levels"]))
        if (
            key[0] in wanted
            and key[1] in points
            and row["chip_seed"] == chip_seed(seed, key[0])
            and key not in done
        ):
            done[key] = {**row, **extra}
    return done


def _append(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Append one chip's rows in a single write, durable before the next chip starts."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    if path.stat().st_size == 0:
        writer.writeheader()
    writer.writerows(rows)
    with open(path, "a", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def write_rows(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write ``rows`` as one CSV, atomically, in the format ``evaluate_robustness`` appends
    (e.g. the merge of several processes' shares of the chips)."""
    columns = list(rows[0]) if rows else list(ROW_COLUMNS)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

    return _atomic_write(Path(path), write)


def sort_rows(rows: Iterable[dict], grid: RobustnessGrid) -> list[dict]:
    """Rows in the canonical order: by chip, then grid order (e.g. to merge DDP ranks' rows)."""
    order = {p: i for i, p in enumerate(grid.points())}
    return sorted(
        rows, key=lambda r: (r["chip"], order[(r["sigma"], r["mean_shift"], r["adc_levels"])])
    )


# ----------------------------------------------------------------------------- evaluation


def _check_inputs(
    model: nn.Module, grid: RobustnessGrid, seed: int, calib_loader, chip_indices, extra: dict
) -> list[int]:
    """Fail before any work on a user mistake; return the chip indices to evaluate."""
    if not isinstance(grid, RobustnessGrid):
        raise TypeError(f"grid must be a RobustnessGrid, got {type(grid).__name__}")
    check_int("seed", seed)
    chips = list(range(grid.chips)) if chip_indices is None else list(chip_indices)
    for c in chips:
        check_int("chip_indices", c, minimum=0)
        if c >= grid.chips:
            raise ConfigError("chip_indices", c, f"must be < chips={grid.chips}")
    if any(levels is not None for levels in grid.adc_levels):
        if calib_loader is None:
            raise ConfigError(
                "calib_loader",
                None,
                "required when adc_levels are set: ADC "
                "ranges are calibrated on training data after programming a chip",
            )
        if not adcs(model):
            raise ConfigError(
                "adc_levels",
                list(grid.adc_levels),
                "this model has no ADC "
                "points: convert it with adc_placement='layer' or add ADC() modules",
            )
    for key in extra:
        if key in ROW_COLUMNS:
            raise ConfigError("extra", key, f"must not reuse a row column {ROW_COLUMNS}")
    return sorted(set(chips))


def evaluate_robustness(
    model: nn.Module,
    test_loader: Iterable,
    grid: RobustnessGrid,
    seed: int,
    calib_loader: Iterable | None = None,
    rows_path: str | os.PathLike | None = None,
    chip_indices: Iterable[int] | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    calib_batches: int | None = None,
    extra: dict | None = None,
) -> RobustnessResult:
    """Measure ``model`` on ``grid.chips`` seeded chip instances at every grid point.

    Args:
        model: a model converted with ``convert_to_analog``; its noise settings, chip, ADC levels
            and ranges and train/eval modes are restored on return (also on an exception).
        test_loader: ``(x, y)`` batches in a fixed order (rows are then bit-reproducible); top-1
            accuracy and mean cross-entropy over all of them.
        grid: the sweep and the number of chips.
        seed: base seed; chip ``c`` is programmed from ``chip_seed(seed, c)``.
        calib_loader: training batches to calibrate the ADC ranges on, after programming each
            chip (required with ADC levels; a fixed order keeps the moving-average range fixed).
        rows_path: CSV that receives each chip's rows as soon as it is done; rows already there
            (same seed, chips, grid points and ``extra`` values) are read back, not recomputed.
            One writer per file: give each DDP rank its own.
        chip_indices: evaluate only these chips (e.g. one DDP rank's share); default all.
        progress: show a tqdm bar over chips.
        max_batches: use only the first ``max_batches`` test batches.
        calib_batches: use only the first ``calib_batches`` calibration batches.
        extra: constant columns added to every row, e.g. ``{"model": label, "ckpt": path}``.

    Returns:
        The rows (sorted by chip, then grid order) and their ``summarize``.
    """
    extra = dict(extra or {})
    chips = _check_inputs(model, grid, seed, calib_loader, chip_indices, extra)
    data = _Data(test_loader, calib_loader, max_batches, calib_batches)
    path = None if rows_path is None else Path(rows_path)
    done = {} if path is None else _read_done(path, seed, chips, grid, extra)
    todo = [(c, [p for p in grid.points() if (c, p) not in done]) for c in chips]
    todo = [(c, points) for c, points in todo if points]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    rows = list(done.values())
    bar = tqdm(
        total=len(chips),
        initial=len(chips) - len(todo),
        desc="chips",
        unit="chip",
        disable=not progress,
    )
    with bar, _preserved(model):
        for c, points in todo:
            new = [
                {**r, **extra} for r in _evaluate_chip(model, c, chip_seed(seed, c), points, data)
            ]
            if path is not None:
                _append(path, new, _columns(extra))
            rows += new
            bar.update()
    rows = sort_rows(rows, grid)
    return RobustnessResult(rows=rows, summary=summarize(rows))


# ----------------------------------------------------------------------------- summary


def _t_ci95(std: float, n: int) -> float:
    """Half-width of the 95 % Student-t confidence interval of a mean of ``n`` chips."""
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def summarize(rows: Iterable[dict]) -> list[dict]:
    """Mean, std (ddof=1), 95 % CI and mean loss over chips, per grid point and model.

    Groups keep the order in which they first appear in ``rows`` (for the rows of
    ``evaluate_robustness``: grid order). A ``model`` column, when the rows have one, keys the
    groups too, so rows of several models can be summarized at once.
    """
    groups: dict[tuple, list[dict]] = {}
    rows = list(rows)
    has_model = any("model" in r for r in rows)
    for r in rows:
        key = (r.get("model"), r["sigma"], r["mean_shift"], r["adc_levels"])
        groups.setdefault(key, []).append(r)
    summary = []
    for (model, sigma, mean_shift, levels), group in groups.items():
        acc = [r["acc"] for r in group]
        n = len(acc)
        mean = math.fsum(acc) / n
        std = math.sqrt(math.fsum((a - mean) ** 2 for a in acc) / (n - 1)) if n > 1 else math.nan
        entry = {"model": model} if has_model else {}
        entry.update(
            sigma=sigma,
            mean_shift=mean_shift,
            adc_levels=levels,
            acc_mean=mean,
            acc_std=std,
            acc_ci95=_t_ci95(std, n),
            loss_mean=math.fsum(r["loss"] for r in group) / n,
            chips=n,
        )
        summary.append(entry)
    return summary


def format_summary(summary: Sequence[dict]) -> str:
    """An aligned text table of a summary, accuracies in percent."""
    header = (["model"] if any("model" in s for s in summary) else []) + [
        "sigma",
        "mean_shift",
        "adc_levels",
        "acc_mean%",
        "ci95%",
        "acc_std%",
        "loss_mean",
        "chips",
    ]
    table = [header]
    for s in summary:
        cells = [str(s["model"])] if header[0] == "model" else []
        cells += [
            f"{s['sigma']:g}",
            f"{s['mean_shift']:g}",
            "none" if s["adc_levels"] is None else str(s["adc_levels"]),
            f"{100 * s['acc_mean']:.2f}",
            f"{100 * s['acc_ci95']:.2f}",
            f"{100 * s['acc_std']:.2f}",
            f"{s['loss_mean']:.4f}",
            str(s["chips"]),
        ]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table
    )


# ----------------------------------------------------------------------------- files


def _atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


def _json_safe(value):
    # NaN (the CI of a single chip) is not valid JSON: write null.
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(result: RobustnessResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``robustness_summary.csv`` and ``robustness.json`` (rows + summary) atomically.

    The per-chip rows CSV (``robustness_rows.csv``) is the one ``evaluate_robustness`` appends
    to as it goes. Returns the two paths written.
    """
    out = Path(out_dir)

    def write_csv(tmp):
        columns = list(result.summary[0]) if result.summary else []
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(result.summary)

    def write_json(tmp):
        doc = {
            key: [{k: _json_safe(v) for k, v in r.items()} for r in getattr(result, key)]
            for key in ("rows", "summary")
        }
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.write("\n")

    return (
        _atomic_write(out / SUMMARY_FILE, write_csv),
        _atomic_write(out / JSON_FILE, write_json),
    )


# ----------------------------------------------------------------------------- plot

_AXIS_LABELS = {
    "sigma": "test noise sigma (fraction of range)",
    "mean_shift": "test mean shift mu (fraction of range)",
    "adc_levels": "ADC levels (log2 scale; bits = log2(levels))",
}


def _lines(summary: Sequence[dict], x: str) -> dict[str, list[dict]]:
    """Group summary entries into lines along ``x``: one per model and per value of any other
    swept variable that varies (named in the label)."""
    others = [k for k in SWEEPS if k != x and len({s[k] for s in summary}) > 1]
    lines: dict[str, list[dict]] = {}
    for s in summary:
        parts = [str(s["model"])] if s.get("model") is not None else []
        parts += [f"{k}={'none' if s[k] is None else s[k]}" for k in others]
        lines.setdefault(", ".join(parts) or "accuracy", []).append(s)
    return lines


def _draw_line(ax, label: str, entries: list[dict], x: str) -> None:
    """One mean curve with its shaded 95 % CI; for ADC sweeps "no ADC" is a dashed reference."""
    refs = [e for e in entries if x == "adc_levels" and e["adc_levels"] is None]
    entries = sorted((e for e in entries if not any(e is r for r in refs)), key=lambda e: e[x])
    color = None
    if entries:
        xs = [e[x] for e in entries]
        mean = [100 * e["acc_mean"] for e in entries]
        # NaN half-widths (one chip) leave no band rather than a misleading zero-width one.
        ci = [100 * e["acc_ci95"] for e in entries]
        (line,) = ax.plot(xs, mean, marker="o", label=label)
        color = line.get_color()
        ax.fill_between(
            xs,
            [m - c for m, c in zip(mean, ci, strict=True)],
            [m + c for m, c in zip(mean, ci, strict=True)],
            color=color,
            alpha=0.2,
            linewidth=0,
        )
    for ref in refs:
        ax.axhline(
            100 * ref["acc_mean"],
            linestyle="--",
            linewidth=1,
            color=color,
            label=f"{label} (no ADC)",
        )


def plot_robustness(
    summary: Sequence[dict], x: str, path: str | os.PathLike, title: str | None = None
) -> Path:
    """Plot test accuracy (mean over chips, shaded 95 % CI) against the swept variable ``x``.

    Args:
        summary: entries of ``summarize``; one line per ``model`` label.
        x: ``sigma``, ``mean_shift`` or ``adc_levels`` (log2 axis; "no ADC" as a dashed line).
        path: the PNG to write (atomically, 150 dpi).
        title: optional figure title.

    Returns:
        The path written.
    """
    if x not in SWEEPS:
        raise ConfigError("x", x, "allowed values are " + ", ".join(map(repr, SWEEPS)))
    if not summary:
        raise ValueError("plot_robustness got an empty summary")
    # A bare Figure on the Agg canvas, no pyplot: no display needed, no global figure state.
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, entries in _lines(summary, x).items():
        _draw_line(ax, label, entries, x)
    if x == "adc_levels":
        ax.set_xscale("log", base=2)
        ticks = sorted({s["adc_levels"] for s in summary if s["adc_levels"] is not None})
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(_AXIS_LABELS[x])
    ax.set_ylabel("top-1 test accuracy (%), mean ± 95 % CI")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=150))
