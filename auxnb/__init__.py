"""auxnb: bi-level auxiliary learning in PyTorch (MAOAL, JTDS, DTG-AuxL and their baselines).

The package is the library behind the auxnb book; every chapter imports it. See the README
for the two commands that set up, run the main job and run the tests.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import data, hypergrad, methods, models, partition, tasks
from .data import DataBundle, TaskDataset
from .models import MultiHeadModel
from .tasks import Task, TaskSet
from .train import RunResult, Trainer

__all__ = [
    "Task", "TaskSet", "TaskDataset", "DataBundle", "MultiHeadModel", "Trainer", "RunResult",
    "data", "hypergrad", "methods", "models", "partition", "tasks", "experiments", "plot", "widgets",
]


def __getattr__(name: str):
    # These pull in settings, plotting or widget libraries: import them on first use.
    if name in ("experiments", "plot", "widgets"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'auxnb' has no attribute {name!r}")
