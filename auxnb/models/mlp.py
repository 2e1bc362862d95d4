"""MLP backbone: a small fully connected trunk for tabular inputs and fast CPU examples.

It flattens whatever it is given and declares one block per hidden layer; it never holds task
heads and never moves itself to a device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten → [Linear → activation → Dropout] per hidden layer; features = last hidden layer.

    Not a backbone of the papers' main tables; it keeps the book's CPU chapters and the tests
    fast while obeying the same backbone contract (``out_features``, ``blocks()``).

    Args:
        in_features: size of a flattened input sample (e.g. 64 for 8×8 digits).
        hidden: widths of the hidden layers; at least one.
        activation: a callable returning a fresh activation module (a class such as ``nn.ReLU``).
        dropout: dropout after each activation (0 disables it).

    Example:
        >>> net = MLP(64, hidden=(32, 16))
        >>> net(torch.zeros(2, 1, 8, 8)).shape, [name for name, _ in net.blocks()]
        (torch.Size([2, 16]), ['layer1', 'layer2'])
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) < 1 or in_features < 1:
            raise ValueError(
                f"MLP needs a positive in_features and at least one positive hidden width, "
                f"got in_features={in_features}, hidden={hidden}."
            )
        self.in_features = in_features
        widths = (in_features,) + hidden
        for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            layer: list[nn.Module] = [nn.Linear(fan_in, fan_out), activation()]
            if dropout > 0:
                layer.append(nn.Dropout(dropout))
            self.add_module(f"layer{index}", nn.Sequential(*layer))
        self.num_layers = len(hidden)
        self.out_features = hidden[-1]

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """One block per hidden layer, input to output ("layer1".."layerN")."""
        return [(f"layer{i}", getattr(self, f"layer{i}")) for i in range(1, self.num_layers + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, start_dim=1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP was built for {self.in_features} input values per sample, got {x.shape[1]}; "
                "pass in_features=<flattened sample size>."
            )
        for _, layer in self.blocks():
            x = layer(x)
        return x
