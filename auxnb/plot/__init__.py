"""Seaborn figures the papers show, and the common ones every chapter uses.

Functions take results (RunResult, DataFrames) and return matplotlib objects; they never
train, never print, and never call plt.show().
"""

from __future__ import annotations

from .common import learning_curves, results_bars

__all__ = ["learning_curves", "results_bars"]

# --- MAOAL (issue 4): importance heatmaps ---

# --- JTDS (issue 5): sample weights, filter functions ---

# --- DTG (issue 6): generated labels ---
