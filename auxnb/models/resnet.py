"""ResNet18 / ResNet50 backbones (torchvision's networks without the classifier), optionally with a CIFAR stem.

Pretrained weights come only from a local state-dict file: this module never downloads
anything and never moves a model to a device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

__all__ = ["ResNet", "ResNet18", "ResNet50"]


class ResNet(nn.Module):
    """A torchvision ResNet trunk: stem, ``layer1``..``layer4``, global average pool → features.

    Parameter names are torchvision's (``conv1.weight``, ``layer1.0.bn1.bias``, ...) so that a
    torchvision state dict loads as is; its ``fc.*`` entries are ignored because the task heads
    live in `auxnb.models.MultiHeadModel`. MAOAL (supplement §2.1–2.2) fine-tunes a pretrained
    ResNet18 on CUB and trains one from scratch on Pet; its Block-L modules are the stem and the
    four residual stages, which is what `blocks` returns.

    Args:
        arch: a torchvision constructor (``torchvision.models.resnet18`` / ``resnet50``).
        cifar_stem: replace the 7×7 stride-2 conv by a 3×3 stride-1 padding-1 conv and drop the
            max-pool, the usual stem for 32×32 images (a 7×7/2 conv + pool would shrink 32×32 to
            8×8 before the first residual stage).
        pretrained: ``None`` or a path to a local state-dict file (e.g. torchvision's
            ``resnet18-f37072fd.pth`` saved beforehand). Loaded on the CPU with
            ``weights_only=True``; never downloaded.
        in_channels: image channels; other than 3 replaces ``conv1``.
    """

    def __init__(
        self,
        arch: Callable[..., torchvision.models.ResNet],
        cifar_stem: bool = False,
        pretrained: str | os.PathLike | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        trunk = arch(weights=None)  # weights=None: torchvision must never reach the network
        self.cifar_stem = bool(cifar_stem)
        if self.cifar_stem or in_channels != 3:
            kernel, stride, padding = (3, 1, 1) if self.cifar_stem else (7, 2, 3)
            trunk.conv1 = nn.Conv2d(in_channels, 64, kernel_size=kernel, stride=stride, padding=padding, bias=False)
            # Same initialisation torchvision gives its own conv layers.
            nn.init.kaiming_normal_(trunk.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1 = trunk.conv1
        self.bn1 = trunk.bn1
        self.relu = trunk.relu
        self.maxpool = nn.Identity() if self.cifar_stem else trunk.maxpool
        self.layer1 = trunk.layer1
        self.layer2 = trunk.layer2
        self.layer3 = trunk.layer3
        self.layer4 = trunk.layer4
        self.avgpool = trunk.avgpool
        self.out_features: int = trunk.fc.in_features  # 512 (ResNet18) or 2048 (ResNet50)
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def load_pretrained(self, path: str | os.PathLike) -> None:
        """Load a local state dict (torchvision or auxnb keys); ``fc.*`` entries are dropped.

        Raises:
            FileNotFoundError: ``path`` does not exist (nothing is downloaded instead).
            ValueError: the file's tensors do not fit this network (e.g. ImageNet weights with a
                CIFAR stem, or a ResNet50 file for a ResNet18).
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Pretrained weights file not found: {str(path)!r}. auxnb never downloads weights; "
                "save a state dict there first (e.g. torch.save(torchvision.models.resnet18("
                "weights='DEFAULT').state_dict(), path) on a machine with internet)."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # checkpoints that wrap the weights
        if not isinstance(state, dict):
            raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(state).__name__}).")
        state = {key: value for key, value in state.items() if not key.startswith("fc.")}
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"Weights in {str(path)!r} do not fit {type(self).__name__}"
                f"(cifar_stem={self.cifar_stem}): {error}"
            ) from None

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """Block-L modules, input to output: "stem" (conv1 + bn1), then "layer1".."layer4"."""
        # A fresh container over the existing conv1/bn1: same Parameter objects, no copies.
        stem = nn.ModuleList([self.conv1, self.bn1])
        return [("stem", stem)] + [(f"layer{i}", getattr(self, f"layer{i}")) for i in range(1, 5)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), start_dim=1)


class ResNet18(ResNet):
    """torchvision ResNet18 trunk, 512 features (MAOAL supplement §2.1–2.2: CUB and Pet).

    Example:
        >>> net = ResNet18(cifar_stem=True)
        >>> net(torch.zeros(2, 3, 32, 32)).shape, [name for name, _ in net.blocks()]
        (torch.Size([2, 512]), ['stem', 'layer1', 'layer2', 'layer3', 'layer4'])
    """

    def __init__(
        self, cifar_stem: bool = False, pretrained: str | os.PathLike | None = None, in_channels: int = 3
    ) -> None:
        super().__init__(torchvision.models.resnet18, cifar_stem, pretrained, in_channels)


class ResNet50(ResNet):
    """torchvision ResNet50 trunk, 2048 features (a larger backbone for the same settings)."""

    def __init__(
        self, cifar_stem: bool = False, pretrained: str | os.PathLike | None = None, in_channels: int = 3
    ) -> None:
        super().__init__(torchvision.models.resnet50, cifar_stem, pretrained, in_channels)
