"""The shared chapter figures say their units: accuracy in percent, the axis names what it shows."""

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest

from auxnb import plot


def _run(values, column):
    return SimpleNamespace(history=pd.DataFrame({"step": [10, 20, 30], column: values, "val_loss": [1.0, 0.9, 0.8]}))


def test_learning_curves_shows_accuracy_in_percent():
    ax = plot.learning_curves({"a": _run([0.5, 0.6, 0.75], "val_accuracy")})
    assert ax.get_ylabel() == "validation accuracy (%)" and ax.get_xlabel() == "lower step"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [50.0, 60.0, 75.0])
    assert ax.get_legend() is not None and ax.get_title()


@pytest.mark.parametrize("percent, expected", [(None, [3.5, 2.0, 1.7]), (True, [350.0, 200.0, 170.0])])
def test_learning_curves_keeps_other_metrics_as_they_are(percent, expected):
    ax = plot.learning_curves({"a": _run([3.5, 2.0, 1.7], "val_rmse")}, percent=percent, ylabel="validation RMSE (stars)")
    assert ax.get_ylabel() == "validation RMSE (stars)"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), expected)


def _noisy_run(weights_clean, weights_corrupted):
    flags = np.array([False, True])
    trace = [{"step": s, "probe_corrupted": flags, "probe_weights": np.array([[c], [k]]), "tasks": ["y"]}
             for s, c, k in zip((10, 20, 30), weights_clean, weights_corrupted)]
    return SimpleNamespace(trace=trace)


def test_weights_over_training_puts_a_two_group_legend_beside_the_lines():
    """Two runs give two legend groups (samples, run): inside the axes they covered the lines (chapter 14)."""
    import matplotlib.pyplot as plt

    runs = {"r=0.2": _noisy_run([1.0, 0.95, 0.9], [1.0, 1.2, 1.1]), "r=0.5": _noisy_run([1.0, 0.9, 0.85], [1.0, 1.05, 1.2])}
    ax = plot.weights_over_training(runs)
    fig = ax.figure
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # entirely to the right of the axes
    # the means plotted are the trace's: clean and corrupted probe weights of each run
    ys = sorted(tuple(np.round(line.get_ydata(), 6)) for line in ax.lines if len(line.get_ydata()) == 3)
    assert ys == sorted([(1.0, 0.95, 0.9), (1.0, 1.2, 1.1), (1.0, 0.9, 0.85), (1.0, 1.05, 1.2)])
    plt.close(fig)


# --- issue 23: a selected run's curve is labelled by the run it came from ---------------------------

def _candidate(values):
    return SimpleNamespace(history=pd.DataFrame({"step": [10, 20, 30], "val_accuracy": values}), config={}, candidates={})


def _guarded(kept="stl", record="selection"):
    """A guarded MAOAL run as `auxnb.selection` returns it: the kept candidate's history, every candidate's own run."""
    runs = {"maoal": _candidate([0.5, 0.6, 0.7]), "stl": _candidate([0.55, 0.65, 0.72]), "equal": _candidate([0.4, 0.5, 0.6])}
    info = {"kind": "guard", "method": "maoal", "kept": kept} if record == "selection" else {"fallback": "stl+equal", "method": "maoal",
                                                                                           "kept": kept}
    return SimpleNamespace(history=runs[kept].history, config={"method": "maoal", record: info}, candidates=runs)


def _curves(ax):
    """legend text -> the y values of the line drawn in that entry's colour."""
    import matplotlib.colors as mcolors

    legend = ax.get_legend()
    by_colour = {mcolors.to_hex(line.get_color()): line for line in ax.lines if len(line.get_ydata()) == 3}
    return {text.get_text(): tuple(np.round(by_colour[mcolors.to_hex(handle.get_color())].get_ydata(), 6))
            for text, handle in zip(legend.texts, legend.legend_handles)}


@pytest.mark.parametrize("record", ["selection", "fallback"])
def test_a_guarded_runs_curve_is_labelled_by_the_run_it_kept(record):
    import matplotlib.pyplot as plt

    ax = plot.learning_curves({"maoal": _guarded("stl", record), "equal": _candidate([0.4, 0.5, 0.6])})
    curves = _curves(ax)
    assert set(curves) == {"maoal → kept stl", "equal"}  # not "maoal": the curve is STL's run
    assert curves["maoal → kept stl"] == (55.0, 65.0, 72.0)
    plt.close(ax.figure)


def test_a_guarded_run_that_kept_the_method_keeps_the_methods_label():
    import matplotlib.pyplot as plt

    ax = plot.learning_curves({"maoal": _guarded("maoal")})
    assert _curves(ax) == {"maoal": (50.0, 60.0, 70.0)}
    plt.close(ax.figure)


def test_candidates_draws_every_candidates_own_curve_labelled_by_candidate_with_the_kept_one_marked():
    import matplotlib.pyplot as plt

    ax = plot.learning_curves({"maoal": _guarded("stl")}, candidates=True)
    assert _curves(ax) == {"maoal": (50.0, 60.0, 70.0), "stl (kept)": (55.0, 65.0, 72.0), "equal": (40.0, 50.0, 60.0)}
    plt.close(ax.figure)
    # several runs: each candidate is prefixed by its run's label; a run trained alone is drawn as itself
    ax = plot.learning_curves({"seed 0": _guarded("equal"), "stl": _candidate([0.3, 0.3, 0.3])}, candidates=True)
    assert _curves(ax) == {"seed 0: maoal": (50.0, 60.0, 70.0), "seed 0: stl": (55.0, 65.0, 72.0),
                           "seed 0: equal (kept)": (40.0, 50.0, 60.0), "stl": (30.0, 30.0, 30.0)}
    plt.close(ax.figure)


def test_candidates_of_runs_that_were_not_selected_is_an_error_naming_the_guard():
    with pytest.raises(ValueError, match="guard='stl\\+equal'"):
        plot.learning_curves({"stl": _candidate([0.3, 0.3, 0.3])}, candidates=True)
