"""ipywidgets views to scrub through a run's trace (training time on a slider).

Widgets wrap the plotting functions of `auxnb.plot`; they hold no training logic.
"""

from __future__ import annotations

__all__: list[str] = []


def _require_widgets():
    """ipywidgets and IPython, or an ImportError that says how to install them."""
    try:
        import ipywidgets
        from IPython.display import display
    except ImportError as err:
        raise ImportError(
            f"auxnb.widgets needs ipywidgets and IPython ({err.name} is missing); install the plot extra: "
            'pip install "auxnb[plot]" (or pip install ipywidgets).'
        ) from None
    return ipywidgets, display

# --- MAOAL (issue 4) ---


def importance_slider(result, *, figsize: tuple[float, float] = (6.0, 2.4), fixed_scale: bool = True):
    """Scrub a MAOAL run's training time: a slider over its evaluation steps redraws α
    (auxiliary losses × modules) at the chosen step, as `auxnb.plot.importance_heatmap`.

    Args:
        result: a MAOAL `RunResult` (or its trace).
        figsize: size of the redrawn figure.
        fixed_scale: keep one colour scale for every step (so colours compare across time).

    Returns:
        An ``ipywidgets.VBox`` (slider above the figure); display it in a notebook.
    """
    ipywidgets, display = _require_widgets()
    import matplotlib.pyplot as plt

    from .plot.maoal import importance_frame, importance_heatmap

    frame = importance_frame(result)
    steps = [int(s) for s in sorted(frame["step"].unique())]
    vmax = max(1.0, float(frame["importance"].max())) if fixed_scale else None
    slider = ipywidgets.SelectionSlider(options=steps, value=steps[-1], description="step",
                                        continuous_update=False, layout=ipywidgets.Layout(width="95%"))
    out = ipywidgets.Output()

    def draw(_change=None) -> None:
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=figsize)
            importance_heatmap(result, step=slider.value, ax=ax, vmax=vmax)
            fig.tight_layout()
            display(fig)
            plt.close(fig)

    slider.observe(draw, names="value")
    draw()
    return ipywidgets.VBox([slider, out])


__all__ += ["importance_slider"]

# --- JTDS (issue 5) ---

# --- DTG (issue 6) ---
