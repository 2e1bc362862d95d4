"""auxnb: bi-level auxiliary learning in PyTorch (MAOAL, JTDS, DTG-AuxL and their baselines).

The package is the library behind the auxnb book; every chapter imports it. See the README
for the two commands that set up, run the main job and run the tests.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "Task", "TaskSet", "TaskDataset", "DataBundle", "MultiHeadModel", "Trainer", "RunResult",
    "data", "hypergrad", "methods", "models", "partition", "tasks", "experiments", "plot", "widgets",
]

# Everything is imported on first use (PEP 562), so that `python -m auxnb --help` never pays for
# torch; `from auxnb import Trainer` and `auxnb.methods` work as before.
_NAMES = {
    "Task": "tasks", "TaskSet": "tasks", "TaskDataset": "data", "DataBundle": "data",
    "MultiHeadModel": "models", "Trainer": "train", "RunResult": "train",
}
_MODULES = ("data", "hypergrad", "methods", "models", "partition", "tasks", "train", "experiments", "plot", "widgets")


def __getattr__(name: str):
    import importlib

    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'auxnb' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
