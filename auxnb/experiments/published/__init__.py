"""The papers' published numbers, quoted with their table and paper, so notebooks show ours beside theirs.

One module per paper (`maoal`, `jtds`, `dtg`), each defining ``TABLES``: table id ->
``{"caption": str, "source": str, "columns": [...], "rows": [{"method": ..., col: value}, ...]}``.
These are quotations, never results of auxnb; every frame carries a ``source`` column saying so.
"""

from __future__ import annotations

import importlib

import pandas as pd

__all__ = ["paper_results", "tables"]

_PAPERS = ("maoal", "jtds", "dtg")


def _all_tables() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for paper in _PAPERS:
        try:
            module = importlib.import_module(f".{paper}", __name__)
        except ModuleNotFoundError:
            continue
        for key, table in module.TABLES.items():
            out[f"{paper}-{key}"] = table
    return out


def tables() -> pd.DataFrame:
    """Available table ids with their captions."""
    return pd.DataFrame([{"table": k, "caption": v["caption"], "source": v["source"]} for k, v in _all_tables().items()])


def paper_results(table: str) -> pd.DataFrame:
    """The published numbers of one table (e.g. ``"maoal-table1"``), with a ``source`` column.

    Raises:
        ValueError: unknown table id (the message lists the available ones).
    """
    all_tables = _all_tables()
    if table not in all_tables:
        raise ValueError(f"Unknown table {table!r}; available: {', '.join(all_tables) or 'none yet'}.")
    t = all_tables[table]
    frame = pd.DataFrame(t["rows"])
    frame.insert(0, "source", t["source"])
    frame.attrs["caption"] = t["caption"]
    return frame
