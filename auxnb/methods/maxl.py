"""MAXL (Liu, Davison & Johns, NeurIPS 2019): a label-generation network invents a fine-grained auxiliary task.

The generator (φ) assigns each primary sample a distribution over the ψ[y] sub-classes of its
primary class; the model learns that task with its own head. The generator changes only in the
upper step; it never touches θ, the model's buffers or `.grad`.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import MISSING_CLASS, PRIMARY_STREAM
from .base import LossTerms, SetupInfo
from .upper import UpperLevel
from .bilevel import BilevelMethod

__all__ = ["MAXL", "hierarchy_mask", "hierarchical_masked_softmax", "GENERATORS"]

#: The label-generation network: a re-initialised copy of the model's backbone with a two-layer
#: classifier (MAXL: a VGG-16 like the multi-task network), or a two-layer MLP on the model's
#: detached features (cheaper; not in the paper).
GENERATORS = ("backbone", "features")


def hierarchy_mask(psi: Sequence[int], device: torch.device | None = None) -> Tensor:
    """Boolean ``[C, Σψ]``: row c marks the ψ[c] auxiliary classes that belong to primary class c.

    Example:
        >>> hierarchy_mask([1, 2]).int().tolist()
        [[1, 0, 0], [0, 1, 1]]
    """
    psi = [int(p) for p in psi]
    if not psi or min(psi) < 1:
        raise ValueError(f"psi must give every primary class at least one auxiliary class, got {psi}.")
    owner = torch.repeat_interleave(torch.arange(len(psi)), torch.tensor(psi))
    return (owner[None, :] == torch.arange(len(psi))[:, None]).to(device)


def hierarchical_masked_softmax(logits: Tensor, labels: Tensor, psi: Sequence[int]) -> Tensor:
    """MAXL's mask-softmax, computed stably: ``p_j = M[y, j] e^{z_j} / Σ_k M[y, k] e^{z_k}``.

    Only the ψ[y] auxiliary classes of the sample's primary class y get probability. The max of
    the *allowed* logits is subtracted before exponentiating (the authors' ``exp(z)·mask / Σ``
    overflows for logits above ~88 in float32 and divides 0 by 0 below ~−103). A missing primary
    label (``MISSING_CLASS``) gives a row of zeros.

    Example:
        >>> z = torch.tensor([[0.0, 1000.0, 1000.0]])
        >>> hierarchical_masked_softmax(z, torch.tensor([1]), [1, 2]).tolist()
        [[0.0, 0.5, 0.5]]
    """
    mask = hierarchy_mask(psi, logits.device)
    if logits.shape[-1] != mask.shape[1]:
        raise ValueError(f"logits have {logits.shape[-1]} columns but psi sums to {mask.shape[1]}.")
    present = labels != MISSING_CLASS
    rows = mask[torch.where(present, labels, torch.zeros_like(labels)).long()]
    z = logits.masked_fill(~rows, float("-inf"))
    z = z - z.max(dim=-1, keepdim=True).values
    e = torch.exp(z)
    p = e / e.sum(dim=-1, keepdim=True)
    return torch.where(present[:, None], p, torch.zeros_like(p))


def _reinitialised_copy(module: nn.Module, seed: int) -> nn.Module:
    """A fresh copy of `module` (parameters re-drawn from `seed`) whose BatchNorm layers always
    normalise with batch statistics and keep no running statistics (the generator is never run
    in eval mode, and so an upper step cannot change any buffer of it)."""
    clone = copy.deepcopy(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub in clone.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.track_running_stats = False
                sub.running_mean = sub.running_var = sub.num_batches_tracked = None
    return clone


class MAXL(BilevelMethod):
    """Meta AuXiliary Learning (Liu, Davison & Johns, NeurIPS 2019), as a DTG-AuxL baseline.

    The primary task has C classes; the generated auxiliary task has Σψ classes, ψ[c] of them
    under primary class c (MAXL: ψ = 5 per class). The label-generation network g_φ maps a
    primary input x with label y to ``hierarchical_masked_softmax(g_φ(x), y, ψ)``; the model
    learns it with its own auxiliary head (this method's module, trained by the lower optimiser
    through `lower_parameters`, not a head of the TaskSet).

    Lower objective: ``L_p + weight·mean_j ℓ(aux_head(f_j), g_φ(x_j, y_j)) + aux_weight·Σ_i L_ai``
    with ℓ the soft cross-entropy, or MAXL's focal form ``−Σ y (1 − p)^γ log p`` when
    ``focal_gamma > 0`` (the authors' code: γ = 2). The given auxiliary tasks are off by default
    (``aux_weight=0``): MAXL replaces them by its generated task.

    Upper step: MAXL updates φ with the primary loss after one look-ahead SGD step,
    ``L_p(θ − α∇θL_t(θ, φ))``, plus ``entropy_weight·Σ_k p̄_k log p̄_k`` with p̄ the batch mean of
    the generated labels (the negative entropy: minimising it keeps every auxiliary class in use;
    MAXL's weight 0.2). Here the look-ahead is the shared implicit gradient with ``terms=0`` and
    η = α (``hyper_lr="lower"``): ``−α ∇θL_p(θ)ᵀ ∂²L_t/∂θ∂φ``, which is the derivative of the
    unrolled step with ∇θL_p read at θ instead of θ − α∇θL_t (they differ by O(α) relative).
    The auxiliary head counts as fixed in the upper step; with ``terms=0`` that changes nothing,
    as the primary loss does not depend on it. MAXL's meta loss uses training data, so
    ``upper_data="train"`` is the default (D_dev then joins D_train).

    Paper-faithful values (the defaults unless noted): ψ = 5, entropy weight 0.2, an upper step
    after every lower step, look-ahead with the lower learning rate, upper objective on the
    training data; the authors' φ optimiser is SGD(lr 1e-3, weight decay 5e-4) and their
    auxiliary loss focal with γ = 2 (auxnb defaults: Adam 1e-3 and γ = 0, plain soft CE).

    Args:
        psi: auxiliary classes per primary class (an int for all, or one per class).
        entropy_weight: weight of the entropy regulariser (0: off).
        weight: weight of the generated task's loss.
        aux_weight: weight of the given auxiliary tasks.
        generator: one of `GENERATORS`.
        hidden: the generator classifier's width (default: the feature size).
        focal_gamma: γ of the focal auxiliary loss (0: soft cross-entropy).
        upper_data: ``"train"`` (default) or ``"dev"``.
        probe_size: generated distributions of this many fixed probe samples go into the trace.
        upper, upper_keywords: the `UpperLevel` (default `default_upper`) and its fields as keywords,
            which override ``upper``'s (see `BilevelMethod`).

    Example:
        >>> MAXL().config()["psi"], MAXL().uses_dev
        (5, False)
    """

    name = "maxl"
    #: the constructor's upper level (see `BilevelMethod`; each field is also a keyword)
    default_upper = UpperLevel(lower_steps=1, terms=0, hyper_lr="lower", upper_data="train",
                               upper_optimizer="adam", upper_lr=1e-3, upper_momentum=0.9, clip=10.0)

    def __init__(
        self,
        *,
        psi: int | Sequence[int] = 5,
        entropy_weight: float = 0.2,
        weight: float = 1.0,
        aux_weight: float = 0.0,
        generator: str = "backbone",
        hidden: int | None = None,
        focal_gamma: float = 0.0,
        probe_size: int = 8,

        upper: UpperLevel | Mapping[str, Any] | None = None,
        **upper_keywords: Any,
    ):
        super().__init__(upper=upper, **upper_keywords)
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}.")
        for key, value in (("entropy_weight", entropy_weight), ("weight", weight), ("aux_weight", aux_weight), ("focal_gamma", focal_gamma)):
            if not value >= 0:
                raise ValueError(f"{key} must be >= 0, got {value!r}.")
        self.psi = int(psi) if isinstance(psi, (int, np.integer)) else [int(p) for p in psi]
        self.entropy_weight = float(entropy_weight)
        self.weight = float(weight)
        self.aux_weight = float(aux_weight)
        self.generator = generator
        self.hidden = hidden
        self.focal_gamma = float(focal_gamma)
        self.probe_size = int(probe_size)

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        self._upper_opt = None
        primary = info.tasks.primary
        if primary.kind != "classification":
            raise ValueError(
                f"MAXL generates sub-classes of a classification primary task; {primary.name!r} is {primary.kind}. "
                "Use DTG, which also generates labels for regression."
            )
        self._primary = primary
        c = primary.out_dim
        self._psi = [self.psi] * c if isinstance(self.psi, int) else list(self.psi)
        if len(self._psi) != c:
            raise ValueError(f"psi lists {len(self._psi)} values but the primary task has {c} classes.")
        k = sum(self._psi)
        d = getattr(model, "out_features", None)
        if not isinstance(d, int) or d < 1:
            raise TypeError(f"MAXL needs the backbone feature size, but {type(model).__name__} has no integer `out_features`.")
        p = next(model.parameters())
        seed = int(info.seed) * 1000003 + 313
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.aux_head = nn.Linear(d, k).to(device=p.device, dtype=p.dtype)
            hidden = self.hidden or d
            classifier = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k))
        backbone = getattr(model, "backbone", None)
        if self.generator == "backbone":
            if backbone is None:
                raise TypeError("MAXL(generator='backbone') copies model.backbone; this model has none (use generator='features').")
            body = _reinitialised_copy(backbone, seed + 1)
        else:
            body = nn.Identity()
        self.label_net = nn.Sequential(body, classifier).to(device=p.device, dtype=p.dtype)
        self._probe: dict[str, Any] | None = None
        self._probe_reported = False
        self._last: dict[str, float] = {}
        self._cache: tuple[int, Tensor] | None = None

    def lower_parameters(self) -> list[nn.Parameter]:
        return list(self.aux_head.parameters())

    def hparams(self) -> list[nn.Parameter]:
        return list(self.label_net.parameters())

    def generated_labels(self, terms: LossTerms) -> Tensor:
        """g_φ(x, y) ``[B, Σψ]`` for the batch's primary samples (graph to φ)."""
        x = terms.inputs.get(PRIMARY_STREAM) if self.generator == "backbone" else terms.features[PRIMARY_STREAM].detach()
        if x is None:
            raise ValueError("MAXL needs the batch inputs (LossTerms.inputs['primary']); build terms with compute_terms.")
        y = terms.targets[PRIMARY_STREAM][self._primary.name]
        logits = self.label_net(x)
        return hierarchical_masked_softmax(logits, y, self._psi)

    def _aux_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        logp = F.log_softmax(logits, dim=-1)
        if self.focal_gamma > 0:
            return -(target * (1 - logp.exp()) ** self.focal_gamma * logp).sum(-1)
        return -(target * logp).sum(-1)

    def direction(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        if create_graph:
            target = self.generated_labels(terms)
            if self.entropy_weight > 0:
                self._cache = (id(terms), target)
        else:
            with torch.no_grad():  # first-order lower step: the generated labels are constants
                target = self.generated_labels(terms)
            self._record(terms, target)
        loss = terms.mean(terms.primary)
        for name in terms.auxiliary:
            loss = loss + self.aux_weight * terms.mean(name)
        y = terms.targets[PRIMARY_STREAM][self._primary.name]
        mask = (y != MISSING_CLASS).to(target.dtype)
        aux = self._aux_loss(self.aux_head(terms.features[PRIMARY_STREAM]), target)
        loss = loss + self.weight * (aux * mask).sum() / mask.sum().clamp_min(1.0)
        grads = torch.autograd.grad(self.scaled(loss), list(params), create_graph=create_graph, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))

    def regulariser(self, terms: LossTerms) -> Tensor | None:
        """`entropy_weight`·Σ_k p̄_k log p̄_k over the batch's generated labels (MAXL's entropy term)."""
        if self.entropy_weight == 0:
            return None
        cache, self._cache = self._cache, None
        target = cache[1] if cache is not None and cache[0] == id(terms) else self.generated_labels(terms)
        y = terms.targets[PRIMARY_STREAM][self._primary.name]
        present = y != MISSING_CLASS
        mean = target[present].mean(0)
        return self.entropy_weight * (mean * torch.log(mean.clamp_min(1e-30))).sum()

    @torch.no_grad()
    def _record(self, terms: LossTerms, target: Tensor) -> None:
        mean = target.mean(0)
        used = float((mean > 1e-3).sum())
        self._last = {
            "generated/entropy_of_mean": float(-(mean * torch.log(mean.clamp_min(1e-30))).sum()),
            "generated/classes_used": used,
            "generated/mean_max": float(target.max(-1).values.mean()),
        }
        if self._probe is None and self.probe_size > 0:
            p = min(self.probe_size, target.shape[0])
            x = terms.inputs.get(PRIMARY_STREAM)
            self._probe = {
                "x": None if x is None else x[:p].detach().clone(),
                "f": terms.features[PRIMARY_STREAM][:p].detach().clone(),
                "y": terms.targets[PRIMARY_STREAM][self._primary.name][:p].detach().clone(),
            }

    def trace(self) -> dict[str, Any]:
        out = dict(super().trace())
        out.update(self._last)
        if self._probe is not None:
            with torch.no_grad():
                x = self._probe["x"] if self.generator == "backbone" else self._probe["f"]
                if x is not None:
                    out["probe/generated"] = hierarchical_masked_softmax(self.label_net(x), self._probe["y"], self._psi).cpu().numpy()
            if not self._probe_reported:
                out["probe/primary_label"] = self._probe["y"].cpu().numpy()
                if self._probe["x"] is not None:
                    out["probe/primary_input"] = self._probe["x"].cpu().numpy()
                self._probe_reported = True
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["aux_head"] = {k: v.clone() for k, v in self.aux_head.state_dict().items()}
        # the generator's buffers (a copied backbone's BatchNorm statistics) and the probe, so a
        # resumed run traces exactly what an uninterrupted one does
        state["label_net_buffers"] = {k: v.clone() for k, v in self.label_net.named_buffers()}
        state["probe"] = None if self._probe is None else dict(self._probe)
        state["probe_reported"] = self._probe_reported
        return state

    def load_state_dict(self, state: Any) -> None:
        super().load_state_dict(state)
        if "aux_head" in state:
            self.aux_head.load_state_dict(state["aux_head"])
        if "label_net_buffers" in state:
            buffers = dict(self.label_net.named_buffers())
            with torch.no_grad():
                for k, v in state["label_net_buffers"].items():
                    buffers[k].copy_(v)
        if "probe" in state:
            self._probe = state["probe"]
            self._probe_reported = bool(state.get("probe_reported", False))
