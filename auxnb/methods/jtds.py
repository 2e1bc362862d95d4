"""JTDS (Chen et al., ICML 2022): per-(sample, task) weights w_ik from a small scheduler, learned bi-level.

The scheduler reads only detached features and detached losses, and in a lower step its weights
are constants (first-order); it never touches θ, model buffers, `.grad` or the optimisers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import PRIMARY_STREAM, TaskSet
from .base import LossTerms, SetupInfo
from ..hypergrad import HypergradWarning
from .bilevel import BilevelMethod, forward_tangents
from .guard import NOT_GIVEN, legacy_fallback
from .upper import UpperLevel

__all__ = ["JTDS", "ScheduledMethod", "zscore", "weight_auc", "effective_sample_size", "VARIANTS", "NORMALIZE", "FEATURE_NORM",
           "SIGMA1", "PAPER_CONFIG", "PAPER_TEXT_CONFIG"]

#: Paper Table 4's variants: the full scheduler and its four ablations.
VARIANTS = ("full", "only-task", "no-loss", "no-feature", "no-aux")
#: How the sample part of w is scaled (``"none"`` is the paper's; see `JTDS`).
NORMALIZE = ("none", "batch_mean", "softmax")
#: How the backbone feature c is scaled before the prototype score Pᵀc (``"none"`` is the paper's;
#: ``"l2"``: c/‖c‖₂, so the score does not depend on the feature's scale or dimension; see `JTDS`).
FEATURE_NORM = ("none", "l2")
#: The published configuration (App. A.4 and the authors' code, `UpperLevel.authors("jtds")`) as
#: keywords, used by `JTDS.paper`: η = the lower lr in the series and no leading η, 3 matvecs,
#: clipping at 10, SGD 1e-2 momentum 0.9 with weight decay 5e-5 on φ, M = 20.
PAPER_CONFIG: dict[str, Any] = {"normalize": "none", "feature_norm": "none", **UpperLevel.authors("jtds").to_dict()}
#: The paper's text (Eq. 8–9: η = 1; A.4), `UpperLevel.paper_text("jtds")`, used by `JTDS.paper_text`.
PAPER_TEXT_CONFIG: dict[str, Any] = {"normalize": "none", "feature_norm": "none", **UpperLevel.paper_text("jtds").to_dict()}
#: Choices of σ1, the non-negative activation of the task and feature terms.
SIGMA1: dict[str, Callable[[Tensor], Tensor]] = {"softplus": F.softplus, "sigmoid": torch.sigmoid, "exp": torch.exp}
#: where every task's α starts (σ1(α₀) = softplus(1) ≈ 1.31); with ``pin_primary`` the primary's stays there
ALPHA_INIT = 1.0


def zscore(losses: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-column z-score of ``losses [B, T]`` over the entries where ``mask`` is True.

    ``(l − mean) / (std + eps)`` with the population std (divide by the count), so a column with
    a single labelled entry gives 0, never NaN; masked entries take no part in the mean or the
    std and come out as 0.

    Example:
        >>> l = torch.tensor([[1.0, 5.0], [3.0, 0.0]])
        >>> m = torch.tensor([[True, True], [True, False]])
        >>> [[round(v, 4) for v in row] for row in zscore(l, m).tolist()]
        [[-1.0, 0.0], [1.0, 0.0]]
    """
    m = mask.to(losses.dtype)
    count = m.sum(0).clamp_min(1.0)
    mean = (losses * m).sum(0) / count
    centred = (losses - mean) * m
    std = torch.sqrt((centred**2).sum(0) / count)
    return torch.where(mask, centred / (std + eps), torch.zeros_like(centred))


def weight_auc(weights: Tensor | np.ndarray, corrupted: Tensor | np.ndarray) -> float:
    """The probability that a random clean sample weighs more than a random corrupted one (ties ½).

    The area under the ROC curve of the weight as a detector of clean labels: 1 = every clean sample
    outweighs every corrupted one, 0.5 = the weights do not tell them apart, < 0.5 = the corrupted
    samples are favoured. NaN when either group is empty.

    Example:
        >>> weight_auc([0.9, 0.8, 0.1, 0.8], [False, False, True, True])
        0.875
    """
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    flags = torch.as_tensor(np.asarray(corrupted, dtype=bool))
    clean, bad = w[~flags], w[flags]
    if len(clean) == 0 or len(bad) == 0:
        return math.nan
    diff = clean[:, None] - bad[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def effective_sample_size(weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """(Σw)² / (n·Σw²) per column of ``weights [B, T]`` over the entries where `mask` is True.

    1 when every weight is equal, 1/n when one sample holds all the weight (Kish's effective sample
    size as a fraction of the batch).

    Example:
        >>> effective_sample_size(torch.tensor([[1.0, 1.0], [1.0, 0.0]])).tolist()
        [1.0, 0.5]
    """
    m = torch.ones_like(weights, dtype=torch.bool) if mask is None else mask
    w = weights * m.to(weights.dtype)
    n = m.sum(0).to(weights.dtype).clamp_min(1.0)
    return w.sum(0) ** 2 / (n * (w**2).sum(0)).clamp_min(torch.finfo(weights.dtype).tiny)


@dataclass(frozen=True)
class _Block:
    """The tasks that read one input stream: their names and positions in the method's task order."""

    stream: str
    names: tuple[str, ...]
    cols: Tensor  # long [T], positions in the method's task order
    shares_ids: bool  # the stream's sample ids are primary-dataset ids (primary stream or a view)


class ScheduledMethod(BilevelMethod):
    """Base of JTDS and N-JTDS: a lower loss with one weight per (sample, task) (JTDS Eq. 3).

    Lower objective, for the tasks grouped by input stream (the rotation stream has 4B samples,
    a Different-Input stream its own batch)::

        L_t = Σ_k (1 / n_k) Σ_{i labelled for k} w_ik · l_ik,   n_k = max(1, #labelled of k in the batch)

    i.e. the paper's Σ_k Σ_i w_ik l_ik (Eq. 3) with each task's sum divided by its number of
    labelled samples in the batch (what the authors' code does: sum over tasks, mean over the
    batch), so the batch size does not rescale the learning rate and a task with few labels
    (semi-supervised primary) is not drowned. The direction is its gradient with w detached when
    ``create_graph=False`` (Eq. 6) and attached to φ for the upper step. Losses of every task on a
    stream are stacked to ``[B, T]`` and weighted with one batched expression; the only Python loop
    is over streams.

    Trace (recorded at each evaluation): ``tasks`` (task order), ``batch_mean_weight`` (mean w per
    task over the last lower batch's labelled samples), ``batch_ess`` (per task, the last lower
    batch's effective sample size (Σw)²/(nΣw²), `effective_sample_size`: 1 = equal weights),
    the per-batch noise statistics of `noise_trace` when the bundle says which labels were
    corrupted (``batch_weight_corrupted`` / ``_clean`` / ``_ratio`` / ``_auc``), ``weight_auc`` (the
    probes' `weight_auc`), ``probe_ids`` / ``probe_weights``
    ``[P, K]`` / ``probe_corrupted``, and ``weight_clean`` / ``weight_corrupted`` (mean primary
    weight of the clean and corrupted probes when the bundle says which labels were corrupted).
    The probe set is the first `probe_size` distinct training ids the lower steps see on the
    primary stream (a uniform draw fixed by the run's seed, as the paper's "randomly sample 64
    training images"; ``None``: every training id); a probe's weight for task k is the one used
    in the last lower step that saw it (mean over its copies, e.g. four rotations), NaN until then
    or where the task's stream has its own ids (Different-Input datasets).

    Args:
        probe_size: number of probe samples (0: none; None: all).
        forward_mode: the upper step's last product uᵀ∂g/∂φ by one forward-mode pass
            (`hparam_product`; default since issue 22's cost work) instead of a double backward
            through g's graph: the same hypergradient up to rounding, faster. Runs recorded before
            it (``benchmarks/results`` up to ``methods_learn.md`` §13) used the double backward;
            ``forward_mode=False`` repeats them bit for bit.
        upper, upper_keywords: the upper level (see `BilevelMethod`).
    """

    name = "scheduled"

    def __init__(self, *, probe_size: int | None = 64, forward_mode: bool = True,
                 upper: UpperLevel | Mapping[str, Any] | None = None, **upper_keywords: Any):
        super().__init__(upper=upper, **upper_keywords)
        if probe_size is not None and (isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 0):
            raise ValueError(f"probe_size must be an int >= 0 or None (all training samples), got {probe_size!r}.")
        if not isinstance(forward_mode, bool):
            raise TypeError(f"forward_mode must be True or False, got {forward_mode!r}.")
        self.probe_size = probe_size
        self.forward_mode = forward_mode

    # -- what subclasses provide -------------------------------------------------
    def stream_weights(self, block: _Block, cols: Tensor, losses: Tensor, mask: Tensor, terms: LossTerms) -> Tensor:
        """w ``[B, T]`` for the tasks ``cols`` of `block` (``losses`` detached, ``mask`` ``[B, T]``)."""
        raise NotImplementedError

    def scheduler_trace(self) -> dict[str, Any]:
        """The scheduler's own parameters for the trace."""
        return {}

    # -- set-up ---------------------------------------------------------------------
    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        self._upper_opt = None  # set-up may run twice (Trainer.fit): never keep an optimiser of old φ
        self._device = torch.device(info.device)
        self._bundle_info: Mapping[str, Any] = info.extra.get("bundle_info") or {}
        wanted = set(self.task_names(info.tasks))
        self._names = [t.name for t in info.tasks if t.name in wanted]
        self._position = {name: k for k, name in enumerate(self._names)}
        self._primary_col = self._position[info.tasks.primary.name]
        views = (self._bundle_info.get("sizes") or {}).get("views")
        aux_train = (self._bundle_info.get("sizes") or {}).get("aux_train") or {}
        blocks = []
        for stream in info.tasks.streams:
            names = tuple(t.name for t in info.tasks.on_stream(stream) if t.name in wanted)
            if not names:
                continue
            if stream == PRIMARY_STREAM:
                shares = True
            elif views is not None:
                shares = stream in views
            else:  # no bundle information (a hand-made set-up): only Different-Input streams have own ids
                shares = stream not in aux_train
            cols = torch.tensor([self._position[n] for n in names], dtype=torch.long, device=self._device)
            blocks.append(_Block(stream, names, cols, shares))
        self._blocks = blocks
        k = len(self._names)
        self._probe_ids = torch.empty(0, dtype=torch.long, device=self._device)
        self._probe_sorted = self._probe_ids
        self._probe_order = self._probe_ids
        self._probe_weights = torch.empty(0, k, device=self._device)
        self._batch_mean = torch.full((k,), math.nan, device=self._device)
        self._batch_ess = torch.full((k,), math.nan, device=self._device)
        corrupted = self._bundle_info.get("corrupted")
        self._corrupted = None if corrupted is None else torch.as_tensor(corrupted).to(self._device, torch.bool)
        # per-batch noise statistics since the last trace: Σw and count of corrupted / clean primary
        # samples, Σ batch AUC and number of batches; `_noise_last` repeats the last window's values
        self._noise_acc = torch.zeros(6, dtype=torch.float64, device=self._device)
        self._noise_last: dict[str, float] = {}

    # -- the weighted loss -----------------------------------------------------------
    def _stack(self, terms: LossTerms, block: _Block) -> tuple[Tensor, Tensor, Tensor, tuple[str, ...]] | None:
        losses = terms.losses
        names = block.names
        if not all(n in losses for n in names):
            names = tuple(n for n in names if n in losses)
            if not names:
                return None
        cols = block.cols if names is block.names else torch.tensor(
            [self._position[n] for n in names], dtype=torch.long, device=self._device
        )
        # `LossTerms.stacked`: torch.stack's values; one node in the upper step's second-order graph
        # instead of one select per task (each filling a [B, T] zero tensor: T² work with 312 tasks),
        # and the binary tasks' losses computed together (CUB's 312 attributes) taken whole
        loss, mask = terms.stacked(names)
        return loss, mask, cols, names

    def _objective(self, terms: LossTerms, *, attach: bool, record: bool,
                   values: Mapping[str, Tensor | None] | None = None) -> Tensor:
        # `values` (stream -> [B, T]) replaces each block's losses in the weighted sum, the weights
        # still read the losses: Σ w(φ)·s with s = ∇θl·u gives uᵀ∂g/∂φ (`hparam_product`)
        total: Tensor | None = None
        for block in self._blocks:
            stacked = self._stack(terms, block)
            if stacked is None:
                continue
            loss, mask, cols, _ = stacked
            if attach:
                w = self.stream_weights(block, cols, loss.detach(), mask, terms)
            else:
                with torch.no_grad():
                    w = self.stream_weights(block, cols, loss.detach(), mask, terms)
            m = mask.to(loss.dtype)
            if values is not None:
                s = values.get(block.stream)
                loss = torch.zeros_like(loss) if s is None else s.to(loss.dtype)
            part = ((w * loss * m).sum(0) / m.sum(0).clamp_min(1.0)).sum()
            total = part if total is None else total + part
            if record:
                self._record(block, cols, w.detach(), mask, terms)
        if total is None:
            raise ValueError(f"The batch holds none of {type(self).__name__}'s tasks {self._names}.")
        return total

    def objective(self, terms: LossTerms) -> Tensor:
        """L_t with the weights attached to φ (see the class docstring for the normalisation)."""
        return self._objective(terms, attach=True, record=False)

    def direction(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        """Σ_k (1/n_k) Σ_i w_ik ∇l_ik (JTDS Eq. 6): w detached unless ``create_graph`` (upper step)."""
        loss = self._objective(terms, attach=create_graph, record=not create_graph)
        grads = torch.autograd.grad(self.scaled(loss), list(params), create_graph=create_graph, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))

    def hparam_product(self, model: nn.Module, context: Any, batch: Any, terms: LossTerms, params: Sequence[Tensor],
                       rng: Any) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...] | None] | None:
        """uᵀ ∂g/∂φ by one forward-mode pass instead of a double backward (`forward_mode`).

        φ enters g = ∇θ Σ_k (1/n_k) Σ_i w_ik(φ) l_ik(θ) only through the weights, which read
        detached features and losses, so ``uᵀ ∂g/∂φ = ∂/∂φ Σ_k (1/n_k) Σ_i w_ik(φ) s_ik`` with
        ``s_ik = ∇θ l_ik · u``: the directional derivatives of the per-sample losses along u, one
        forward pass of the upper step's train batch with tangents (`forward_tangents`, the same
        dropout masks), then a backward through the weights alone. The same number as the VJP
        through g's graph up to rounding (1e-6–1e-4 relative in float32), in about half its time on
        Fashion-MNIST's ConvNet and the same time on digits' small one (`benchmarks/step_cost.py
        --cost-model`, `methods_learn.md` §14). None (the VJP) when
        `forward_mode` is off, when θ holds tensors that are not the model's, or after an operation
        without a forward-mode derivative was met (a `HypergradWarning` says so once).
        """
        if not self.forward_mode or getattr(self, "_forward_failed", False):
            return None
        own = {id(p) for p in model.parameters()}
        if not all(id(p) in own for p in params):
            return None
        names = self.task_names(context.tasks)
        hparams = self.hparams()
        blocks = self._blocks

        def losses() -> list[Tensor]:
            again = context.terms(batch, names=names)
            out = []
            for block in blocks:
                stacked = self._stack(again, block)
                out.append(torch.zeros(0) if stacked is None else stacked[0])
            return out

        def product(u: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
            try:
                tangents = forward_tangents(model, params, u, losses, rng=rng)
            except (RuntimeError, NotImplementedError) as err:
                if "forward" not in str(err).lower() and "jvp" not in str(err).lower():
                    raise
                self._forward_failed = True
                warnings.warn(
                    f"{type(self).__name__}: an operation of this model has no forward-mode derivative ({err}); "
                    "its upper steps use the double backward for uᵀ∂g/∂φ instead (the same numbers, slower). "
                    "Pass forward_mode=False to skip the attempt.", HypergradWarning, stacklevel=2)
                return None
            values = {block.stream: t for block, t in zip(blocks, tangents)}
            q = self.scaled(self._objective(terms, attach=True, record=False, values=values))
            grads = torch.autograd.grad(q, hparams, allow_unused=True)
            return tuple(torch.zeros_like(h) if g is None else g for h, g in zip(hparams, grads))

        return product

    def schedule(self, terms: LossTerms) -> dict[str, Tensor]:
        """The schedule w_ik of every task of this method in `terms`: task name -> ``[B_stream]`` (graph to φ)."""
        out: dict[str, Tensor] = {}
        for block in self._blocks:
            stacked = self._stack(terms, block)
            if stacked is None:
                continue
            loss, mask, cols, names = stacked
            w = self.stream_weights(block, cols, loss.detach(), mask, terms)
            out.update(zip(names, w.unbind(1)))
        return out

    # -- the trace ----------------------------------------------------------------------
    def _add_probes(self, ids: Tensor) -> None:
        limit = self.probe_size
        remaining = None if limit is None else limit - len(self._probe_ids)
        if remaining is not None and remaining <= 0:
            return
        new = ids[~torch.isin(ids, self._probe_ids)]
        if len(new) == 0:
            return
        # distinct ids, in the order the batch drew them (a batch is a random draw)
        uniq, inverse = torch.unique(new, return_inverse=True)
        first = torch.full((len(uniq),), len(new), dtype=torch.long, device=new.device)
        first.scatter_reduce_(0, inverse, torch.arange(len(new), device=new.device), reduce="amin")
        new = new[first.sort().values]
        if remaining is not None:
            new = new[:remaining]
        self._probe_ids = torch.cat([self._probe_ids, new])
        self._probe_sorted, self._probe_order = torch.sort(self._probe_ids)
        pad = torch.full((len(new), self._probe_weights.shape[1]), math.nan, device=self._probe_weights.device)
        self._probe_weights = torch.cat([self._probe_weights, pad])

    def _slots(self, ids: Tensor) -> Tensor:
        n = len(self._probe_sorted)
        if n == 0:
            return torch.full_like(ids, -1)
        pos = torch.searchsorted(self._probe_sorted, ids).clamp_max(n - 1)
        hit = self._probe_sorted[pos] == ids
        return torch.where(hit, self._probe_order[pos], torch.full_like(ids, -1))

    @torch.no_grad()
    def _record(self, block: _Block, cols: Tensor, w: Tensor, mask: Tensor, terms: LossTerms) -> None:
        m = mask.to(w.dtype)
        count = m.sum(0)
        self._batch_mean[cols] = torch.where(count > 0, (w * m).sum(0) / count.clamp_min(1.0), self._batch_mean[cols])
        ess = effective_sample_size(w, mask).to(self._batch_ess.dtype)
        self._batch_ess[cols] = torch.where(count > 0, ess, self._batch_ess[cols])
        if block.stream == PRIMARY_STREAM and self._corrupted is not None:
            self._record_noise(cols, w, mask, terms)
        if self.probe_size == 0 or not block.shares_ids:
            return
        ids = terms.index.get(block.stream)
        if ids is None:
            return
        ids = ids.to(self._device).long()
        if block.stream == PRIMARY_STREAM:
            self._add_probes(ids)
        if len(self._probe_ids) == 0:
            return
        slot = self._slots(ids)
        keep = slot >= 0
        slot = torch.where(keep, slot, torch.zeros_like(slot))
        weight = (keep[:, None] & mask).to(w.dtype)
        n = len(self._probe_ids)
        sums = torch.zeros(n, len(cols), dtype=w.dtype, device=w.device).index_add_(0, slot, w * weight)
        seen = torch.zeros(n, len(cols), dtype=w.dtype, device=w.device).index_add_(0, slot, weight)
        current = self._probe_weights[:, cols]
        self._probe_weights[:, cols] = torch.where(seen > 0, sums / seen.clamp_min(1.0), current).to(self._probe_weights.dtype)

    @torch.no_grad()
    def _record_noise(self, cols: Tensor, w: Tensor, mask: Tensor, terms: LossTerms) -> None:
        ids = terms.index.get(PRIMARY_STREAM)
        hit = (cols == self._primary_col).nonzero()
        if ids is None or len(hit) == 0:
            return
        j = int(hit[0, 0])
        ids = ids.to(self._device).long()
        keep = mask[:, j] & (ids < len(self._corrupted))
        weights = w[keep, j].double()
        flags = self._corrupted[ids[keep]]
        acc = self._noise_acc
        acc[0] += weights[flags].sum()
        acc[1] += flags.sum()
        acc[2] += weights[~flags].sum()
        acc[3] += (~flags).sum()
        if flags.any() and (~flags).any():
            diff = weights[~flags][:, None] - weights[flags][None, :]
            acc[4] += ((diff > 0).double() + 0.5 * (diff == 0).double()).mean()
            acc[5] += 1

    def noise_trace(self) -> dict[str, float]:
        """Per-batch label-noise statistics of the primary task's weights, over the lower batches
        since the previous call (the last window's values again when no batch came since):
        ``batch_weight_corrupted`` / ``batch_weight_clean`` (mean weight of the corrupted and clean
        samples), their ``batch_weight_ratio`` and ``batch_weight_auc`` (mean over the batches of
        `weight_auc`: the chance that a clean sample outweighs a corrupted one in its batch).
        Empty when the bundle records no corrupted labels."""
        if self._corrupted is None:
            return {}
        acc = self._noise_acc.tolist()
        if acc[1] + acc[3] > 0:
            bad = acc[0] / acc[1] if acc[1] else math.nan
            good = acc[2] / acc[3] if acc[3] else math.nan
            self._noise_last = {
                "batch_weight_corrupted": bad, "batch_weight_clean": good,
                "batch_weight_ratio": bad / good if good else math.nan,
                "batch_weight_auc": acc[4] / acc[5] if acc[5] else math.nan,
            }
            self._noise_acc.zero_()
        return dict(self._noise_last)

    def probe_corrupted(self) -> np.ndarray | None:
        """Whether each probe's primary label was corrupted (None when the bundle has no label noise)."""
        corrupted = self._bundle_info.get("corrupted")
        if corrupted is None:
            return None
        corrupted = torch.as_tensor(corrupted).cpu()
        ids = self._probe_ids.cpu()
        flags = torch.zeros(len(ids), dtype=torch.bool)
        inside = ids < len(corrupted)
        flags[inside] = corrupted[ids[inside]]
        return flags.numpy()

    def trace(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tasks": list(self._names)}
        out.update(self.scheduler_trace())
        out["batch_mean_weight"] = self._batch_mean.detach().cpu().numpy().copy()
        out["batch_ess"] = self._batch_ess.detach().cpu().numpy().copy()
        if self.probe_size != 0:
            weights = self._probe_weights.detach().cpu().numpy().copy()
            flags = self.probe_corrupted()
            out["probe_ids"] = self._probe_ids.cpu().numpy().copy()
            out["probe_weights"] = weights
            out["probe_corrupted"] = flags
            if flags is not None and len(weights):
                primary = weights[:, self._primary_col]
                seen = np.isfinite(primary)
                for label, sel in (("weight_corrupted", flags & seen), ("weight_clean", ~flags & seen)):
                    out[label] = float(primary[sel].mean()) if sel.any() else math.nan
                out["weight_auc"] = weight_auc(primary[seen], flags[seen])
        out.update(self.noise_trace())
        out.update({f"upper/{k}": v for k, v in self.last_upper.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["probe_ids"] = self._probe_ids.clone()
        state["probe_weights"] = self._probe_weights.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "probe_ids" in state:
            self._probe_ids = state["probe_ids"].to(self._device)
            self._probe_sorted, self._probe_order = torch.sort(self._probe_ids)
            self._probe_weights = state["probe_weights"].to(self._device)


class JTDS(ScheduledMethod):
    """JTDS: joint task and data scheduling (Chen et al., ICML 2022, §2.2–2.3, Algorithm 1).

    Schedule, for every task k including the primary one (JTDS Eq. 4)::

        w_ik = σ1(α_k) · σ1(P_kᵀ c_ik) · σ2(a_k · l̂_ik + b_k)

    with c_ik the detached backbone feature of sample i on task k's stream (`LossTerms.features`)
    and l̂_ik its detached loss z-scored per task within the batch (`zscore`: population std +
    eps, labelled samples only). φ = {α [K], P [K, d], a [K], b [K]}: O(d·(n+1)) numbers. σ1 is
    softplus and σ2 the sigmoid (the authors' code; the paper only asks for non-negative σ).
    Initialisation (SPEC-NOTES): α_k = 1, P uniform in ±`prototype_init`, a_k uniform in
    (0, `loss_slope_init`), b_k = 0. The lower loss is `ScheduledMethod`'s (Eq. 3 with a per-task
    batch mean); φ is learned from the primary dev loss by the shared upper step (Eq. 9).

    Variants (paper Table 4): ``"only-task"`` w_ik = σ1(α_k); ``"no-loss"`` drops the filter
    σ2(·); ``"no-feature"`` drops σ1(P_kᵀc_ik); ``"no-aux"`` trains on the primary task alone
    (a data schedule only). Unused parameters are not part of φ.

    As published (`JTDS.paper`, the authors' code, ``UpperLevel.authors("jtds")``): SGD on φ
    with lr 1e-2, momentum 0.9 and weight decay 5e-5 (App. A.4: "SGD with learning rate from
    {1e-2, 1e-3}"), K = 3 Neumann terms, M = 20 lower steps per upper step (searched in
    {10, 20, 50}; the authors' scripts use 20), hypergradient norm clipped at 10, the series step
    η equal to the lower learning rate and **no leading η** (``hyper_lr="lower",
    leading_eta=False``: the code returns 1/η times the series of Eq. 9 with step η),
    ``normalize="none"``, no refit. Eq. 8–9 as printed (η = 1, no clipping) is `JTDS.paper_text`;
    the book page "The papers and the authors' code" lists each difference.

    The constructor's defaults are auxnb's recommendation of issue 22 (``JTDS.bounded()`` spells
    them out; ``benchmarks/results/methods_learn.md`` has the record): ``normalize="batch_mean"``
    (relative weights only), the prototype score on the scale-free feature c/‖c‖₂
    (``feature_norm="l2"``), an upper step every M = 5 lower steps with η = 1/λ_max(J)
    (``hyper_lr="auto"``, re-estimated every 10 upper steps) and K = 2 Neumann terms (3 until
    issue 22's cost round; see the cadence below), φ's step of one length (SGD 1e-2, momentum 0.9,
    the series without its leading η as in the authors' code, every hypergradient scaled to norm 5,
    ``clip=5.0, clip_mode="fixed"``: each step adds 0.05 to φ's velocity, so a step is 0.05 long at
    first and at most 0.05/(1 − 0.9) = 0.5 where the hypergradient keeps its direction; see below),
    ``warmup=40`` lower steps before φ's first update (the
    early per-sample hypergradients favour high-loss samples and are 10–100× larger than the
    later ones), the series warm-started (``warm_start=0.9``: each upper step's K iterations start
    from 0.9 × the previous u, about K/(1 − 0.9) = 20 terms' horizon at K = 2's cost; see below), and no refit. On Fashion-MNIST with 40 % label noise over 10 epochs (`small`,
    alone, 15 seeds) it gives corrupted labels 0.22–0.65 of a clean label's weight (weight AUC
    0.86–0.97) and is 0.7 points above STL and 1.6 above Equal on the fresh seeds (+1.7 on STL over all 15;
    STL and Equal run on the same machine, `methods_learn.md` §13), where issue 8's
    default (`JTDS.issue8`: the raw 1568-d feature, Adam 0.1 on φ) collapsed the sample weights,
    gave corrupted samples more weight than clean ones and lost 11 points to STL; on
    digits with noisy labels it ties issue 8's default under Adam and removes most of its harm
    under SGD. Not everywhere: on the tests' synthetic label-noise problem its filter learns the
    wrong sign (high loss up-weighted) although its accuracy is above issue 8's default. Check
    ``trace()["batch_weight_auc"]`` (with label noise) or ``trace()["filter_a"]`` (the loss
    filter's slope: negative = high-loss samples down-weighted) on your data, and use
    `JTDS.paper()` or STL where the filter favours high losses.

    The primary task's α_G is not learned (``pin_primary=True``, since 2026-12-07; `methods_learn.md`
    §15): with it learned, the auxiliary weights relative to the primary's, σ1(α_k)/σ1(α_G), had no
    upper bound, and under an Adam lower optimiser α_G drifted down until they ran away (on digits'
    noisy case run for 40 epochs α_G fell from 1 to −19, the rotation weight reached 10⁹ times the
    primary's and λ_max(J) 10⁹ times its first estimate; early stopping kept the test accuracy). Pinned,
    the same weights move through α_k alone; on seeds 0–9 of both noisy Fashion-MNIST cases and both
    digits optimisers the pinned default was within −0.1…+0.4 points of the learned α_G, paired, and
    on the fresh seeds of the 10-epoch Fashion-MNIST case +1.6 (78.7 % against STL's 76.9 and Equal's
    75.9 on the same machine; corrupted/clean weight 0.14–0.39).
    `hyper_lr="auto"` warns (`HypergradWarning`) when λ_max passes 100× its first estimate. In long
    runs watch ``trace()["task_weight"]`` (σ1(α_k) for every task, the primary's included: the relative
    weights are their ratios).

    φ's step has one length (``clip=5.0, clip_mode="fixed"``, since 2026-12-07; `methods_learn.md` §16):
    the series without its leading η is 1/η = λ_max(J) times the implicit gradient, so its norm follows
    the lower problem's curvature, not φ's use — about 5 on the noisy Fashion-MNIST runs, 9 falling to
    0.5–3.5 on digits under Adam, 0.2–1.2 under SGD (λ_max 12–16 there against 80–280), where φ then
    moved 3–30× more slowly and the filter had not separated the noise when the best D_val step came.
    Scaled to norm 5 (the joint clip at 10 never acted on these runs), on seeds 0–9 against the clip at
    10 (`JTDS.clip10_upper`, the default before): +2.78 points under SGD on digits (now above STL), +0.40
    under Adam, +0.50 and +0.20 on the 10- and 3-epoch Fashion-MNIST cases, paired, at the same cost;
    on the fresh seeds 10–14 +3.68 under SGD (94.2 % against STL's 91.5), 0.00, −0.22 and −0.14.
    A longer step for all (``upper_lr`` 0.02–0.03 with the clip) did not do this: it helped digits
    and lost the separation on 4 of 10 Fashion-MNIST seeds.

    The series' horizon decides the filter's sign (``warm_start=0.9`` since 2026-12-07; `methods_learn.md` §21): over
    the first upper steps of a short run, K = 2 Neumann terms see only a few lower steps ahead, and over that horizon
    a step on a corrupted label still lowers the dev loss (early in training every sample teaches the common
    features), so the slope a was pushed up and, carried by φ's momentum, ended positive on 3 of 15 seeds over 3 noisy
    Fashion-MNIST epochs (7 of 15 with ``dev_in_train``); at the same θ, 20 terms gave every one of those upper steps
    the right sign. Warm-started, on 15 seeds against the cold series (``warm_start=0``, paired): 3 epochs +0.11 /
    +0.52 points on seeds 0–9 / 10–14, the filter reversed on 1 seed instead of 3; 10 epochs +0.49 / +1.00, 77.9 % on
    the fresh seeds against STL's 75.0 (+2.9), corrupted/clean weight 0.13–0.25 instead of 0.22–0.74; digits' noisy
    case +0.16 / +0.80 (Adam) and +0.02 / +0.88 (SGD). No product more; one θ-sized vector kept (in checkpoints too).

    D_dev is held out of θ's training set, as in the papers; ``dev_in_train=True`` (an option of every
    method that reads D_dev, `UpperLevel`) lets θ train on it too while φ still learns from it alone, so
    that JTDS's lower batches are STL's and Equal's of the same seed. Over 3 noisy Fashion-MNIST epochs it
    halved JTDS's paired spread against Equal (SD 1.7 against 3.8 points, 15 seeds) and was +1.6 points on
    the default on seeds 0–9, −0.25 on the fresh ones; over 10 epochs and on digits within noise of the
    default. It is not the default because its filter found the noise on fewer seeds over 3 epochs (8 of 15
    against 10; `methods_learn.md` §20).

    The cadence M (``lower_steps``) and the number of Neumann terms K set the cost: each upper step
    costs K Jacobian-vector products, each about 4.6 Equal lower steps on Fashion-MNIST's ConvNet
    (a double backward through four BatchNorm layers), and the last product uᵀ∂g/∂φ, which
    ``forward_mode`` (the default) takes by one forward-mode pass at about 1.8 Equal steps instead of
    a double backward at 3.7. Over 10 epochs (~310 lower steps, T = 10) a whole run cost 2.8–3.0×
    Equal's CPU time with K = 2 and 3.2× with K = 3 with the double backward, 2.45–2.62× in forward
    mode (2.65–2.96× with the double backward in the same two measurements; on digits' 8×8 ConvNet the
    two products cost the same); over 3 epochs 2.4× with either K
    (`benchmarks/step_cost.py`, entries ``jtds-small-k3``/``jtds-small-k2``/``jtds-small-k2-vjp``,
    `benchmarks/results/methods_learn.md` §12 and §14); on seeds 0–9 of both
    noisy Fashion-MNIST cases K = 2 was +0.5 and +0.0 points against K = 3, paired, and on the fresh
    seeds of the 10-epoch case −0.4 (`benchmarks/results/methods_learn.md` §12), hence the default.
    What matters for the accuracy is how many upper steps follow the warm-up, not M itself: over 10
    epochs ``lower_steps=20`` (with K = 3) was 2.9 points above STL and 1.5 above Equal on the fresh
    seeds at 2.6× Equal's CPU time, but over 3 epochs (~93 steps) the two upper steps it leaves after
    the warm-up separated the noise on 5 of 15 seeds (AUC < 0.5 on 8) and one seed lost 7 points to
    STL (§9). Leave at least ~10 upper steps after the warm-up. With K = 2 neither lever is free: over 10
    epochs ``lower_steps=20`` was 1.7 points below T = 10 on seeds 0–9 and ``terms=1`` 1.8 below on seeds
    0–4, and on digits' 300-step noisy runs T = 19 lost 2.2 points under Adam (§13): how many upper steps the
    filter needs depends on the problem, so the default keeps a fixed cadence.

    ``normalize="batch_mean"`` (not in the paper; for issue 8): the sample part
    ``s_ik = σ1(P_kᵀc_ik)·σ2(a_k l̂_ik + b_k)`` is divided by its mean over the task's labelled
    samples in the batch, so only relative sample weights are learned and σ1(α_k) alone sets the
    task's scale. Nothing in Eq. 4 fixes the overall scale of w; the hypergradient then mostly
    changes that scale (a learning-rate multiplier) instead of separating samples (SPEC-NOTES).
    With either normalisation the task weights are relative too: σ1(α_k)/σ1(α_G), so the primary
    task's weight is pinned at 1 and the mean weight of a primary batch is exactly 1 (α_G then
    only acts as a common inverse scale of the auxiliary tasks' weights). Measured under SGD at 40 % label noise, a free primary scale
    grew greedily (a larger step lowers the next dev loss) and training destabilised.
    ``normalize="softmax"``: the sample weights are ``n_k·softmax_i(P_kᵀc_ik + a_k·l̂_ik)`` over
    the task's n_k labelled samples in the batch (a log-linear score; mean 1 per task, as with
    ``batch_mean``), again times σ1(α_k).

    Args:
        variant: one of `VARIANTS`.
        normalize: one of `NORMALIZE`.
        sigma1: key of `SIGMA1` (σ1; σ2 is always the sigmoid).
        eps: the z-score's epsilon.
        prototype_init, loss_slope_init: initialisation ranges of P and a.
        probe_size, forward_mode: see `ScheduledMethod`.
        fallback, fallback_margin: deprecated (one FutureWarning): the do-no-harm guard is a run-level
            option now (`auxnb.selection`; ``Trainer(..., guard=...)``, ``run(..., guard=...)``); given
            here they still ask for it (``fallback=None``: this method alone).
        feature_norm: one of `FEATURE_NORM`: ``"l2"`` (default since issue 22) scores c/‖c‖₂, so
            multiplying the feature by a constant leaves the weights unchanged; ``"none"`` (the
            paper's, and the default before issue 22) scores the raw feature.
        warmup: lower steps before φ's first update (default 40 since issue 22; the paper's: 0):
            earlier upper steps are skipped (no hypergradient is computed, so they cost nothing).
            A run shorter than the warm-up never moves φ (the smoke scale: pass ``warmup=0``).
        warmup_series: during the warm-up, still solve and keep the warm-started series
            (`BilevelMethod.series_step`: the dev gradient v and K products per upper slot, no product into φ,
            φ unchanged), so that φ's first update has the series' horizon (about K/(1 − β) terms) instead of
            K's. Needs ``warm_start`` > 0. Default False (`methods_learn.md` §22 measures it).
        pin_primary: with ``normalize``, leave α_G (the primary task's α) where it starts, so that the
            auxiliary weights σ1(α_k)/σ1(α_G) move through α_k alone: at most linearly in the number of
            upper steps with the default softplus σ1, where a learned α_G → −∞ scales them up exponentially
            (on digits' noisy case over 40 epochs α_G fell to −19, the auxiliary weight reached 10⁹ and
            λ_max 10⁹× its first estimate; methods_learn.md §15). Nothing is lost in what the weights can
            express: α_G only scaled the auxiliary weights together. True is the default since
            2026-12-07 (issue 22, §15); False learns α_G as before (`JTDS.issue8` keeps False).
        downweight_only: the do-no-harm filter (issue 13; not in the paper): the loss filter's
            slope is a_k = −softplus(ρ_k) ≤ 0 (a higher loss never raises a sample's weight) and
            the sample part is divided by its maximum over the task's labelled samples in the
            batch instead of its mean, so no sample ever weighs more than its task's weight.
            Replaces ``normalize``'s sample normalisation (the task weights stay relative).
        upper: the `UpperLevel` (default `default_upper`, the recommendation above); its fields
            are also accepted as keywords (``lower_steps``, ``hyper_lr``, ``upper_lr``, ...),
            which override ``upper``'s (see `BilevelMethod`).

    The book chapter ``notebooks/04_jtds.ipynb`` explains it and measures it under label noise.

    Example:
        >>> JTDS("no-loss").variant, JTDS().feature_norm, JTDS().warmup, JTDS.paper().feature_norm
        ('no-loss', 'l2', 40, 'none')
    """

    name = "jtds"
    #: auxnb's recommendation since issue 22, the constructor's default. SGD 1e-2 with momentum 0.9 on φ, the
    #: series without its leading η (the authors' code), on auxnb's cadence (M = 5, η = 1/λ_max). K = 2 Neumann
    #: terms since issue 22's cost round (K = 3 before: the same accuracy on seeds 0–9 of both noisy
    #: Fashion-MNIST cases, one Jᵀu product fewer per upper step; `methods_learn.md` §12). Since 2026-12-07
    #: (§16) every hypergradient is scaled to norm 5 (``clip_mode="fixed"``), so φ's step is 0.05 long before
    #: momentum whatever the lower problem's curvature (without the leading η the series' norm grows with
    #: λ_max); before, the authors' joint clip at 10 (``clip_mode="max"``) bounded it by 0.1.
    default_upper = UpperLevel(lower_steps=5, terms=2, hyper_lr="auto", leading_eta=False, upper_optimizer="sgd", upper_lr=1e-2,
                               upper_momentum=0.9, clip=5.0, clip_mode="fixed", warm_start=0.9)
    #: The default before 2026-12-07 (§16), with the authors' joint clip (the hypergradient's norm at most 10) and
    #: the series started afresh at every upper step (``warm_start=0``, the default until §21).
    clip10_upper = default_upper.replace(clip=10.0, clip_mode="max", warm_start=0.0)
    #: the same value under the name it had while it was issue 22's candidate (`JTDS.bounded`)
    bounded_upper = default_upper
    #: issue 8's recommendation, the default before issue 22 (with ``feature_norm="none", warmup=0`` it is
    #: `JTDS.issue8`). Adam 0.1 on φ, the series with its leading η.
    issue8_upper = UpperLevel(lower_steps=5, terms=3, hyper_lr="auto", upper_optimizer="adam", upper_lr=0.1, clip=10.0)

    def __init__(
        self,
        variant: str = "full",
        *,
        normalize: str = "batch_mean",
        sigma1: str = "softplus",
        eps: float = 1e-6,
        prototype_init: float = 0.05,
        loss_slope_init: float = 0.05,
        probe_size: int | None = 64,
        upper: UpperLevel | Mapping[str, Any] | None = None,
        downweight_only: bool = False,
        feature_norm: str = "l2",
        warmup: int = 40,
        warmup_series: bool = False,
        forward_mode: bool = True,
        pin_primary: bool = True,
        fallback: Any = NOT_GIVEN,
        fallback_margin: Any = NOT_GIVEN,
        **upper_keywords: Any,
    ):
        super().__init__(probe_size=probe_size, forward_mode=forward_mode, upper=upper, **upper_keywords)
        legacy_fallback(self, fallback, fallback_margin)  # deprecated: the guard is run-level (auxnb.selection)
        if variant not in VARIANTS:
            raise ValueError(f"Unknown JTDS variant {variant!r}; use one of {VARIANTS}.")
        if normalize not in NORMALIZE:
            raise ValueError(f"Unknown normalize={normalize!r}; use one of {NORMALIZE}.")
        if sigma1 not in SIGMA1:
            raise ValueError(f"Unknown sigma1={sigma1!r}; use one of {sorted(SIGMA1)}.")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}.")
        if not isinstance(downweight_only, bool):
            raise TypeError(f"downweight_only must be True or False, got {downweight_only!r}.")
        if feature_norm not in FEATURE_NORM:
            raise ValueError(f"Unknown feature_norm={feature_norm!r}; use one of {FEATURE_NORM}.")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (lower steps before φ's first update), got {warmup!r}.")
        if not isinstance(pin_primary, bool):
            raise TypeError(f"pin_primary must be True or False, got {pin_primary!r}.")
        if not isinstance(warmup_series, bool):
            raise TypeError(f"warmup_series must be True or False, got {warmup_series!r}.")
        if warmup_series and not self.upper.warm_start:
            raise ValueError("warmup_series=True keeps the warm-started series through the warm-up, but warm_start is 0 "
                             "(a cold series keeps nothing between upper steps): pass warm_start > 0 (JTDS()'s is 0.9), "
                             "or leave warmup_series False.")
        if downweight_only and normalize == "softmax":
            raise ValueError("downweight_only=True replaces the batch normalisation; use normalize='batch_mean' or 'none' with it.")
        self.variant = variant
        self.normalize = normalize
        self.downweight_only = downweight_only
        self.pin_primary = pin_primary
        self.feature_norm = feature_norm
        self.warmup = warmup
        self.warmup_series = warmup_series
        self.sigma1 = sigma1
        self.eps = float(eps)
        self.prototype_init = float(prototype_init)
        self.loss_slope_init = float(loss_slope_init)

    @classmethod
    def paper(cls, variant: str = "full", **overrides: Any) -> "JTDS":
        """JTDS as the authors ran it (`PAPER_CONFIG`, ``UpperLevel.authors("jtds")``: M = 20, K = 3,
        the series with η = the lower lr and no leading η, SGD 1e-2 momentum 0.9 and weight decay
        5e-5 on φ, clipping at 10; no normalisation); `overrides` win. `paper_text` is Eq. 8–9 as printed.

        Example:
            >>> m = JTDS.paper()
            >>> m.lower_steps, m.terms, m.hyper_lr, m.leading_eta, m.normalize, m.refit
            (20, 3, 'lower', False, 'none', None)
        """
        return cls(variant, **{"normalize": "none", "feature_norm": "none", "downweight_only": False, "warmup": 0,
                               "upper": UpperLevel.authors("jtds"), **overrides})

    @classmethod
    def bounded(cls, variant: str = "full", **overrides: Any) -> "JTDS":
        """The constructor's defaults, spelled out (the name issue 22's candidate had before it became the
        default; kept so that code written against it keeps its meaning): the scale-free score
        ``feature_norm="l2"``, φ's step of one length (`default_upper`: SGD 1e-2, momentum 0.9, no
        leading η, the hypergradient scaled to norm 5, on auxnb's M = 5 with η = 1/λ_max) and
        ``warmup=40`` lower steps without φ updates; `overrides` win.

        Example:
            >>> m = JTDS.bounded()
            >>> m.feature_norm, m.warmup, m.upper_optimizer, m.upper_lr, m.clip, m.clip_mode, m.leading_eta
            ('l2', 40, 'sgd', 0.01, 5.0, 'fixed', False)
            >>> m.config() == JTDS().config()
            True
        """
        return cls(variant, **overrides)

    @classmethod
    def issue8(cls, variant: str = "full", **overrides: Any) -> "JTDS":
        """The constructor's defaults before issue 22 (issue 8's recommendation): the raw feature in the
        prototype score, Adam 0.1 on φ with the series' leading η (`issue8_upper`), no warm-up;
        `overrides` win. Kept to reproduce earlier results (``benchmarks/results/low_data*.csv``); on
        Fashion-MNIST's 1568-d feature it collapses the sample weights (issue 22).

        Example:
            >>> m = JTDS.issue8()
            >>> m.feature_norm, m.warmup, m.upper_optimizer, m.upper_lr, m.leading_eta
            ('none', 0, 'adam', 0.1, True)
        """
        return cls(variant, **{"feature_norm": "none", "warmup": 0, "upper": cls.issue8_upper, "pin_primary": False,
                               **overrides})

    @classmethod
    def paper_text(cls, variant: str = "full", **overrides: Any) -> "JTDS":
        """JTDS as the paper's text states it (``UpperLevel.paper_text("jtds")``: Eq. 8–9 with η = 1,
        K = 3, M = 20, SGD 1e-2 on φ, no clipping; no normalisation); `overrides` win.

        Example:
            >>> m = JTDS.paper_text()
            >>> m.hyper_lr, m.clip, m.upper_lr
            (1.0, None, 0.01)
        """
        return cls(variant, **{"normalize": "none", "feature_norm": "none", "downweight_only": False, "warmup": 0,
                               "upper": UpperLevel.paper_text("jtds"), **overrides})

    @property
    def uses_feature(self) -> bool:
        return self.variant in ("full", "no-loss", "no-aux")

    @property
    def uses_loss(self) -> bool:
        return self.variant in ("full", "no-feature", "no-aux")

    def task_names(self, tasks: TaskSet) -> list[str]:
        return [tasks.primary.name] if self.variant == "no-aux" else tasks.names

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        k = len(self._names)
        gen = info.generator if info.generator is not None else torch.Generator().manual_seed(info.seed + 5)
        device = self._device
        self.alpha = nn.Parameter(torch.full((k,), ALPHA_INIT, device=device))
        self.prototypes: nn.Parameter | None = None
        self.filter_a: nn.Parameter | None = None
        self.filter_b: nn.Parameter | None = None
        if self.uses_feature:
            d = getattr(model, "out_features", None)
            if not isinstance(d, int) or d < 1:
                raise TypeError(
                    f"JTDS needs the backbone feature size for its prototypes, but {type(model).__name__} has no "
                    "integer `out_features`; use a MultiHeadModel whose backbone declares out_features, or "
                    "variant='no-feature'."
                )
            proto = (torch.rand(k, d, generator=gen) * 2 - 1) * self.prototype_init
            self.prototypes = nn.Parameter(proto.to(device))
        if self.uses_loss:
            slope = torch.rand(k, generator=gen) * self.loss_slope_init
            if self.downweight_only:  # a = −softplus(ρ): ρ so that the initial slope is −(that draw)
                slope = torch.log(torch.expm1(slope.clamp_min(1e-6)))
            self.filter_a = nn.Parameter(slope.to(device))
            self.filter_b = nn.Parameter(torch.zeros(k, device=device))

    def hparams(self) -> list[nn.Parameter]:
        """φ = [α] + [P] (feature term) + [a, b] (loss filter)."""
        out = [self.alpha]
        if self.prototypes is not None:
            out.append(self.prototypes)
        if self.filter_a is not None and self.filter_b is not None:
            out += [self.filter_a, self.filter_b]
        return out

    def stream_weights(self, block: _Block, cols: Tensor, losses: Tensor, mask: Tensor, terms: LossTerms) -> Tensor:
        sigma1 = SIGMA1[self.sigma1]
        task = self.task_weights(cols)  # [T]
        if self.normalize == "softmax" and not self.variant == "only-task":
            return task * self._softmax_weights(block, cols, losses, mask, terms)
        sample: Tensor | None = None
        if self.prototypes is not None:
            if block.stream not in terms.features:
                raise KeyError(f"JTDS needs the backbone features of stream {block.stream!r} (LossTerms.features).")
            feats = self._feature(terms.features[block.stream], self.prototypes.dtype)
            sample = sigma1(feats @ self.prototypes[cols].T)  # [B, T]: σ1(P_kᵀ c_ik)
        if self.filter_a is not None and self.filter_b is not None:
            lhat = zscore(losses.to(self.filter_a.dtype), mask, self.eps)
            filt = torch.sigmoid(self.slope()[cols] * lhat + self.filter_b[cols])  # σ2(a_k l̂_ik + b_k)
            sample = filt if sample is None else sample * filt
        if sample is None:  # only-task
            return task.expand(losses.shape[0], -1)
        if self.downweight_only:
            # relative to the batch's most-favoured labelled sample: no sample ever weighs more than
            # its task's weight (a sample can only be down-weighted), and the favourite keeps it
            m = mask.to(sample.dtype)
            top = (sample * m).amax(0)
            return task * (sample / top.clamp_min(1e-12))
        if self.normalize == "batch_mean":
            m = mask.to(sample.dtype)
            mean = (sample * m).sum(0) / m.sum(0).clamp_min(1.0)
            sample = sample / mean.clamp_min(1e-12)
        return task * sample

    def _feature(self, feats: Tensor, dtype: torch.dtype) -> Tensor:
        """The detached feature c of the prototype score, ``feature_norm="l2"``: c/‖c‖₂."""
        c = feats.detach().to(dtype)
        if self.feature_norm == "l2":
            c = c / c.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        return c

    def task_weights(self, cols: Tensor | None = None) -> Tensor:
        """The task part of w for the tasks `cols` (default: every task, `_names` order), differentiable in α:
        σ1(α_k); with ``normalize`` relative to the primary's, σ1(α_k)/σ1(α_G) (the primary's exactly 1), and
        with ``pin_primary`` too σ1(α_k)/σ1(α₀) with α₀ = `ALPHA_INIT`, where α_G starts: then α_G has no
        effect and no gradient."""
        sigma1 = SIGMA1[self.sigma1]
        task = sigma1(self.alpha if cols is None else self.alpha[cols])
        if self.normalize == "none":
            return task
        # relative task weights: the primary task's weight is pinned at 1, so no part of φ is a
        # learning-rate multiplier (the hypergradient's short horizon grows one greedily)
        if not self.pin_primary:
            return task / sigma1(self.alpha[self._primary_col])
        # α_G left where it starts: it only scaled the auxiliary weights together, and σ1(α_G) → 0
        # let them grow exponentially in α_G (methods_learn.md §15); α_k alone moves them now
        idx = torch.arange(len(self.alpha), device=task.device) if cols is None else cols
        return torch.where(idx == self._primary_col, torch.ones_like(task),
                           task / sigma1(torch.full_like(task, ALPHA_INIT)))

    def curvature_hint(self) -> str:
        """The task weights, when the lower problem's curvature runs away (`BilevelMethod.curvature_hint`): with
        ``normalize`` the auxiliary tasks' weights relative to the primary, σ1(α_k)/σ1(α_G), have no upper bound
        (α_G → −∞), and a runaway one scales the lower loss with it (methods_learn.md §15)."""
        if self.normalize == "none" or not hasattr(self, "_names"):
            return ""
        with torch.no_grad():
            rel = self.task_weights()
        parts = ", ".join(f"{n}: {float(w):.3g}" for k, (n, w) in enumerate(zip(self._names, rel)) if k != self._primary_col)
        return (f"The auxiliary tasks' weights relative to the primary's (σ1(α_k)/σ1(α_G), unbounded above) are now "
                f"{parts} (trace()['task_weight'] over the run: σ1(α_k), the primary's included). ") if parts else ""

    def upper_step(self, model: nn.Module, context: Any) -> dict[str, float]:
        """`BilevelMethod.upper_step`, except during the first `warmup` lower steps: then φ is left
        as it is and no hypergradient is computed (``last_upper = {"warmup": 1.0}``), or with `warmup_series`
        only the series is advanced (`BilevelMethod.series_step`)."""
        if self.warmup and int(context.step) <= self.warmup:
            if self.warmup_series:
                info = self.series_step(model, context)
                info["warmup"] = 1.0
                return dict(info)
            self.last_upper = {"warmup": 1.0}
            self._upper_steps += 1  # the slot counts (refit and auto-η schedules count upper steps)
            return dict(self.last_upper)
        return super().upper_step(model, context)

    def _softmax_weights(self, block: _Block, cols: Tensor, losses: Tensor, mask: Tensor, terms: LossTerms) -> Tensor:
        # a log-linear score z_ik = P_kᵀc_ik + a_k·l̂_ik (b_k cancels in the softmax), turned into
        # weights n_k·softmax_i(z_ik) over the task's n_k labelled samples: mean 1 per task
        dtype = self.alpha.dtype
        score = torch.zeros(losses.shape, dtype=dtype, device=losses.device)
        if self.prototypes is not None:
            if block.stream not in terms.features:
                raise KeyError(f"JTDS needs the backbone features of stream {block.stream!r} (LossTerms.features).")
            feats = self._feature(terms.features[block.stream], dtype)
            score = score + feats @ self.prototypes[cols].T
        if self.filter_a is not None:
            score = score + self.filter_a[cols] * zscore(losses.to(dtype), mask, self.eps)
        # a large finite fill, not -inf: a task with no labelled sample in the batch gets a finite
        # (uniform) softmax instead of NaN, whose backward would poison φ; its losses are masked anyway
        score = score.masked_fill(~mask, -1e9)
        count = mask.sum(0).to(dtype)
        return (torch.softmax(score, dim=0) * count).masked_fill(~mask, 0.0)

    def slope(self) -> Tensor:
        """The loss filter's slopes a_k (``downweight_only``: a_k = −softplus(ρ_k) ≤ 0, learned through ρ)."""
        if self.filter_a is None:
            raise ValueError(f"JTDS variant {self.variant!r} has no loss filter.")
        return -F.softplus(self.filter_a) if self.downweight_only else self.filter_a

    def filter(self, lhat: Tensor | np.ndarray, task: str | None = None) -> np.ndarray:
        """The learned filter σ2(a_k·l̂ + b_k) of `task` (default: the primary) at normalised losses `lhat` (paper Fig. 6)."""
        if self.filter_a is None or self.filter_b is None:
            raise ValueError(f"JTDS variant {self.variant!r} has no loss filter.")
        k = self._position[task or self._names[self._primary_col]]
        x = torch.as_tensor(np.asarray(lhat), dtype=torch.float32)
        return torch.sigmoid(float(self.slope()[k]) * x + float(self.filter_b[k])).numpy()

    def scheduler_trace(self) -> dict[str, Any]:
        sigma1 = SIGMA1[self.sigma1]
        out: dict[str, Any] = {
            "alpha": self.alpha.detach().cpu().numpy().copy(),
            "task_weight": sigma1(self.alpha.detach()).cpu().numpy().copy(),
        }
        if self.filter_a is not None and self.filter_b is not None:
            out["filter_a"] = self.slope().detach().cpu().numpy().copy()
            out["filter_b"] = self.filter_b.detach().cpu().numpy().copy()
        if self.prototypes is not None:
            out["prototype_norm"] = self.prototypes.detach().norm(dim=1).cpu().numpy().copy()
        return out
