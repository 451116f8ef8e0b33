"""Robustness by Monte Carlo over programmed chips: grids, rows, measurement, statistics, plots."""
