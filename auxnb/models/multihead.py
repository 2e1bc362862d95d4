"""Hard parameter sharing: one backbone, one head per task, features and per-task outputs.

The model only computes outputs; it never computes losses, never weights tasks (that is a
method's job) and never moves itself to a device.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["Backbone", "MultiHeadModel", "make_head"]

HEAD_PREFIX = "head:"


@runtime_checkable
class Backbone(Protocol):
    """What auxnb expects of a backbone: ``forward(x) -> [batch, out_features]`` and its blocks.

    ``blocks()`` lists ``(name, module)`` pairs from input to output whose parameters together
    are all the backbone's parameters, each exactly once: they are MAOAL's Block-L "modules"
    (paper §4.3; supplement §3 numbers them from the shallowest, module 0).
    """

    out_features: int

    def blocks(self) -> list[tuple[str, nn.Module]]: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def make_head(in_features: int, out_dim: int, hidden: int | None = None) -> nn.Module:
    """A task head: ``Linear`` (MAOAL supplement §2.1–2.3: "a one-layer head for each task"), or
    ``Linear → ReLU → Linear`` when ``hidden`` is an int (§2.4: "a 2-layer MLP with hidden
    dimension 16" for rating prediction).

    Example:
        >>> make_head(8, 3)
        Linear(in_features=8, out_features=3, bias=True)
        >>> make_head(8, 1, hidden=16)(torch.zeros(2, 8)).shape
        torch.Size([2, 1])
    """
    if in_features < 1 or out_dim < 1:
        raise ValueError(f"make_head needs positive sizes, got in_features={in_features}, out_dim={out_dim}.")
    if hidden is None:
        return nn.Linear(in_features, out_dim)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be None or a positive int, got {hidden!r}.")
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class MultiHeadModel(nn.Module):
    """A shared backbone with one head per task (hard parameter sharing, MAOAL §3 / JTDS §3).

    ``forward(x, tasks)`` returns the backbone features (JTDS feeds them, detached, to its
    schedule; DTG and F-MixUp mix them) and a dict task name → head output, computing only the
    requested heads so that a batch of one input stream (e.g. rotated images) pays only for the
    heads that read it.

    Args:
        backbone: a module mapping inputs to ``[batch, features]``; `blocks` needs it to define
            ``blocks()`` (every auxnb backbone does).
        heads: task name → head module. Names are the keys of the targets dict.

    Example:
        >>> from auxnb.models import MLP
        >>> model = MultiHeadModel(MLP(4, hidden=(8,)), {"main": make_head(8, 3), "aux": make_head(8, 1)})
        >>> features, outputs = model(torch.zeros(2, 4), tasks=["aux"])
        >>> features.shape, list(outputs), outputs["aux"].shape
        (torch.Size([2, 8]), ['aux'], torch.Size([2, 1]))
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}.")
        if not heads:
            raise ValueError("MultiHeadModel needs at least one head (task name -> module).")
        for name, head in heads.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"Head names must be non-empty strings without '.', got {name!r}.")
            if not isinstance(head, nn.Module):
                raise TypeError(f"Head {name!r} must be an nn.Module, got {type(head).__name__}.")
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))

    @classmethod
    def for_tasks(cls, backbone: nn.Module, tasks: Iterable, hidden: int | None = None) -> "MultiHeadModel":
        """One `make_head` per task (objects with ``.name`` and ``.out_dim``, e.g. `auxnb.tasks.Task`).

        Example:
            >>> from auxnb.models import MLP
            >>> from auxnb.tasks import Task
            >>> model = MultiHeadModel.for_tasks(MLP(4, hidden=(8,)), [Task("y", "regression", primary=True)])
            >>> model.task_names
            ['y']
        """
        in_features = getattr(backbone, "out_features", None)
        if not isinstance(in_features, int):
            raise TypeError(
                f"{type(backbone).__name__} has no integer `out_features`; set it to the feature size "
                "or build the heads yourself and call MultiHeadModel(backbone, heads)."
            )
        heads: dict[str, nn.Module] = {}
        for task in tasks:
            if task.name in heads:
                raise ValueError(f"Duplicate task name {task.name!r}; every task needs its own head.")
            heads[task.name] = make_head(in_features, task.out_dim, hidden)
        return cls(backbone, heads)

    @property
    def task_names(self) -> list[str]:
        """Task names in head order."""
        return list(self.heads.keys())

    @property
    def out_features(self) -> int | None:
        """Feature size of the shared backbone (``None`` if the backbone does not declare it)."""
        return getattr(self.backbone, "out_features", None)

    def _select(self, tasks: str | Iterable[str] | None) -> list[str]:
        if tasks is None:
            return self.task_names
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        unknown = [name for name in names if name not in self.heads]
        if unknown:
            raise KeyError(f"Unknown task(s) {unknown}; this model has heads for {self.task_names}.")
        return names

    def head_forward(
        self, features: torch.Tensor, tasks: str | Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Apply the heads of ``tasks`` (all when None) to precomputed ``features``.

        Feature-space methods (F-MixUp, DTG-AuxL's generated samples, paper §3.2) build features
        themselves and need the heads without the backbone.
        """
        out = {}
        for name in self._select(tasks):
            head = self.heads[name]
            weight = next(head.parameters(), None)
            # features made outside autocast from half-precision backbone outputs (DTG, F-MixUp under
            # amp) meet float heads: bring them to the head's precision (under autocast the op recasts)
            x = features.to(weight.dtype) if weight is not None and features.is_floating_point() and features.dtype != weight.dtype else features
            out[name] = head(x)
        return out

    def forward(
        self, x: torch.Tensor, tasks: str | Iterable[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(features, {task: output})`` for the requested tasks (all when None).

        Raises:
            KeyError: a requested task has no head; the message lists the valid names.
        """
        names = self._select(tasks)  # fail before paying for the backbone
        features = self.backbone(x)
        return features, self.head_forward(features, names)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """Block-L modules: the backbone's blocks (input to output), then ``"head:<task>"`` per head.

        Raises:
            TypeError: the backbone does not define ``blocks()``.
        """
        backbone_blocks = getattr(self.backbone, "blocks", None)
        if not callable(backbone_blocks):
            raise TypeError(
                f"Backbone {type(self.backbone).__name__} defines no blocks(); give it a method "
                "blocks() -> [(name, module), ...] covering its parameters, or partition with "
                "auxnb.partition.by_parameter, whole_model or custom instead."
            )
        return list(backbone_blocks()) + [(f"{HEAD_PREFIX}{name}", head) for name, head in self.heads.items()]
