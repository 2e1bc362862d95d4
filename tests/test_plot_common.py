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
