"""ConvNet4: the 4-layer convolutional backbone of the MAOAL CIFAR experiments (supplement §2.3).

It maps images to flat feature vectors and declares its blocks; it never holds task heads
and never moves itself to a device.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["ConvNet4"]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or (height, width), got {size!r}.")
    return size  # type: ignore[return-value]


class ConvNet4(nn.Module):
    """Four [Conv3×3 stride 1 padding 1 → BatchNorm2d → ReLU] layers with 2×2 max-pools.

    MAOAL supplement §2.3: "Each layer is composed of the {Conv2d, BatchNormalization, ReLU}
    components. The number of output channels for all the layers is set to 32, and the kernel
    size for the Conv2d is 3×3 and the stride is 1. After the 2nd and the 4th layer, there is a
    2×2 Maxpooling layer. The head for each task is a linear model."

    The paper does not say how the feature map reaches the linear head; the default flattens it
    (every spatial position keeps its own weights, the usual "4-layer ConvNet" reading). Because
    a flattened size depends on the image size, ``input_size`` fixes it at construction:
    32 (CIFAR) → 32·8·8 = 2048 features, 28 (MNIST) → 32·7·7 = 1568, 8 (sklearn digits) →
    32·2·2 = 128. ``global_pool=True`` instead averages each channel over space (``channels``
    features, any image size), an option for inputs whose size varies.

    Args:
        in_channels: image channels (3 for RGB, 1 for grey digits).
        channels: output channels of every conv layer (paper: 32).
        pool_after: 1-based indices of the layers followed by a 2×2 max-pool (paper: (2, 4)).
        global_pool: average-pool the final map to 1×1 instead of flattening it.
        input_size: image size (int or (height, width)) the flattened feature size is computed
            for; ignored when ``global_pool`` is True.

    Example:
        >>> net = ConvNet4(in_channels=1, input_size=8)
        >>> net.out_features, net(torch.zeros(2, 1, 8, 8)).shape
        (128, torch.Size([2, 128]))
        >>> [name for name, _ in net.blocks()]
        ['conv1', 'conv2', 'conv3', 'conv4']
    """

    num_layers = 4

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 32,
        pool_after: Sequence[int] = (2, 4),
        global_pool: bool = False,
        input_size: int | Sequence[int] = 32,
    ) -> None:
        super().__init__()
        pool_after = tuple(int(i) for i in pool_after)
        bad = [i for i in pool_after if not 1 <= i <= self.num_layers]
        if bad:
            raise ValueError(f"pool_after holds layer indices in 1..{self.num_layers}; got {bad}.")
        if in_channels < 1 or channels < 1:
            raise ValueError(f"in_channels and channels must be positive, got {in_channels}, {channels}.")
        self.pool_after = pool_after
        self.global_pool = bool(global_pool)
        self.input_size = _pair(input_size)

        height, width = self.input_size
        for index in range(1, self.num_layers + 1):
            layer: list[nn.Module] = [
                nn.Conv2d(in_channels if index == 1 else channels, channels, kernel_size=3, stride=1, padding=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
            if index in pool_after:
                layer.append(nn.MaxPool2d(kernel_size=2, stride=2))
                height, width = height // 2, width // 2
            # The pool sits inside its layer's block so that the blocks chain input → features.
            self.add_module(f"conv{index}", nn.Sequential(*layer))

        if self.global_pool:
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
            self.out_features = channels
        else:
            if height < 1 or width < 1:
                raise ValueError(
                    f"input_size {self.input_size} is too small for {len(pool_after)} 2×2 max-pools; "
                    "use a larger input_size or global_pool=True."
                )
            self.pool = nn.Identity()
            self.out_features = channels * height * width
        self._final_hw = (height, width)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The four conv layers, input to output ("conv1".."conv4"); each holds its BN and pool."""
        return [(f"conv{i}", getattr(self, f"conv{i}")) for i in range(1, self.num_layers + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image_hw = tuple(x.shape[-2:])
        for _, layer in self.blocks():
            x = layer(x)
        x = self.pool(x)
        if not self.global_pool and tuple(x.shape[-2:]) != self._final_hw:
            raise ValueError(
                f"ConvNet4 was built for {self.input_size[0]}×{self.input_size[1]} images "
                f"(out_features={self.out_features}) but got {image_hw[0]}×{image_hw[1]} images; "
                f"pass input_size={image_hw} or global_pool=True."
            )
        return torch.flatten(x, start_dim=1)
