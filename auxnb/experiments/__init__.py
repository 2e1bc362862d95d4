"""Experiment settings as named configurations at three scales, and the `run` / `sweep` entry points.

A setting builds data and a model from a config; it never trains and never prints.
Scales: ``smoke`` (seconds, CI), ``small`` (CPU minutes), ``paper`` (the published protocol, GPU).
"""

from __future__ import annotations

from .core import (
    OVERRIDES,
    SCALES,
    Setting,
    SweepWarning,
    check_sweep_outputs,
    default_scale,
    get_setting,
    method_entries,
    register_setting,
    resolve_config,
    run,
    settings,
    setting_cases,
    summarize,
    summary_table,
    sweep,
)
from .published import paper_results, tables as paper_tables
from . import digits as _digits  # noqa: F401  (registers the digits settings)
from . import images as _images  # noqa: F401  (registers the paper image settings, issue 7)
from . import recommendation as _recommendation  # noqa: F401  (registers the recommendation settings, issue 7)
from .protocols import Variant, data_available, get_variant, variants
from .applicability import RATING_SETTINGS, REFUSED, Refusal, check_applicable, refusal, refused_cells

__all__ = [
    "SweepWarning", "check_sweep_outputs",
    "Setting",
    "settings",
    "get_setting",
    "register_setting",
    "run",
    "sweep",
    "setting_cases",
    "method_entries",
    "summarize",
    "resolve_config",
    "default_scale",
    "SCALES",
    "OVERRIDES",
    "paper_results",
    "paper_tables",
    "summary_table",
    "variants",
    "get_variant",
    "Variant",
    "data_available",
    "REFUSED",
    "RATING_SETTINGS",
    "Refusal",
    "refusal",
    "refused_cells",
    "check_applicable",
]
