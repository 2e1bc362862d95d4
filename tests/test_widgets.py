"""auxnb.widgets: the importance slider works without a kernel (frames drawn up front, linked in the browser)."""

import ipywidgets
from ipywidgets.widgets.widget_link import Link
import matplotlib
import pytest

matplotlib.use("Agg")

from auxnb import widgets  # noqa: E402


def _trace(n):
    return [{"step": 10 * (i + 1), "importance": [[1.0 - i / n, 1.0 + i / n]], "importance_losses": ["aux"],
             "importance_groups": ["layer1", "head:aux"], "importance_reach": [[True, True]]} for i in range(n)]


def test_importance_slider_is_linked_to_prerendered_frames_in_the_browser():
    box = widgets.importance_slider(_trace(5))
    slider, stack = box.children
    assert isinstance(stack, ipywidgets.Stack) and len(stack.children) == 5
    assert all(isinstance(f, ipywidgets.Image) and f.value[:4] == b"\x89PNG" for f in stack.children)
    assert stack.selected_index == slider.index == 4  # the last evaluation is shown first
    links = [w for w in ipywidgets.Widget.widgets.values() if isinstance(w, Link)
             and w.source == (slider, "index") and w.target == (stack, "selected_index")]
    assert len(links) == 1  # a front-end link (jslink), not a Python callback: it survives in static HTML
    frames = {bytes(f.value) for f in stack.children}
    assert len(frames) == 5  # each step draws its own α


def test_importance_slider_thins_to_max_frames_keeping_first_and_last():
    slider, stack = widgets.importance_slider(_trace(30), max_frames=4).children
    assert list(slider.options) == [10, 110, 200, 300]  # steps 0, 10, 19, 29 of 30: evenly spaced and len(stack.children) == 4
    with pytest.raises(ValueError, match="max_frames"):
        widgets.importance_slider(_trace(3), max_frames=0)
