"""The statistics of the robustness studies: means, Student-t CIs, paired differences, Holm,
McNemar."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


def t_ci95(std: float, n: int) -> float:
    """Half-width of the 95 % Student-t confidence interval of a mean of ``n`` chips."""
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and std (ddof=1; NaN for one value) with exactly rounded sums."""
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((a - mean) ** 2 for a in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and Student-t 95 % CI half-width (NaN for one value)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def _pp(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


@dataclass
class Diff:
    """A paired difference ``a - b`` over common chips: mean and 95 % CI half-width."""

    mean: float
    ci: float
    chips: int

    @property
    def verdict(self) -> str:
        if not math.isnan(self.ci) and self.mean - self.ci > 0:
            return "better"
        if not math.isnan(self.ci) and self.mean + self.ci < 0:
            return "worse"
        return "no significant difference"

    def __str__(self) -> str:
        return f"{100 * self.mean:+.1f} ± {_pp(self.ci)}"


def paired(a: dict[int, float], b: dict[int, float]) -> Diff:
    """``a - b`` chip by chip (the chips both have)."""
    chips = sorted(set(a) & set(b))
    if not chips:
        raise ValueError("no common chips to compare")
    mean, ci = mean_ci([a[c] - b[c] for c in chips])
    return Diff(mean, ci, len(chips))


def paired_p(a: dict[int, float], b: dict[int, float]) -> float:
    """Two-sided paired t-test p-value of ``a - b`` over common chips (0 or 1 when every
    difference is equal)."""
    chips = sorted(set(a) & set(b))
    d = [a[c] - b[c] for c in chips]
    if len(set(d)) <= 1:
        return 1.0 if not d or d[0] == 0 else 0.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def holm(pvalues: dict, alpha: float = 0.05) -> dict:
    """Holm's step-down rejections (key -> bool) at family-wise level ``alpha``."""
    out, stop = {}, False
    ordered = sorted(pvalues, key=lambda k: pvalues[k])
    for i, key in enumerate(ordered):
        stop |= pvalues[key] > alpha / (len(ordered) - i)
        out[key] = not stop
    return out


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of two classifiers scored on the same images: ``b``
    images only the first got right, ``c`` only the second. Under the null (either is as likely
    to win a discordant image), min(b, c) is binomial over the b + c discordant images at 1/2;
    the p-value is twice its lower tail, at most 1 (1 with no discordant image). Computed in
    integers, so it is exact up to the final rounding to a float."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    n, k = b + c, min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)
