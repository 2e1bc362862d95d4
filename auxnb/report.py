"""Result tables turned into what a chapter shows: paired differences against a baseline over shared
seeds, and our numbers beside the papers' (a short table and a figure with error bars).

Pure functions of tidy DataFrames; they never train, never print and never call ``plt.show()``.
"""

from __future__ import annotations

import math
import textwrap
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["paired_differences", "paired_table", "no_harm_table", "select_by_val", "ours_and_published", "ours_vs_published"]


def _t_quantile(q: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, dof))


def paired_differences(
    table: pd.DataFrame,
    baseline: str,
    *,
    value: str = "test",
    method: str = "label",
    pair: str = "seed",
    by: Sequence[str] = (),
    scale: float = 100.0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Each method's difference to `baseline` on the same `pair` (seed), per group of `by`.

    A run is compared only with the baseline run that shares its group and seed, so the spread of
    the differences excludes what all methods share (the split, the initialisation); this is the
    paired comparison the low-data benchmark and the chapters report.

    Args:
        table: one row per run, with columns `method`, `pair`, `value` and every column of `by`.
        baseline: the value of `method` every other method is compared with (e.g. ``"STL"``).
        scale: multiplies the differences (100: accuracy fractions become percentage points).
        confidence: level of the Student-t interval of the mean difference.

    Returns:
        One row per group and method other than the baseline, in order of first appearance:
        the `by` columns, `method`, ``n`` (paired seeds), ``mean``, ``std`` (ddof=1; NaN for one
        seed), ``ci_low``/``ci_high`` (NaN for one seed), ``wins`` and ``losses`` (seeds where the
        method is above/below the baseline).

    Raises:
        ValueError: a missing column, a group without the baseline, or a (group, method, seed)
            that occurs twice.

    Example:
        >>> t = pd.DataFrame({"label": ["STL", "STL", "A", "A"], "seed": [0, 1, 0, 1],
        ...                   "test": [0.50, 0.60, 0.53, 0.61]})
        >>> d = paired_differences(t, "STL")
        >>> d[["method", "n", "mean", "wins"]].round(4).values.tolist()
        [['A', 2, 2.0, 2]]
        >>> round(float(d["std"].iloc[0]), 4)
        1.4142
    """
    by = list(by)
    missing = [c for c in [method, pair, value, *by] if c not in table.columns]
    if missing:
        raise ValueError(f"paired_differences: table has no column(s) {missing}; it has {list(table.columns)}. "
                         "Name the right ones with method=, pair=, value=, by=.")
    keys = [*by, method, pair]
    dup = table.duplicated(subset=keys, keep=False)
    if dup.any():
        first = table.loc[dup, keys].iloc[0].to_dict()
        raise ValueError(f"paired_differences: more than one run for {first}; aggregate or deduplicate first.")
    rows = []
    groups = table.groupby(by, sort=False) if by else [((), table)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        base = group[group[method] == baseline].set_index(pair)[value]
        if base.empty:
            where = dict(zip(by, key)) or "the table"
            raise ValueError(f"paired_differences: no {baseline!r} runs in {where}; "
                             f"{method!r} has {sorted(map(str, group[method].unique()))}.")
        for name, runs in group[group[method] != baseline].groupby(method, sort=False):
            runs = runs.set_index(pair)[value]
            shared = runs.index.intersection(base.index)
            d = scale * (runs.loc[shared].astype(float) - base.loc[shared].astype(float))
            n = int(d.size)
            mean = float(d.mean()) if n else math.nan
            std = float(d.std(ddof=1)) if n > 1 else math.nan
            half = _t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
            rows.append({**dict(zip(by, key)), "method": name, "n": n, "mean": mean, "std": std,
                         "ci_low": mean - half, "ci_high": mean + half,
                         "wins": int((d > 0).sum()), "losses": int((d < 0).sum())})
    return pd.DataFrame(rows, columns=[*by, "method", "n", "mean", "std", "ci_low", "ci_high", "wins", "losses"])


def paired_table(diffs: pd.DataFrame, *, digits: int = 1, unit: str = "points", confidence: float = 0.95) -> pd.DataFrame:
    """`paired_differences` as a short table to read: mean ± std, the interval and wins/n.

    Example:
        >>> d = pd.DataFrame({"method": ["A"], "n": [5], "mean": [1.23], "std": [0.5], "ci_low": [0.6],
        ...                   "ci_high": [1.85], "wins": [4], "losses": [1]})
        >>> paired_table(d).iloc[0].tolist()
        ['+1.2 ± 0.5', '[+0.6, +1.9]', '4/5']
    """
    def fmt(v: float) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.{digits}f}"

    index = [c for c in diffs.columns if c not in {"n", "mean", "std", "ci_low", "ci_high", "wins", "losses"}]
    level = f"{round(100 * confidence)} % CI"
    out = pd.DataFrame({
        f"Δ ({unit}), mean ± std": [
            fmt(m) if math.isnan(s) else f"{fmt(m)} ± {s:.{digits}f}" for m, s in zip(diffs["mean"], diffs["std"])],
        level: [f"[{fmt(lo)}, {fmt(hi)}]" if not math.isnan(lo) else "–" for lo, hi in zip(diffs["ci_low"], diffs["ci_high"])],
        "wins/n": [f"{w}/{n}" for w, n in zip(diffs["wins"], diffs["n"])],
    }, index=pd.MultiIndex.from_frame(diffs[index]) if len(index) > 1 else pd.Index(diffs[index[0]]))
    return out


def no_harm_table(
    table: pd.DataFrame,
    baselines: Sequence[str] = ("STL", "Equal"),
    *,
    reference: Mapping[str, str] | None = None,
    value: str = "test",
    method: str = "label",
    pair: str = "seed",
    by: Sequence[str] = ("case",),
    scale: float = 100.0,
    tolerance: float = 0.5,
    collapse: float = 5.0,
) -> pd.DataFrame:
    """Does a method do harm? Each method against the better of `baselines`, paired by seed.

    Per group of `by`, the reference is the baseline with the higher mean over the seeds the
    method shares with every baseline (or the one `reference` names for that group, e.g. STL
    where the auxiliary loss is known to be harmful); the method's paired mean difference to it
    gives the verdict: ``"wins"`` above `tolerance`, ``"loses"`` below −`tolerance`, ``"ties"``
    between. ``above_all`` says whether the method's mean is above every baseline's, and
    ``worst`` is its worst single-seed difference to the first baseline (STL): a seed more than
    `collapse` points below it is flagged ``collapsed`` (a defect to explain, not noise).

    Returns:
        One row per group and method: the `by` columns, `method`, ``n``, ``reference``,
        ``mean``, ``std`` (ddof=1; NaN for one seed), ``verdict``, ``above_all``, ``worst``,
        ``collapsed``.

    Example:
        >>> t = pd.DataFrame({"case": ["c"] * 6, "label": ["STL", "Equal", "A"] * 2, "seed": [0, 0, 0, 1, 1, 1],
        ...                   "test": [0.60, 0.62, 0.625, 0.70, 0.71, 0.70]})
        >>> r = no_harm_table(t).iloc[0]
        >>> r["reference"], round(float(r["mean"]), 2), r["verdict"], bool(r["above_all"]), round(float(r["worst"]), 2)
        ('Equal', -0.25, 'ties', False, 0.0)
    """
    by, baselines, reference = list(by), list(baselines), dict(reference or {})
    missing = [c for c in [method, pair, value, *by] if c not in table.columns]
    if missing:
        raise ValueError(f"no_harm_table: table has no column(s) {missing}; it has {list(table.columns)}.")
    if not baselines:
        raise ValueError("no_harm_table: name at least one baseline (e.g. baselines=('STL', 'Equal')).")
    rows = []
    groups = table.groupby(by, sort=False) if by else [((), table)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        wide = group.pivot_table(index=pair, columns=method, values=value, aggfunc="first") * scale
        absent = [b for b in baselines if b not in wide.columns]
        if absent:
            continue  # a group whose baselines have not run: nothing to compare with
        for name in [m for m in dict.fromkeys(group[method]) if m not in baselines]:
            both = wide[[*baselines, name]].dropna()
            if both.empty:
                continue
            ref = reference.get(key[0] if len(key) == 1 else key) or both[baselines].mean().idxmax()
            d = both[name] - both[ref]
            n = int(d.size)
            mean = float(d.mean())
            worst = float((both[name] - both[baselines[0]]).min())
            rows.append({**dict(zip(by, key)), "method": name, "n": n, "reference": ref, "mean": mean,
                         "std": float(d.std(ddof=1)) if n > 1 else math.nan,
                         "verdict": "wins" if mean > tolerance else "loses" if mean < -tolerance else "ties",
                         "above_all": bool((both[name].mean() > both[baselines].mean()).all()),
                         "worst": worst, "collapsed": bool(worst < -collapse)})
    return pd.DataFrame(rows, columns=[*by, "method", "n", "reference", "mean", "std", "verdict", "above_all", "worst",
                                       "collapsed"])


def select_by_val(
    table: pd.DataFrame,
    candidates: Sequence[str],
    name: str,
    *,
    method: str = "label",
    pair: str = "seed",
    by: Sequence[str] = ("case",),
    val: str = "val",
    higher_is_better: bool = True,
    margin: float = 0.0,
    add: Sequence[str] = ("seconds",),
) -> pd.DataFrame:
    """Rows of a selection made on D_val, the do-no-harm guard's rule (`auxnb.methods.guard.select`):
    per group and seed, the second candidate (STL) unless a later one (Equal, then the first
    candidate, the method) beats the run kept so far by more than `margin` on `val`; relabelled
    `name`; columns in `add` are summed over the candidates (the selection trained all of them).
    This is what a run with ``guard="stl"`` keeps (candidates ``[method, "STL"]``; ``"stl+equal"``:
    ``[method, "STL", "Equal"]``) with ``guard_margin=margin`` (`auxnb.selection`).

    Returns:
        The chosen rows (every column of `table`), with `method` = `name` and ``selected`` = the
        label of the chosen run; groups or seeds where a candidate is missing are left out.

    Example:
        >>> t = pd.DataFrame({"case": ["c"] * 4, "label": ["A", "STL", "A", "STL"], "seed": [0, 0, 1, 1],
        ...                   "val": [0.9, 0.8, 0.7, 0.8], "test": [0.91, 0.82, 0.69, 0.80], "seconds": [10, 2, 10, 2]})
        >>> select_by_val(t, ["A", "STL"], "A + guard")[["seed", "selected", "test", "seconds"]].values.tolist()
        [[0, 'A', 0.91, 12], [1, 'STL', 0.8, 12]]
        >>> select_by_val(t, ["A", "STL"], "A + guard", margin=0.15)["selected"].tolist()  # 0.9 - 0.8 <= 0.15
        ['STL', 'STL']
    """
    from .methods.guard import select

    by, candidates = list(by), list(candidates)
    missing = [c for c in [method, pair, val, *by] if c not in table.columns]
    if missing:
        raise ValueError(f"select_by_val: table has no column(s) {missing}; it has {list(table.columns)}.")
    rows = []
    groups = table.groupby(by, sort=False) if by else [((), table)]
    for _, group in groups:
        runs = group[group[method].isin(candidates)]
        for _, seed_runs in runs.groupby(pair, sort=True):
            if set(seed_runs[method]) != set(candidates):
                continue
            ordered = seed_runs.set_index(method).loc[candidates]
            vals = ordered[val].astype(float)
            kept = select(float(vals.iloc[0]), {c: float(vals[c]) for c in candidates[1:]},
                          higher_is_better=higher_is_better, margin=margin, method_name=candidates[0])
            row = ordered.reset_index().iloc[candidates.index(kept)].copy()
            row["selected"] = row[method]
            row[method] = name
            for col in add:
                if col in ordered:
                    row[col] = ordered[col].sum()
            rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


def ours_and_published(
    table: pd.DataFrame,
    published: pd.DataFrame | Sequence[tuple[pd.DataFrame, Mapping[str, str] | Sequence[str]]],
    columns: Mapping[str, str] | Sequence[str] | None = None,
    *,
    names: Mapping[str, str] | None = None,
    rename: Mapping[str, str] | None = None,
    value: str = "test",
    percent: bool = True,
) -> pd.DataFrame:
    """Our runs and a paper's table in one long frame: method, source, mean, std, n.

    Args:
        table: one row per run (columns ``setting``, ``method``, `value`), e.g. a sweep's table.
        published: an `auxnb.experiments.paper_results` frame (columns ``method``, ``X``, ``X ±``),
            or a list of ``(frame, columns)`` pairs to quote several tables (then leave `columns` out).
        columns: the paper's columns to take; a mapping gives each a label (default ``paper: X``).
        names: auxnb method name -> the paper's name (default `auxnb.plot.maoal.PAPER_METHOD_NAMES`).
        rename: applied last to every method name, ours and the papers' (e.g. ``{"SLL": "STL"}`` puts
            two papers' names for the same baseline on one row).
        percent: show our `value` (a fraction) in percent, as the papers print accuracy.

    Returns:
        Rows in the papers' method order (our extra methods last); ``source`` is ``ours: <setting>``
        or the paper column's label; ``std`` is NaN where the paper gives none and 0 for one seed.

    Example:
        >>> ours = pd.DataFrame({"setting": ["s", "s"], "method": ["stl", "stl"], "test": [0.5, 0.6]})
        >>> theirs = pd.DataFrame({"method": ["SLL"], "X": [48.15], "X ±": [0.88]})
        >>> ours_and_published(ours, theirs, ["X"]).round(2).values.tolist()
        [['SLL', 'ours: s', 55.0, 7.07, 2], ['SLL', 'paper: X', 48.15, 0.88, 3]]
    """
    from .plot.maoal import PAPER_METHOD_NAMES

    names = dict(PAPER_METHOD_NAMES if names is None else names)
    rename = dict(rename or {})
    if isinstance(published, pd.DataFrame):
        if columns is None:
            raise ValueError("ours_and_published: name the paper's columns to quote, e.g. ['CUB-semi'] "
                             "(or pass published as a list of (frame, columns) pairs).")
        tables = [(published, columns)]
    else:
        if columns is not None:
            raise ValueError("ours_and_published: with a list of (frame, columns) pairs, leave columns out.")
        tables = list(published)
    quoted = []
    for frame, cols in tables:
        labels = dict(cols) if isinstance(cols, Mapping) else {c: f"paper: {c}" for c in cols}
        absent = [c for c in labels if c not in frame.columns]
        if absent:
            raise ValueError(f"ours_and_published: the paper's table has no column(s) {absent}; "
                             f"it has {[c for c in frame.columns if c not in ('source', 'method')]}.")
        quoted.append((frame, labels))
    factor = 100.0 if percent else 1.0
    rows = []
    for (setting, method), group in table.groupby(["setting", "method"], sort=False):
        v = factor * group[value].astype(float)
        rows.append({"method": names.get(method, method), "source": f"ours: {setting}", "mean": float(v.mean()),
                     "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(v.size)})
    for frame, labels in quoted:
        seeds = 3  # MAOAL and JTDS report 3 seeds; the DTG paper 5 (its captions say so)
        caption = str(frame.attrs.get("caption", ""))
        if "5 seeds" in caption:
            seeds = 5
        for _, row in frame.iterrows():
            for column, label in labels.items():
                if pd.isna(row[column]):
                    continue
                std = row.get(f"{column} ±", math.nan)
                rows.append({"method": row["method"], "source": label, "mean": float(row[column]),
                             "std": float(std) if std is not None and not pd.isna(std) else math.nan, "n": seeds})
    out = pd.DataFrame(rows, columns=["method", "source", "mean", "std", "n"])
    out["method"] = out["method"].map(lambda m: rename.get(m, m))
    paper_order = [rename.get(m, m) for frame, _ in quoted for m in frame["method"]]
    order = list(dict.fromkeys([*paper_order, *out["method"]]))
    out["_order"] = out["method"].map(order.index)
    return out.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def _panel_width(columns: int) -> float:
    # inches per panel: narrower when many panels share a row, so the figure keeps to about a page's width
    return 3.3 if columns <= 3 else 2.5


def ours_vs_published(frame: pd.DataFrame, *, ax=None, xlabel: str = "test accuracy (%)", title: str | None = None,
                      separate: bool = True, two_rows: bool = False):
    """Ours beside the paper's, one row per method, mean with a ±1 std error bar per source.

    Args:
        frame: `ours_and_published` output.
        separate: one panel per source with its own x-range (our CPU runs and the paper's GPU
            numbers differ in level; the ordering of methods is what compares). With ``False``
            all sources share one axis.
        two_rows: our panels (sources ``ours: ...``) on a first row, the papers' on a second, so
            that many panels stay readable on a page.

    Returns:
        The matplotlib Figure.
    """
    try:
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError('This figure needs matplotlib; install the plot extra: pip install "auxnb[plot]".') from None

    sources = list(dict.fromkeys(frame["source"]))
    methods = list(dict.fromkeys(frame["method"]))
    colours = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(sources)}
    panels = sources if separate else [None]
    panel_width = 3.3
    if ax is None and two_rows and separate:
        ours = [s for s in sources if str(s).startswith("ours")]
        theirs = [s for s in sources if s not in ours]
        width = max(len(ours), len(theirs), 1)
        panel_width = _panel_width(width)
        height = 0.32 * len(methods) + 1.3
        fig, grid = plt.subplots(2, width, figsize=(panel_width * width + 1.2, 2 * height), sharey=True,
                                 squeeze=False)
        axes, panels = [], []
        for r, row in enumerate([ours, theirs]):
            for c in range(width):
                if c < len(row):
                    axes.append(grid[r, c])
                    panels.append(row[c])
                else:
                    grid[r, c].set_visible(False)
    elif ax is None:
        panel_width = _panel_width(len(panels))
        fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels) + 1.2,
                                                          0.32 * len(methods) + 1.3),
                                 sharey=True, squeeze=False)
        axes = list(axes.flat)
    else:
        if len(panels) > 1:
            raise ValueError("ours_vs_published: pass ax only with separate=False (one panel).")
        axes, fig = [ax], ax.figure
    y = {m: i for i, m in enumerate(methods)}
    for panel_ax, panel in zip(axes, panels):
        shown = sources if panel is None else [panel]
        offsets = np.linspace(-0.2, 0.2, len(shown)) if len(shown) > 1 else [0.0]
        for off, source in zip(offsets, shown):
            sub = frame[frame["source"] == source]
            panel_ax.errorbar(sub["mean"], [y[m] + off for m in sub["method"]],
                              xerr=sub["std"].fillna(0.0), fmt="D", ms=5, capsize=3, color=colours[source],
                              label=source)
            for m, s in zip(sub["method"], sub["std"]):
                if pd.isna(s):  # a published number without its spread: mark it open
                    panel_ax.plot(sub.loc[sub["method"] == m, "mean"], [y[m] + off], "D", ms=5, mfc="white",
                                  color=colours[source], zorder=3)  # above the error bar's filled marker
        panel_ax.set_yticks(range(len(methods)), methods)
        panel_ax.set_ylim(len(methods) - 0.5, -0.5)
        panel_ax.set_xlabel(xlabel)
        panel_ax.grid(axis="x", alpha=0.4)
        panel_ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # a few readable ticks in a narrow panel
        if panel is not None:
            # a long source label wraps instead of running into its neighbour's title
            panel_ax.set_title("\n".join(textwrap.wrap(str(panel), width=int(11 * panel_width))), fontsize=10)
    if panel is None:
        axes[0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
