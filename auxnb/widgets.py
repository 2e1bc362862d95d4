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


def importance_slider(result, *, figsize: tuple[float, float] = (6.0, 2.4), fixed_scale: bool = True,
                      max_frames: int = 12, dpi: int = 72):
    """Scrub a MAOAL run's training time: a slider over its evaluation steps shows α
    (auxiliary losses × modules) at the chosen step, as `auxnb.plot.importance_heatmap`.

    Every frame is drawn once, up front, and the slider is linked to the frames in the browser
    (``ipywidgets.jslink``), so the slider also works on a static page (the book) with no kernel.

    Args:
        result: a MAOAL `RunResult` (or its trace).
        figsize: size of each frame, in inches.
        fixed_scale: keep one colour scale for every step (so colours compare across time).
        max_frames: at most this many evaluation steps, evenly spaced, the last one always included
            (each frame is a PNG stored with the notebook).
        dpi: resolution of the frames.

    Returns:
        An ``ipywidgets.VBox`` (slider above the figure); display it in a notebook.
    """
    import io

    ipywidgets, _ = _require_widgets()
    import matplotlib.pyplot as plt

    from .plot.maoal import importance_frame, importance_heatmap

    if max_frames < 1:
        raise ValueError(f"importance_slider: max_frames must be >= 1, got {max_frames}.")
    frame = importance_frame(result)
    steps = [int(s) for s in sorted(frame["step"].unique())]
    if len(steps) > max_frames:
        picks = sorted({round(i * (len(steps) - 1) / (max_frames - 1)) for i in range(max_frames)}) if max_frames > 1 else [len(steps) - 1]
        steps = [steps[i] for i in picks]
    vmax = max(1.0, float(frame["importance"].max())) if fixed_scale else None
    images = []
    for step in steps:
        fig, ax = plt.subplots(figsize=figsize)
        importance_heatmap(result, step=step, ax=ax, vmax=vmax)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        plt.close(fig)
        images.append(ipywidgets.Image(value=buffer.getvalue(), format="png"))
    slider = ipywidgets.SelectionSlider(options=steps, value=steps[-1], description="step",
                                        layout=ipywidgets.Layout(width="95%"))
    stack = ipywidgets.Stack(images, selected_index=len(steps) - 1)
    ipywidgets.jslink((slider, "index"), (stack, "selected_index"))
    return ipywidgets.VBox([slider, stack])


__all__ += ["importance_slider"]

# --- JTDS (issue 5) ---

# --- DTG (issue 6) ---
