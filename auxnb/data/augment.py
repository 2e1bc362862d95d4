"""Batch-level image transforms: uint8 images -> float, random crop with padding, flip, Z-score.

They run on whole batches on the batch's device (what `DataBundle.transform` / `eval_transform`
hold); they never change a batch in place and draw their randomness from the given generator or,
by default, torch's global RNG (which the Trainer seeds), so a seed fixes every crop.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ImageTransform", "channel_stats"]


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``[N, C, H, W]`` images scaled to [0, 1].

    uint8 images are divided by 255; float images are taken as they are. Computed in float64
    over chunks, so 50,000 CIFAR images never need a float copy of the whole set.

    Example:
        >>> x = torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8)
        >>> channel_stats(x)
        ((0.75,), (0.4330127018922193,))
    """
    if images.dim() != 4:
        raise ValueError(f"channel_stats needs images [N, C, H, W], got shape {tuple(images.shape)}.")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        x = _to_unit(images[start : start + chunk]).double()
        total += x.sum((0, 2, 3))
        total_sq += (x * x).sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        raise ValueError("channel_stats needs at least one image.")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _to_unit(x: Tensor) -> Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


class ImageTransform:
    """Random crop (after zero padding) or centre crop, horizontal flip, then Z-score, on a batch.

    ``ImageTransform(crop=32, pad=4)`` is the MAOAL CIFAR training transform (supplement §2.3:
    "randomly cropped to size 32 with padding 4, then normalized with the Z-score");
    ``ImageTransform(crop=224, flip=True)`` on 256×256 images the CUB / Pet one (§2.1: random
    224 crop, horizontal flip, Z-score); ``ImageTransform(crop=224, random=False)`` the test one
    (centre crop + Z-score).

    Args:
        mean, std: per-channel statistics of images in [0, 1] (uint8 inputs are divided by 255).
        crop: output side (square); ``None`` keeps the size.
        pad: zeros added on every side before a random crop.
        flip: flip each image horizontally with probability 1/2 (training only).
        random: random crop offsets and flips (training); ``False``: centre crop, no flip.
        generator: CPU `torch.Generator` for offsets and flips; ``None`` uses torch's global RNG.

    Example:
        >>> x = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4)
        >>> ImageTransform(mean=(0.0,), std=(1 / 255,), crop=2, random=False)(x)[0, 0].tolist()
        [[5.0, 6.0], [9.0, 10.0]]
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop: int | None = None,
        pad: int = 0,
        flip: bool = False,
        random: bool = True,
        generator: torch.Generator | None = None,
    ):
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}.")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive in every channel, got {tuple(std)}.")
        if crop is not None and crop < 1:
            raise ValueError(f"crop must be a positive size, got {crop}.")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}.")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop, self.pad, self.flip, self.random = crop, int(pad), bool(flip), bool(random)
        self.generator = generator

    def __repr__(self) -> str:
        return (
            f"ImageTransform(crop={self.crop}, pad={self.pad}, flip={self.flip}, random={self.random}, "
            f"mean={tuple(round(m, 4) for m in self.mean)}, std={tuple(round(s, 4) for s in self.std)})"
        )

    def eval(self) -> "ImageTransform":
        """The matching test-time transform: centre crop of the same size, no flip, same Z-score."""
        return ImageTransform(self.mean, self.std, crop=self.crop, random=False)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"ImageTransform needs images [B, C, H, W], got shape {tuple(x.shape)}.")
        if x.shape[1] != len(self.mean):
            raise ValueError(f"Images have {x.shape[1]} channels but the Z-score has {len(self.mean)}.")
        x = _to_unit(x)
        b, _, h, w = x.shape
        if self.crop is not None:
            if self.random:
                if self.pad:
                    x = F.pad(x, (self.pad,) * 4)
                    h, w = h + 2 * self.pad, w + 2 * self.pad
                if self.crop > h or self.crop > w:
                    raise ValueError(f"Cannot crop {self.crop}×{self.crop} from images of {h}×{w} (pad {self.pad}).")
                top = torch.randint(0, h - self.crop + 1, (b,), generator=self.generator)
                left = torch.randint(0, w - self.crop + 1, (b,), generator=self.generator)
                rng = torch.arange(self.crop)
                rows = (top[:, None] + rng).to(x.device)  # [B, crop]
                cols = (left[:, None] + rng).to(x.device)
                batch = torch.arange(b, device=x.device)[:, None, None]
                # advanced indexing gathers every image's own window: [B, crop, crop, C]
                x = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
            else:
                if self.crop > h or self.crop > w:
                    raise ValueError(f"Cannot crop {self.crop}×{self.crop} from images of {h}×{w}.")
                top, left = (h - self.crop) // 2, (w - self.crop) // 2
                x = x[:, :, top : top + self.crop, left : left + self.crop]
        if self.flip and self.random:
            flip = (torch.rand(b, generator=self.generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[None, :, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[None, :, None, None]
        return ((x - mean) / std).contiguous()
