"""Tables as data: the rows mupt prints, as pandas DataFrames written to CSV or Parquet.

Every table a command prints (coordinate rows, LR-transfer sweep points, a recipe's per-role
values) is also a tidy DataFrame (one row per observation, plain columns) for notebooks.
:func:`write_table` picks the format from the suffix (``.csv``; ``.parquet`` needs pyarrow, the
``parquet`` extra); :func:`write_beside` writes both next to a command's JSON result (Parquet
only when pyarrow is installed).  Files are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from mupt.config import atomic_write_bytes, atomic_write_text
from mupt.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

SUFFIXES = (".csv", ".parquet")


def parquet_available() -> bool:
    """True when pyarrow (pandas' Parquet engine) is importable."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` to ``path`` as CSV (``.csv``) or Parquet (``.parquet``), atomically; returns the path.

    Raises ConfigError for another suffix, or for ``.parquet`` without pyarrow.
    """
    path = Path(path)
    if path.suffix == ".csv":
        atomic_write_text(path, df.to_csv(index=False))
    elif path.suffix == ".parquet":
        if not parquet_available():
            raise ConfigError(f"{path}: writing Parquet needs pyarrow; pip install 'mupt[parquet]' or use a .csv path")
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        atomic_write_bytes(path, buf.getvalue())
    else:
        raise ConfigError(f"{path}: a table file must end in .csv or .parquet")
    return path


def write_beside(df: pd.DataFrame, json_path: str | Path) -> list[Path]:
    """``x.json`` -> ``x.csv`` and, when pyarrow is installed, ``x.parquet``; returns the paths written."""
    stem = Path(json_path).with_suffix("")
    suffixes = SUFFIXES if parquet_available() else (".csv",)
    return [write_table(df, stem.with_suffix(s)) for s in suffixes]
