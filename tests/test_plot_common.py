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
