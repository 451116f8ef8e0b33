"""Plain-text tables of printed summaries (``cimsim.coverage``)."""

from __future__ import annotations


def si(n: float) -> str:
    """``n`` with a K / M / G suffix, 3 significant digits."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g}" if isinstance(n, float) else str(n)


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """``rows`` under ``header`` as aligned text lines (two spaces between columns)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return [fmt(header), fmt(tuple("-" * w for w in widths)), *(fmt(r) for r in rows)]
