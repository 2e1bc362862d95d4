"""AutoInt: the self-attentive feature-interaction backbone of the MAOAL recommendation experiments.

Maps per-field categorical ids to a flat vector of interacted field embeddings; it never
clamps or hashes an out-of-range id (that is an error) and never moves itself to a device.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AutoInt", "InteractingLayer"]


class InteractingLayer(nn.Module):
    """One AutoInt interacting layer (Song et al. 2019, §4.3, Eq. 5–8).

    Every field attends to every field of the *same* sample with ``num_heads`` heads of size
    ``embed_dim / num_heads``; the heads are concatenated (Eq. 7) and added to a linear residual
    projection of the input before a ReLU (Eq. 8): ``ReLU(MultiHead(E) + E W_res)``.

    Attention is written out with matmul + softmax rather than `nn.MultiheadAttention`: fused
    attention kernels (flash / memory-efficient SDPA) have no double backward, and bi-level
    methods differentiate through gradients of this layer.

    Args:
        embed_dim: size of each field embedding (input and output).
        num_heads: attention heads; must divide ``embed_dim``.
        dropout: dropout on the attention weights.
        scaled: divide attention logits by sqrt(head size) as in a transformer encoder (MAOAL
            supplement §2.4 calls these blocks "transformer encoder blocks"); ``False`` gives
            AutoInt's plain inner product (Eq. 5).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, scaled: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide embed_dim ({embed_dim}).")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaled = scaled
        # No biases: AutoInt's W_Query, W_Key, W_Value and W_Res are plain matrices (Eq. 5, 6, 8).
        self.query = nn.Linear(embed_dim, embed_dim, bias=False)
        self.key = nn.Linear(embed_dim, embed_dim, bias=False)
        self.value = nn.Linear(embed_dim, embed_dim, bias=False)
        self.residual = nn.Linear(embed_dim, embed_dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, fields, _ = x.shape
        return x.view(batch, fields, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, F, d']

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        logits = q @ k.transpose(-1, -2)  # Eq. 5: ψ(e_m, e_k) = <W_Q e_m, W_K e_k>
        if self.scaled:
            logits = logits / math.sqrt(self.head_dim)
        attention = self.dropout(torch.softmax(logits, dim=-1))  # over fields k of one sample
        heads = (attention @ v).transpose(1, 2).reshape(x.shape)  # Eq. 6–7: concatenated heads
        return F.relu(heads + self.residual(x))  # Eq. 8


class AutoInt(nn.Module):
    """AutoInt backbone (Song et al., CIKM 2019): field embeddings → interacting layers → flatten.

    MAOAL supplement §2.4: "AutoINT, which is composed of 4 transformer encoder blocks with head
    number 4 and embedding dimension 16" — the defaults. Field ``f``'s ids lie in
    ``[0, field_dims[f])``; one embedding table holds all fields, field ``f``'s rows start at
    ``sum(field_dims[:f])``. Features are the final field embeddings flattened to
    ``num_fields * embed_dim`` values (AutoInt §4.4 feeds this concatenation to its output
    layer; here the task heads play that role).

    Args:
        field_dims: number of distinct ids of each field (e.g. users, items, categories).
        embed_dim: embedding size d (paper: 16).
        num_blocks: interacting layers (paper: 4).
        num_heads: heads per layer (paper: 4).
        dropout: dropout on attention weights.

    Raises:
        ValueError: in forward, ids not of shape [batch, num_fields], not integers, or outside
            their field's range.

    Example:
        >>> net = AutoInt([5, 3])
        >>> net(torch.tensor([[4, 2], [0, 0]])).shape, net.out_features
        (torch.Size([2, 32]), 32)
        >>> [name for name, _ in net.blocks()]
        ['embedding', 'block1', 'block2', 'block3', 'block4']
    """

    def __init__(
        self,
        field_dims: Sequence[int],
        embed_dim: int = 16,
        num_blocks: int = 4,
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        field_dims = tuple(int(d) for d in field_dims)
        if not field_dims or min(field_dims) < 1:
            raise ValueError(f"field_dims must be a non-empty list of positive sizes, got {field_dims}.")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        self.field_dims = field_dims
        self.num_fields = len(field_dims)
        self.embed_dim = embed_dim
        self.embedding = nn.Embedding(sum(field_dims), embed_dim)
        nn.init.xavier_uniform_(self.embedding.weight)
        offsets = torch.tensor((0,) + field_dims[:-1]).cumsum(0)
        # Not persistent: derived from field_dims, so state dicts hold only learned weights.
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("field_sizes", torch.tensor(field_dims), persistent=False)
        self.interacting = nn.ModuleList(InteractingLayer(embed_dim, num_heads, dropout) for _ in range(num_blocks))
        self.out_features = self.num_fields * embed_dim

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """Block-L modules: "embedding", then "block1".."blockN" (one per interacting layer)."""
        return [("embedding", self.embedding)] + [
            (f"block{i}", layer) for i, layer in enumerate(self.interacting, start=1)
        ]

    def _check_ids(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.num_fields:
            raise ValueError(
                f"AutoInt expects ids of shape [batch, {self.num_fields}] (one id per field), got {tuple(x.shape)}."
            )
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"AutoInt expects integer ids (torch.long), got {x.dtype}.")
        bad = (x < 0) | (x >= self.field_sizes)
        if bool(bad.any()):
            row, field = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"AutoInt: id {int(x[row, field])} of field {field} (sample {row}) is out of range "
                f"[0, {self.field_dims[field]}); field_dims={list(self.field_dims)}. "
                "Re-index the ids or enlarge field_dims."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_ids(x)
        e = self.embedding(x.long() + self.offsets)  # [B, F, d]
        for layer in self.interacting:
            e = layer(e)
        return torch.flatten(e, start_dim=1)
