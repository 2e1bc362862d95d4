"""Seaborn figures the papers show, and the common ones every chapter uses.

Functions take results (RunResult, DataFrames) and return matplotlib objects; they never
train, never print, and never call plt.show().
"""

from __future__ import annotations

import importlib.util as _util

_MISSING = [m for m in ("matplotlib", "seaborn") if _util.find_spec(m) is None]
if _MISSING:
    raise ImportError(
        f"auxnb.plot needs {' and '.join(_MISSING)}; install the plot extra: pip install \"auxnb[plot]\" "
        "(or pip install matplotlib seaborn)."
    )

from .common import learning_curves, results_bars, run_label, selection_of

__all__ = ["learning_curves", "results_bars", "run_label", "selection_of"]

# --- MAOAL (issue 4): importance heatmaps ---
from .maoal import compare_with_paper, importance_frame, importance_heatmap, importance_over_training, partition_ablation  # noqa: E402

__all__ += ["importance_frame", "importance_heatmap", "importance_over_training", "partition_ablation", "compare_with_paper"]

# --- JTDS (issue 5): sample weights, filter functions ---
from .jtds import accuracy_vs_corruption, corruption_weights, filter_functions, weights_over_training  # noqa: E402
from .jtds import noise_separation  # noqa: E402  (issue 22)

__all__ += ["corruption_weights", "weights_over_training", "filter_functions", "accuracy_vs_corruption", "noise_separation"]

# --- DTG (issue 6): generated labels ---
from .dtg import generated_labels, generator_state, label_collapse, label_peaks  # noqa: E402

__all__ += ["generated_labels", "generator_state", "label_collapse", "label_peaks"]

# --- any method (issue 16): task weights over training, weight distributions ---
from .weights import learned_frame, task_weights, weight_distribution  # noqa: E402

__all__ += ["learned_frame", "task_weights", "weight_distribution"]
