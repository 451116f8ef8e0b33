"""The summary of a study's rows per grid point (mean, std, 95 % CI over chips) and its table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from cimsim.robustness.rows import FaultRow, Row, TimedRow
from cimsim.robustness.stats import mean_std, t_ci95


def summarize(rows: Iterable[Row]) -> list[dict]:
    """Mean, std (ddof=1), 95 % CI and mean loss over chips, per grid point and model.

    Groups keep the order in which they first appear in ``rows`` (for the rows of
    ``evaluate_robustness``: grid order). When rows name their ``model``, it keys the groups and
    heads every entry, so rows of several models can be summarized at once. Rows of a time sweep
    (``TimedRow``) are summarized per time as ``summarize_times`` says; those of a fault sweep
    (``FaultRow``) per fault rate too (a ``fault_rate`` entry after ``model``).
    """
    rows = list(rows)
    has_model = any(r.model for r in rows)
    timed = [isinstance(r, TimedRow) for r in rows]
    if any(timed):
        if not all(timed):
            raise ValueError(
                "rows of a time sweep and of another sweep cannot be summarized together"
            )
        return summarize_times(rows, has_model)
    faulted = [isinstance(r, FaultRow) for r in rows]
    if any(faulted) and not all(faulted):
        raise ValueError("rows of a fault sweep and of another sweep cannot be summarized together")
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.model, r.read, *r.point), []).append(r)
    summary = []
    for (model, read, sigma, mean_shift, levels), group in groups.items():
        acc = [r.acc for r in group]
        n = len(acc)
        mean, std = mean_std(acc)
        entry = {"model": model} if has_model else {}
        if read is not None:
            entry["fault_rate"] = read[0]
        entry.update(
            sigma=sigma,
            mean_shift=mean_shift,
            adc_levels=levels,
            acc_mean=mean,
            acc_std=std,
            acc_ci95=t_ci95(std, n),
            loss_mean=math.fsum(r.loss for r in group) / n,
            chips=n,
        )
        summary.append(entry)
    return summary


def summarize_times(rows: Sequence[TimedRow], has_model: bool = True) -> list[dict]:
    """The summary of a time sweep, per model, ``t_inference`` and grid point.

    Chips are the independent units; the R read-outs of a chip share its programming noise and
    drift exponents. With ``a[c, r]`` the accuracy of chip c at read-out r and ``m[c]`` its mean
    over read-outs: ``acc_mean`` = mean of ``m`` (the mean over chips and read-outs when every
    chip has R), ``acc_ci95`` = Student-t 95 % CI half-width of that mean over chips,
    ``acc_std_chip`` = std (ddof=1) of ``m`` (chip-to-chip spread), ``acc_std_read`` =
    ``sqrt(mean_c var_r a[c, r])`` (ddof=1; read-to-read spread, NaN for R = 1), ``acc_p5`` = the
    5th percentile of ``m`` (linear interpolation, numpy's default), ``loss_mean`` over all rows,
    ``chips`` N and ``repetitions`` (read-outs per chip, the fewest if they differ).
    """
    groups: dict[tuple, dict[int, list[TimedRow]]] = {}
    for r in rows:
        key = (r.model, r.t_inference, *r.point)
        groups.setdefault(key, {}).setdefault(r.chip, []).append(r)
    summary = []
    for (model, t, sigma, mean_shift, levels), by_chip in groups.items():
        reads = [[r.acc for r in chip_rows] for chip_rows in by_chip.values()]  # (N, R)
        means = [mean_std(a)[0] for a in reads]
        n = len(means)
        mean, chip_std = mean_std(means)
        read_var = [mean_std(a)[1] ** 2 for a in reads]
        losses = [r.loss for chip_rows in by_chip.values() for r in chip_rows]
        entry = {"model": model} if has_model else {}
        entry.update(
            t_inference=t,
            sigma=sigma,
            mean_shift=mean_shift,
            adc_levels=levels,
            acc_mean=mean,
            acc_ci95=t_ci95(chip_std, n),
            acc_std_chip=chip_std,
            acc_std_read=math.sqrt(math.fsum(read_var) / n),
            acc_p5=float(np.percentile(means, 5)),
            loss_mean=math.fsum(losses) / len(losses),
            chips=n,
            repetitions=min(len(a) for a in reads),
        )
        summary.append(entry)
    return summary


_TIME_UNITS = (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def format_time(seconds: float) -> str:
    """A ``t_inference`` in human units: ``0``, ``20 s``, ``1 min``, ``1 h``, ``30 d``, ``1 y``
    (a year is 365 days)."""
    if seconds == 0:
        return "0"
    for unit, size in _TIME_UNITS:
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def format_summary(summary: Sequence[dict]) -> str:
    """An aligned text table of a summary, accuracies in percent (times in human units)."""
    named = any("model" in s for s in summary)
    timed = any("t_inference" in s for s in summary)
    faulted = any("fault_rate" in s for s in summary)
    columns = [("model", "model", str)] * named
    columns += [("t_inference", "t_inference", format_time)] * timed
    columns += [("fault_rate", "fault_rate", "{:g}".format)] * faulted
    columns += [
        ("sigma", "sigma", "{:g}".format),
        ("mean_shift", "mean_shift", "{:g}".format),
        ("adc_levels", "adc_levels", lambda n: "none" if n is None else str(n)),
        ("acc_mean", "acc_mean%", _percent),
        ("acc_ci95", "ci95%", _percent),
    ]
    if timed:
        columns += [
            ("acc_std_chip", "chip_std%", _percent),
            ("acc_std_read", "read_std%", _percent),
            ("acc_p5", "p5%", _percent),
        ]
    else:
        columns.append(("acc_std", "acc_std%", _percent))
    columns += [("loss_mean", "loss_mean", "{:.4f}".format), ("chips", "chips", str)]
    columns += [("repetitions", "reads", str)] * timed
    table = [[header for _, header, _ in columns]]
    table += [[show(s[key]) for key, _, show in columns] for s in summary]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table
    )
