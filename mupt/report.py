"""Rich tables and matplotlib figures shared by the commands.

Functions here build renderables (tables, figures written to files); only the CLI prints them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table


def fmt(value: Any, digits: int = 4) -> str:
    """Compact number formatting for tables ('-' for None)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.{digits}g}"
        return f"{value:.{max(digits - 1, 1)}e}"
    return str(value)


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units (B, KiB, MiB, GiB, TiB), three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{int(n)} B" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    justify_numbers: bool = True,
    right: Sequence[str] = (),
) -> Table:
    """A Rich table with right-aligned numeric columns; ``right`` names more columns to right-align (numbers
    the caller formatted as strings, e.g. losses to a fixed number of decimals)."""
    t = Table(title=title, title_justify="left", header_style="bold")
    first = rows[0] if rows else []
    for i, col in enumerate(columns):
        numeric = (
            justify_numbers and i < len(first) and isinstance(first[i], (int, float)) and not isinstance(first[i], bool)
        )
        t.add_column(col, justify="right" if numeric or col in right else "left")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    return t


def key_values(title: str, items: Sequence[tuple[str, Any]]) -> Table:
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in items:
        t.add_row(k, fmt(v))
    return t
