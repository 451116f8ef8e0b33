"""What a study draws and tabulates: the summary files, the robustness figure, compute and loss.

``robustness_summary.csv`` and ``robustness.json`` (rows and summary) are written atomically;
``robustness.png`` draws accuracy against the swept variable, one line per ``lines`` group, which
also groups the W&B curves (``cimsim.tracking``); time on a log axis in human units, fault rates
on a log axis.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from cimsim.files import atomic_write
from cimsim.robustness.folders import (
    COMPUTE_PLOT,
    COMPUTE_TABLE,
    JSON_FILE,
    LOSS_PLOT,
    LOSS_TABLE,
    SUMMARY_FILE,
)
from cimsim.robustness.grid import SWEEPS
from cimsim.robustness.rows import RobustnessResult, row_record
from cimsim.robustness.summary import format_time
from cimsim.validation import ConfigError

# ----------------------------------------------------------------------------- summary files


def _json_safe(value):
    # NaN (the CI of a single chip) is not valid JSON: write null.
    return None if isinstance(value, float) and math.isnan(value) else value


def write_results(result: RobustnessResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``robustness_summary.csv`` and ``robustness.json`` (rows + summary) atomically.

    The per-chip rows CSV is the one ``RowsFile`` appends to as it goes. Returns the two paths.
    """
    out = Path(out_dir)

    def write_csv(tmp):
        columns = list(result.summary[0]) if result.summary else []
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(result.summary)

    def write_json(tmp):
        records = {"rows": [row_record(r) for r in result.rows], "summary": result.summary}
        doc = {
            k: [{c: _json_safe(v) for c, v in r.items()} for r in rs] for k, rs in records.items()
        }
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.write("\n")

    return atomic_write(out / SUMMARY_FILE, write_csv), atomic_write(out / JSON_FILE, write_json)


# ----------------------------------------------------------------------------- the figure

_AXIS_LABELS = {
    "sigma": "test noise sigma (fraction of range)",
    "mean_shift": "test mean shift mu (fraction of range)",
    "adc_levels": "ADC levels (log2 scale; bits = log2(levels); dashed: no ADC)",
    "t_inference": "time after programming t_inference (log scale)",
    "fault_rate": "fraction of devices stuck (log scale)",
}


def lines(summary: Sequence[dict], x: str) -> dict[str, list[dict]]:
    """The curves of a figure along ``x``: summary entries grouped by model and by the value of
    every other swept variable that varies (named in the label), in order of appearance. The PNG
    and the W&B line series both draw exactly these."""
    others = [k for k in SWEEPS if k != x and len({s.get(k) for s in summary}) > 1]
    groups: dict[str, list[dict]] = {}
    for s in summary:
        parts = [str(s["model"])] if s.get("model") is not None else []
        parts += [f"{k}={'none' if s[k] is None else s[k]}" for k in others]
        groups.setdefault(", ".join(parts) or "accuracy", []).append(s)
    return groups


def _draw_line(ax, label: str, entries: list[dict], x: str, position: Callable) -> None:
    """One mean curve with its shaded 95 % CI at ``position(x value)``; for ADC sweeps "no ADC"
    is a dashed reference."""
    refs = [e for e in entries if x == "adc_levels" and e["adc_levels"] is None]
    entries = sorted((e for e in entries if not any(e is r for r in refs)), key=lambda e: e[x])
    color = None
    if entries:
        xs = [position(e[x]) for e in entries]
        mean = [100 * e["acc_mean"] for e in entries]
        # NaN half-widths (one chip) leave no band rather than a misleading zero-width one.
        ci = [100 * e["acc_ci95"] for e in entries]
        (line,) = ax.plot(xs, mean, marker="o", label=label)
        color = line.get_color()
        low = [m - c for m, c in zip(mean, ci, strict=True)]
        high = [m + c for m, c in zip(mean, ci, strict=True)]
        ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
    for ref in refs:
        mean = 100 * ref["acc_mean"]
        # Same colour as its curve: one legend entry per model (the dashed style is explained in
        # the axis label), so the legend stays readable with many models.
        ax.axhline(mean, linestyle="--", linewidth=1, color=color, label="_nolegend_")


def _time_axis(
    ax, times: Sequence[float], show: Callable[[float], str] = format_time
) -> Callable[[float], float]:
    """A log axis with a tick at every value (``show``: a time in human units); ``0`` sits a
    decade below the smallest positive value (at 1 without one), labelled ``0``. Returns where
    a value is drawn. Times (``t_inference``) and fault rates."""
    positive = [t for t in times if t > 0]
    zero = min(positive) / 10 if positive else 1.0
    ax.set_xscale("log")
    ticks = sorted(set(times))
    ax.set_xticks([t or zero for t in ticks], [show(t) if t else "0" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())  # decades between the ticks would read as times
    return lambda t: t or zero


def plot_robustness(
    summary: Sequence[dict], x: str, path: str | os.PathLike, title: str | None = None
) -> Path:
    """Plot test accuracy (mean over chips, shaded 95 % CI) against the swept variable ``x``.

    Args:
        summary: entries of ``summarize``; one line per ``lines`` group.
        x: ``sigma``, ``mean_shift``, ``adc_levels`` (log2 axis; "no ADC" as a dashed line),
            ``t_inference`` (log axis, ticks in human units, t = 0 at the left) or ``fault_rate``
            (log axis, a rate of 0 at the left).
        path: the PNG to write (atomically, 150 dpi).
        title: optional figure title.

    Returns:
        The path written.
    """
    if x not in SWEEPS:
        raise ConfigError("x", x, "allowed values are " + ", ".join(map(repr, SWEEPS)))
    if not summary:
        raise ValueError("plot_robustness got an empty summary")
    timed, log = x == "t_inference", x in ("t_inference", "fault_rate")
    if log and any(x not in s for s in summary):
        sweep, axis = ("time", "times") if timed else ("fault", "fault_rates")
        raise ConfigError("x", x, f"needs a {sweep} sweep's summary (a grid with {axis})")
    # A bare Figure on the Agg canvas, no pyplot: no display needed, no global figure state.
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    show = format_time if timed else "{:g}".format
    position = _time_axis(ax, [s[x] for s in summary], show) if log else (lambda value: value)
    for label, entries in lines(summary, x).items():
        _draw_line(ax, label, entries, x, position)
    if x == "adc_levels":
        ax.set_xscale("log", base=2)
        ticks = sorted({s["adc_levels"] for s in summary if s["adc_levels"] is not None})
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(_AXIS_LABELS[x])
    ax.set_ylabel("top-1 test accuracy (%), mean ± 95 % CI")
    ax.grid(True, alpha=0.3)
    labels = list(lines(summary, x))
    if timed or max(map(len, labels)) > 40:  # long labels (test-chip settings): below the axes
        fig.set_figheight(4 + 0.22 * len(labels))
        fig.legend(loc="outside lower center", fontsize="small")
    else:
        ax.legend()
    if title:
        ax.set_title(title)
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=150))


def write_table(path: Path, records: Sequence[Mapping]) -> Path:
    """A small CSV (header from the first record), written atomically."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(records)

    return atomic_write(path, write)


def own_mean_shift(summary: Sequence[dict], model: str) -> float | None:
    """The mean shift ``model`` was measured at: its only one (a grid at ``mean_shifts=[train]``
    tests a drift-trained model at its own), else 0 when it is among several (a mean-shift
    sweep), else None."""
    shifts = {s["mean_shift"] for s in summary if s.get("model") == model}
    if len(shifts) == 1:
        return shifts.pop()
    return 0.0 if 0.0 in shifts else None


def plot_compute(
    summary: Sequence[dict], subjects: Sequence, sigma: float, out_dir: str | os.PathLike
) -> tuple[Path, Path]:
    """Robust accuracy at test ``sigma`` against training compute (forward-backward passes), one
    point per model with its 95 % CI: which method is better at equal compute.

    Args:
        summary: the study's summary (``summarize``), with a ``model`` column.
        subjects: the study's subjects (``label`` and ``passes``, e.g.
        ``cimsim.robustness.study.Subject``).
        sigma: the test sigma the comparison is made at (a point of the grid).
        out_dir: where ``robustness_compute.csv`` and ``robustness_compute.png`` go.
    """
    at = {
        s["model"]: s
        for s in summary
        if s["sigma"] == sigma and s["mean_shift"] == own_mean_shift(summary, s["model"])
    }
    missing = [s.label for s in subjects if s.label not in at]
    if missing:
        raise ConfigError("target_sigma", sigma, f"is not a grid point of {missing}")
    records = [
        {
            "model": s.label,
            "passes": s.passes,
            "acc_mean": at[s.label]["acc_mean"],
            "acc_ci95": at[s.label]["acc_ci95"],
            "chips": at[s.label]["chips"],
        }
        for s in subjects
    ]
    out = Path(out_dir)
    table = write_table(out / COMPUTE_TABLE, records)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in records:
        ax.errorbar(
            r["passes"],
            100 * r["acc_mean"],
            yerr=100 * r["acc_ci95"],
            marker="o",
            capsize=3,
            label=r["model"],
        )
    ax.set_xlabel("training compute (forward-backward passes)")
    ax.set_ylabel(f"top-1 test accuracy (%) at sigma = {sigma:g}, mean ± 95 % CI")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    plot = atomic_write(out / COMPUTE_PLOT, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    return table, plot


def measured_losses(summary: Sequence[dict], model: str) -> list[tuple[float, float]]:
    """``(sigma, mean test loss)`` of ``model`` at its own mean shift without ADC, by sigma."""
    mu = own_mean_shift(summary, model)
    return sorted(
        (s["sigma"], s["loss_mean"])
        for s in summary
        if s.get("model") == model and s["mean_shift"] == mu and s["adc_levels"] is None
    )


def plot_loss_prediction(
    summary: Sequence[dict], traces: Mapping[str, dict], out_dir: str | os.PathLike
) -> tuple[Path, Path]:
    """The second-order prediction ``J(w) + sigma^2 / 2 * sum_t r_t^2 tr(H_t)`` next to the
    Monte Carlo mean test loss at each sigma (at the model's own mean shift, ``own_mean_shift``;
    no ADC): where the quadratic picture of HA-SGD holds (the traces are those of the clean
    weights). ``traces[model]`` holds ``weighted``, ``weighted_se`` and
    ``probes`` (``cimsim.training.hessian.hessian_traces``); ``J(w)`` is the sigma = 0 loss.
    """
    out = Path(out_dir)
    table = write_table(out / LOSS_TABLE, [{"model": m, **t} for m, t in traces.items()])
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for model, t in traces.items():
        pts = measured_losses(summary, model)
        if not pts or pts[0][0] != 0:
            warnings.warn(f"{model}: no sigma = 0 point to predict from; not drawn", stacklevel=2)
            continue
        sig = [p[0] for p in pts]
        (line,) = ax.plot(sig, [p[1] for p in pts], marker="o", label=f"{model}: measured")
        pred = [pts[0][1] + x * x / 2 * t["weighted"] for x in sig]
        band = [2 * x * x / 2 * t["weighted_se"] for x in sig]  # +-2 standard errors
        ax.plot(sig, pred, linestyle="--", color=line.get_color(), label=f"{model}: predicted")
        ax.fill_between(
            sig,
            [p - b for p, b in zip(pred, band, strict=True)],
            [p + b for p, b in zip(pred, band, strict=True)],
            color=line.get_color(),
            alpha=0.15,
            linewidth=0,
        )
    ax.set_xlabel("test noise sigma (fraction of range)")
    ax.set_ylabel("mean test cross-entropy")
    ax.set_title("J(w) + sigma^2/2 sum r^2 tr(H) (dashed, +-2 SE) vs Monte Carlo")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    plot = atomic_write(out / LOSS_PLOT, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    return table, plot
