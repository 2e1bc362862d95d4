"""N-JTDS (Chen et al., ICML 2022, App. A.5): one free weight per (training sample, task), learned bi-level.

Weights are looked up by the samples' stable ids; they never depend on features or losses, and
in a lower step they are constants (first-order).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LossTerms, SetupInfo
from .jtds import ScheduledMethod, _Block
from .upper import UpperLevel

__all__ = ["NJTDS"]


class NJTDS(ScheduledMethod):
    """N-JTDS: the naive joint schedule, w_ik = softplus(β_ik) for every training sample i and task k (Algorithm 2).

    φ holds one table per input stream, ``[number of ids, tasks on the stream]``, indexed by the
    sample's stable id (`LossTerms.index`): m·(n+1) numbers, the cost JTDS's scheduler avoids.
    Rotated copies of an image share its id and so its weight for the rotation task; a
    Different-Input stream (e.g. MNIST) has its own id space and its own table. softplus keeps the
    weights non-negative without a projection (SPEC-NOTES); all start at `init_weight`. The lower
    loss and the trace are `ScheduledMethod`'s; only the rows of the upper step's training batch
    get a hypergradient (SGD momentum keeps moving the others, as with any dense φ).

    Number of ids per stream: `num_ids` when given (an int for every stream, or stream -> int);
    otherwise the primary stream and its views use the bundle's ``n_source`` and a Different-Input
    stream the size of its dataset (``bundle_info["sizes"]["aux_train"]``).

    Constructor default: JTDS's faithful cadence (SGD 1e-2 with momentum 0.9 on φ, K = 3,
    M = 20, clip 10, ``hyper_lr="lower"``). As the authors ran it: `NJTDS.paper()`
    (``UpperLevel.authors("n-jtds")``: no leading η, weight decay 5e-3 on φ); the paper's text:
    `NJTDS.paper_text()`.

    Args:
        init_weight: the initial weight of every (sample, task) pair (> 0).
        num_ids: see above.
        probe_size, forward_mode: see `ScheduledMethod`.
        upper, upper_keywords: the `UpperLevel` and its fields as keywords (see `BilevelMethod`).

    Example:
        >>> NJTDS(init_weight=0.5).init_weight
        0.5
    """

    name = "n-jtds"
    #: The constructor's default, JTDS's faithful cadence and φ optimiser with the series as auxnb writes it.
    default_upper = UpperLevel(lower_steps=20, terms=3, hyper_lr="lower", upper_optimizer="sgd", upper_lr=1e-2,
                               upper_momentum=0.9, clip=10.0)

    def __init__(
        self,
        *,
        init_weight: float = 1.0,
        num_ids: int | Mapping[str, int] | None = None,
        probe_size: int | None = 64,
        forward_mode: bool = True,
        upper: UpperLevel | Mapping[str, Any] | None = None,
        **upper_keywords: Any,
    ):
        super().__init__(probe_size=probe_size, forward_mode=forward_mode, upper=upper, **upper_keywords)
        if not (isinstance(init_weight, (int, float)) and math.isfinite(init_weight) and init_weight > 0):
            raise ValueError(f"init_weight must be a finite number > 0 (softplus is positive), got {init_weight!r}.")
        self.init_weight = float(init_weight)
        self.num_ids = dict(num_ids) if isinstance(num_ids, Mapping) else num_ids

    @classmethod
    def paper(cls, **overrides: Any) -> "NJTDS":
        """N-JTDS as the authors ran it (``UpperLevel.authors("n-jtds")``); `overrides` win."""
        return cls(**{"upper": UpperLevel.authors("n-jtds"), **overrides})

    @classmethod
    def paper_text(cls, **overrides: Any) -> "NJTDS":
        """N-JTDS with JTDS's paper text (``UpperLevel.paper_text("n-jtds")``: η = 1, no clipping)."""
        return cls(**{"upper": UpperLevel.paper_text("n-jtds"), **overrides})

    def _ids_for(self, block: _Block) -> int:
        if isinstance(self.num_ids, int):
            return self.num_ids
        if isinstance(self.num_ids, dict) and block.stream in self.num_ids:
            return int(self.num_ids[block.stream])
        info = self._bundle_info
        if block.shares_ids and info.get("n_source") is not None:
            n = int(info["n_source"])
            corrupted = info.get("corrupted")
            return max(n, len(corrupted)) if corrupted is not None else n
        aux = (info.get("sizes") or {}).get("aux_train") or {}
        if not block.shares_ids and block.stream in aux:
            return int(aux[block.stream])
        raise ValueError(
            f"N-JTDS cannot tell how many sample ids stream {block.stream!r} has; pass "
            f"num_ids={{'{block.stream}': <max id + 1>}} (or one int for every stream)."
        )

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        raw = math.log(math.expm1(self.init_weight))  # softplus(raw) = init_weight
        self.tables = nn.ParameterList(
            [nn.Parameter(torch.full((self._ids_for(b), len(b.names)), raw, device=self._device)) for b in self._blocks]
        )
        self._table_of = {b.stream: i for i, b in enumerate(self._blocks)}

    def hparams(self) -> list[nn.Parameter]:
        """φ: one ``[ids, tasks]`` table per input stream."""
        return list(self.tables)

    def stream_weights(self, block: _Block, cols: Tensor, losses: Tensor, mask: Tensor, terms: LossTerms) -> Tensor:
        ids = terms.index.get(block.stream)
        if ids is None:
            raise KeyError(
                f"N-JTDS needs the sample ids of stream {block.stream!r} (LossTerms.index); "
                "batches from auxnb.data carry them under targets['index']."
            )
        table = self.tables[self._table_of[block.stream]]
        ids = ids.to(table.device).long()
        if len(ids) and (int(ids.max()) >= table.shape[0] or int(ids.min()) < 0):
            raise IndexError(
                f"Sample id {int(ids.max())} on stream {block.stream!r} is outside N-JTDS's table of "
                f"{table.shape[0]} ids; pass num_ids= with the largest id + 1."
            )
        rows = table[ids]  # [B, T_block]
        if len(cols) != len(block.names):
            local = {int(c): j for j, c in enumerate(block.cols.tolist())}
            rows = rows[:, torch.tensor([local[int(c)] for c in cols.tolist()], device=rows.device)]
        return F.softplus(rows)

    def weights_of(self, ids: Tensor | np.ndarray, stream: str = "primary") -> np.ndarray:
        """Current weights of samples `ids` on `stream`: ``[len(ids), tasks on the stream]``."""
        table = self.tables[self._table_of[stream]]
        return F.softplus(table.detach()[torch.as_tensor(np.asarray(ids), device=table.device).long()]).cpu().numpy()
