"""Text for the command line: tables and paragraphs that fit the terminal, and `run`'s report block.

Nothing here prints; `auxnb.__main__` prints what these functions return. The width is the
terminal's (``$COLUMNS`` first, as `shutil.get_terminal_size` reads it), 80 columns when the
output is not a terminal, and never less than `MIN_WIDTH`.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any, Mapping, Sequence

__all__ = ["MIN_WIDTH", "width", "fill", "table", "records", "frame_table", "run_block"]

#: Narrower terminals get this width (lines then wrap in the terminal itself).
MIN_WIDTH = 40


def width() -> int:
    """The terminal's width in columns: ``$COLUMNS``, else the terminal's, else 80."""
    return max(MIN_WIDTH, shutil.get_terminal_size((80, 24)).columns)


def fill(text: str, cols: int | None = None, indent: str = "") -> str:
    """`text` as a paragraph no wider than `cols` (default: the terminal's width)."""
    cols = cols or width()
    return textwrap.fill(text, cols, initial_indent=indent, subsequent_indent=indent,
                         break_long_words=True, break_on_hyphens=False)


def _widths(rows: Sequence[Mapping[str, str]], cols: list[str], limit: int, wrap: Sequence[str] | None) -> dict[str, int]:
    natural = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    widths = dict(natural)
    # the columns that may wrap, widest first; a column is never narrowed below its header or 8
    shrinkable = [c for c in cols if wrap is None or c in wrap]
    total = lambda: sum(widths.values()) + 2 * (len(cols) - 1)  # noqa: E731
    while total() > limit:
        candidates = [c for c in shrinkable if widths[c] > max(8, min(len(c), 12))]
        if not candidates:
            candidates = [c for c in cols if widths[c] > 4]  # last resort: any column
            if not candidates:
                break
        widest = max(candidates, key=lambda c: widths[c])
        widths[widest] -= 1
    return widths


def table(rows: Sequence[Mapping[str, Any]], wrap: str | Sequence[str] | None = None, cols: int | None = None) -> str:
    """A plain text table no wider than `cols` (default: the terminal's width).

    The widest of the `wrap` columns (default: any column) is narrowed first and its cells wrap
    onto more lines; nothing is cut off.

    Example:
        >>> print(table([{"name": "stl", "what": "primary task only"}], wrap="what", cols=40))
        name  what
        ----  -----------------
        stl   primary task only
    """
    cols = cols or width()
    rows = [{k: str(v) for k, v in r.items()} for r in rows]
    names = list(rows[0])
    wrap = [wrap] if isinstance(wrap, str) else wrap
    widths = _widths(rows, names, cols, wrap)
    head = {c: textwrap.wrap(c, widths[c], break_long_words=True) or [""] for c in names}
    lines = _cells(head, names, widths)
    lines.append("  ".join("-" * widths[c] for c in names))
    for r in rows:
        cells = {c: textwrap.wrap(r[c], widths[c], break_long_words=True, break_on_hyphens=False) or [""] for c in names}
        lines += _cells(cells, names, widths)
    return "\n".join(lines)


def _cells(cells: Mapping[str, list[str]], names: list[str], widths: Mapping[str, int]) -> list[str]:
    out = []
    for i in range(max(len(v) for v in cells.values())):
        out.append("  ".join((cells[c][i] if i < len(cells[c]) else "").ljust(widths[c]) for c in names).rstrip())
    return out


def frame_table(frame: Any, formats: Mapping[str, str] | None = None, cols: int | None = None) -> str:
    """A pandas DataFrame as a `table` (values formatted by `formats`, column -> format string;
    NaN and None as ``-``)."""
    formats = dict(formats or {})
    rows = []
    for rec in frame.to_dict("records"):
        row = {}
        for k, v in rec.items():
            if v is None or (isinstance(v, float) and v != v):
                row[str(k)] = "-"
            elif k in formats:
                row[str(k)] = formats[k].format(v)
            elif isinstance(v, float):
                row[str(k)] = f"{v:.6g}"
            else:
                row[str(k)] = str(v)
        rows.append(row)
    if not rows:
        return "(no rows)"
    cols = cols or width()
    names = list(rows[0])
    natural = {c: max(len(c), *(len(r[c]) for r in rows)) for c in names}
    widths = _widths(rows, names, cols, None)
    if all(widths[c] >= min(natural[c], max(len(c), 10)) for c in names):
        return table(rows, cols=cols)
    return records(rows, cols=cols)


def records(rows: Sequence[Mapping[str, str]], cols: int | None = None) -> str:
    """Rows too wide for a table at `cols`: one block per row, its first two values as a title and
    the others as ``key=value`` pairs wrapped under it.

    Example:
        >>> print(records([{"setting": "digits", "method": "stl", "runs": "3", "hours": "0.10"}], cols=30))
        digits · stl
          runs=3, hours=0.10
    """
    cols = cols or width()
    out = []
    for r in rows:
        keys = list(r)
        title, rest = keys[:2], keys[2:]
        out.append(fill(" · ".join(r[k] for k in title), cols))
        out.append(textwrap.fill(", ".join(f"{k}={r[k]}" for k in rest), cols, initial_indent="  ",
                                 subsequent_indent="  ", break_long_words=True, break_on_hyphens=False))
    return "\n".join(out)


# ------------------------------------------------------------------ run's block
def _flat(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            nested = _flat(value, f"{prefix}{key}.")
            # a nested dict that only repeats keys already given at this level is left out
            if all(config.get(k.rsplit(".", 1)[-1]) == v for k, v in nested):
                continue
            items += nested
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _labelled(label: str, text: str, cols: int) -> list[str]:
    pad = " " * 10
    body = textwrap.wrap(text, cols - len(pad), break_long_words=True, break_on_hyphens=False) or [""]
    return [f"{label:<10}{body[0]}"] + [pad + line for line in body[1:]]


def _task_line(task: Any) -> str:
    role = "primary" if task.primary else "auxiliary"
    kind = f"{task.kind}, {task.out_dim} classes" if task.kind == "classification" else task.kind
    stream = "" if task.stream == "primary" else f", input stream {task.stream!r}"
    return f"{task.name} ({role}, {kind}{stream}; metric {task.metric})"


def _number(value: float) -> str:
    return "nan" if value != value else f"{value:.4f}"


def run_block(result: Any, *, setting: str, method: str, seed: int, threads: int | None = None,
              cols: int | None = None) -> str:
    """What `python -m auxnb run` prints: the data source (real or generated fixture files), the
    tasks, the method's configuration, and the metrics, as one block no wider than `cols`."""
    cols = cols or width()
    config = result.config
    lines: list[str] = []
    where = f"{config.get('device', '?')}" + (f", {threads} CPU thread{'s' * (threads != 1)}" if threads else "")
    lines += _labelled("run", f"{setting} · method {method} · seed {seed} · {config.get('scale', '?')} scale · {where}", cols)
    source = config.get("data_source") or "?"
    if config.get("fixture"):
        kind = ("GENERATED FIXTURE FILES, not the real dataset: these numbers only show that the code runs "
                f"({source})")
    else:
        kind = f"real data: {source}"
    lines += _labelled("data", kind, cols)
    sizes = config.get("data") or {}
    split = ", ".join(f"{k} {sizes[k]:,}" for k in ("train", "dev", "val", "test") if isinstance(sizes.get(k), int))
    aux = sizes.get("aux_train") or {}
    if aux:
        split += "; auxiliary " + ", ".join(f"{k} {n:,}" for k, n in aux.items())
    if split:
        lines += _labelled("", f"samples: {split}", cols)
    tasks = getattr(result, "tasks", None)
    if tasks is not None:
        for i, task in enumerate(tasks):
            lines += _labelled("tasks" if i == 0 else "", _task_line(task), cols)
    trainer = [f"{k}={config[k]}" for k in ("steps", "batch_size", "optimizer", "lr", "weight_decay", "scheduler")
               if k in config and config[k] is not None]
    lines += _labelled("training", ", ".join(trainer), cols)
    method_config = config.get("method_config") or {}
    knobs = ", ".join(f"{k}={v}" for k, v in _flat(method_config)) or "no knobs"
    lines += _labelled("method", f"{config.get('method', method)}: {knobs}", cols)
    m = result.metric_name
    seconds = (getattr(result, "timings", None) or {}).get("total_s")
    tail = f" seconds={seconds:.1f}" if isinstance(seconds, (int, float)) else ""
    # key=value, so scripts can read it: val_<metric> at the best-on-val step, test_<metric> read there once
    lines += _labelled("result", f"val_{m}={_number(result.val_metric)} test_{m}={_number(result.test_metric)} "
                       f"best_step={result.best_step}{tail}", cols)
    return "\n".join(lines)
