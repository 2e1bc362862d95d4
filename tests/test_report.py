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
