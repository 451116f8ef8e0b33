"""Robustness by Monte Carlo over programmed chips: grids, rows, measurement, statistics, plots."""

from cimsim.robustness.grid import EvalSettings, RobustnessGrid
from cimsim.robustness.measure import evaluate_robustness

__all__ = ["EvalSettings", "RobustnessGrid", "evaluate_robustness"]
