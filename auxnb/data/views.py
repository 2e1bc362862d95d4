"""Derived input streams: callables that turn a primary training batch into an auxiliary one.

A view adds its own target and repeats every original target (the primary label unchanged,
sample ids included); it never alters the primary stream's batch in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from auxnb.data.core import as_generator

__all__ = ["RotationView", "ROTATION_MODES"]

ROTATION_MODES = ("all", "random")


def _repeat(t: Tensor, times: int) -> Tensor:
    return t.repeat(times, *([1] * (t.dim() - 1)))


class RotationView:
    """Rotation prediction (Gidaris et al. 2018) as a Share-Input auxiliary stream.

    Called with a primary batch ``(x [B, C, H, W], targets)`` it returns ``(x_rot,
    targets_rot)`` where ``targets_rot[task]`` is the rotation label k (long, 0..3, meaning
    a counter-clockwise rotation by k * 90 degrees, ``torch.rot90(x, k, dims=(2, 3))``) and
    every original target (``"index"`` included) is repeated to match.

    Args:
        task: name of the rotation task (the key of its label).
        mode: ``"all"``: every image at 0, 90, 180 and 270 degrees (4B samples, ordered
            rotation-major: all images at k=0, then k=1, ...); ``"random"``: one rotation
            per image, drawn from `generator` (or torch's global RNG when None, so the
            Trainer's seed governs it).
        generator: `torch.Generator` or int seed for ``"random"`` mode.

    Example:
        >>> x = torch.tensor([[[[1., 2.], [3., 4.]]]])
        >>> xr, t = RotationView()(x, {"digit": torch.tensor([7]), "index": torch.tensor([0])})
        >>> xr[1, 0].tolist(), t["rotation"].tolist(), t["digit"].tolist()
        ([[2.0, 4.0], [1.0, 3.0]], [0, 1, 2, 3], [7, 7, 7, 7])
    """

    def __init__(self, task: str = "rotation", mode: str = "all", generator: torch.Generator | int | None = None):
        if mode not in ROTATION_MODES:
            raise ValueError(f"Unknown rotation mode {mode!r}; use one of {ROTATION_MODES}.")
        self.task = task
        self.mode = mode
        self.generator = None if generator is None else as_generator(generator)

    @property
    def task_names(self) -> tuple[str, ...]:
        """The targets this view adds."""
        return (self.task,)

    def __repr__(self) -> str:
        return f"RotationView(task={self.task!r}, mode={self.mode!r})"

    def __call__(
        self, x: Tensor, targets: dict[str, Tensor], generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if x.dim() != 4:
            raise ValueError(f"RotationView needs images [B, C, H, W], got shape {tuple(x.shape)}.")
        if x.shape[2] != x.shape[3]:
            # a 90-degree turn swaps H and W; rotated and upright images could not share a batch
            raise ValueError(f"RotationView needs square images, got H={x.shape[2]}, W={x.shape[3]}.")
        if self.task in targets:
            raise ValueError(f"The batch already has a target named {self.task!r}; give the rotation task another name.")
        b = x.shape[0]
        if self.mode == "all":
            x_rot = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
            k_labels = torch.arange(4, device=x.device).repeat_interleave(b)
            out = {name: _repeat(t, 4) for name, t in targets.items()}
        else:
            g = generator or self.generator
            # drawn on the CPU so a CPU generator works with a batch on any device
            k_labels = torch.randint(0, 4, (b,), generator=g).to(x.device)
            x_rot = x.clone()
            for k in range(1, 4):
                sel = k_labels == k
                if sel.any():
                    x_rot[sel] = torch.rot90(x[sel], k, dims=(2, 3))
            out = dict(targets)
        out[self.task] = k_labels
        return x_rot, out
