"""ipywidgets views to scrub through a run's trace (training time on a slider).

Widgets wrap the plotting functions of `auxnb.plot`; they hold no training logic.
"""

from __future__ import annotations

__all__: list[str] = []

# --- MAOAL (issue 4) ---

# --- JTDS (issue 5) ---

# --- DTG (issue 6) ---
