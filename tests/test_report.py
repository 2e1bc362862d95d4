"""auxnb.report: paired differences checked against hand-computed values; the figure's error bars."""

import math

import matplotlib
import pandas as pd
import pytest

matplotlib.use("Agg")

from auxnb import report  # noqa: E402


def _runs():
    return pd.DataFrame({
        "case": ["c"] * 6 + ["d"] * 2,
        "label": ["STL", "STL", "STL", "A", "A", "A", "STL", "A"],
        "seed": [0, 1, 2, 0, 1, 2, 0, 0],
        "test": [0.50, 0.60, 0.70, 0.52, 0.59, 0.74, 0.4, 0.3],
    })


def test_paired_differences_match_hand_computed_mean_std_interval_and_wins():
    d = report.paired_differences(_runs(), "STL", by=["case"]).set_index("case")
    c = d.loc["c"]
    diffs = [2.0, -1.0, 4.0]  # points, seed by seed
    mean = sum(diffs) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    assert c["n"] == 3 and c["mean"] == pytest.approx(mean) and c["std"] == pytest.approx(std)
    half = 4.302652729911275 * std / math.sqrt(3)  # t_{0.975, 2}
    assert (c["ci_low"], c["ci_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert (c["wins"], c["losses"]) == (2, 1)
    one = d.loc["d"]
    assert one["n"] == 1 and one["mean"] == pytest.approx(-10.0) and math.isnan(one["std"])


def test_paired_differences_pairs_by_seed_not_by_row_order():
    shuffled = _runs().iloc[[5, 0, 4, 1, 3, 2, 6, 7]]
    a = report.paired_differences(_runs(), "STL", by=["case"])
    b = report.paired_differences(shuffled, "STL", by=["case"])
    pd.testing.assert_frame_equal(a, b)


def test_paired_differences_refuses_missing_baseline_and_duplicates():
    with pytest.raises(ValueError, match="no 'Equal' runs"):
        report.paired_differences(_runs(), "Equal", by=["case"])
    with pytest.raises(ValueError, match="more than one run"):
        report.paired_differences(pd.concat([_runs(), _runs().iloc[:1]]), "STL", by=["case"])
    with pytest.raises(ValueError, match="no column"):
        report.paired_differences(_runs(), "STL", by=["opt"])


def test_paired_table_is_one_short_row_per_method():
    t = report.paired_table(report.paired_differences(_runs(), "STL", by=["case"]))
    assert list(t.columns) == ["Δ (points), mean ± std", "95 % CI", "wins/n"]
    assert t.loc[("c", "A"), "wins/n"] == "2/3" and t.loc[("d", "A"), "Δ (points), mean ± std"] == "-10.0"


def test_ours_vs_published_draws_one_error_bar_per_method_and_source():
    ours = pd.DataFrame({"setting": ["s"] * 4, "method": ["stl", "stl", "maoal", "maoal"], "test": [0.5, 0.6, 0.7, 0.7]})
    theirs = pd.DataFrame({"method": ["SLL", "MAOAL"], "X": [61.1, 69.6], "X ±": [1.0, 0.9]})
    long = report.ours_and_published(ours, theirs, ["X"])
    assert long["method"].tolist() == ["SLL", "SLL", "MAOAL", "MAOAL"]
    assert long.loc[long.source == "ours: s", "std"].round(4).tolist() == [round(100 * 0.0707107, 4), 0.0]
    fig = report.ours_vs_published(long)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert ax.get_xlabel() == "test accuracy (%)"
        assert len(ax.containers) == 1 and len(ax.containers[0].lines[2][0].get_segments()) == 2
    with pytest.raises(ValueError, match="no column"):
        report.ours_and_published(ours, theirs, ["Y"])


def test_ours_and_published_quotes_several_tables_on_shared_rows():
    ours = pd.DataFrame({"setting": ["s", "s"], "method": ["stl", "jtds"], "test": [0.5, 0.6]})
    t1 = pd.DataFrame({"method": ["SLL", "MAOAL"], "A": [48.15, 52.36], "A ±": [0.88, 0.64]})
    t1.attrs["caption"] = "mean of 3 seeds"
    t2 = pd.DataFrame({"method": ["STL", "JTDS"], "B": [44.99, 46.13], "B ±": [1.15, 0.89]})
    t2.attrs["caption"] = "over 5 seeds"
    long = report.ours_and_published(ours, [(t1, {"A": "paper: A"}), (t2, ["B"])],
                                     names={"stl": "STL", "jtds": "JTDS"}, rename={"SLL": "STL"})
    # the papers' order (STL from both tables on one row, then MAOAL, then JTDS), each number quoted as given
    assert long["method"].tolist() == ["STL", "STL", "STL", "MAOAL", "JTDS", "JTDS"]
    got = {(m, s): (mean, n) for m, s, mean, n in long[["method", "source", "mean", "n"]].itertuples(index=False)}
    assert got[("STL", "paper: A")] == (48.15, 3) and got[("STL", "paper: B")] == (44.99, 5)
    assert got[("JTDS", "ours: s")] == (60.0, 1)
    with pytest.raises(ValueError, match="leave columns out"):
        report.ours_and_published(ours, [(t1, ["A"])], ["A"])
    with pytest.raises(ValueError, match="name the paper's columns"):
        report.ours_and_published(ours, t1)


def test_ours_vs_published_two_rows_puts_ours_above_the_papers():
    ours = pd.DataFrame({"setting": ["a", "b", "c"], "method": ["stl"] * 3, "test": [0.5, 0.6, 0.7]})
    theirs = pd.DataFrame({"method": ["SLL"], "X": [48.0], "Y": [50.0]})
    fig = report.ours_vs_published(report.ours_and_published(ours, theirs, ["X", "Y"]), two_rows=True)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["ours: a", "ours: b", "ours: c", "paper: X", "paper: Y"]
    rows = sorted({round(ax.get_position().y0, 3) for ax in shown})
    assert len(rows) == 2
    assert all(ax.get_position().y0 > rows[0] for ax in shown[:3])  # ours on the upper row
    assert all(ax.get_xlabel() == "test accuracy (%)" for ax in shown)


def test_a_published_number_without_spread_is_drawn_open_on_top():
    ours = pd.DataFrame({"setting": ["s"], "method": ["stl"], "test": [0.5]})
    theirs = pd.DataFrame({"method": ["SLL"], "X": [65.9]})  # no "X ±" column: the paper prints no spread
    fig = report.ours_vs_published(report.ours_and_published(ours, theirs, ["X"]))
    paper = fig.axes[1]
    filled = max(line.get_zorder() for line in paper.lines if line.get_marker() == "D" and line.get_markerfacecolor() != "white")
    opened = [line for line in paper.lines if line.get_markerfacecolor() == "white"]
    assert len(opened) == 1 and opened[0].get_zorder() > filled
