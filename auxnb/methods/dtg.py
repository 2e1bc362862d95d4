"""DTG-AuxL (Chen et al., NeurIPS 2023): generate an auxiliary feature and its label, learned bi-level.

The generator reads the batch's backbone features and labels and adds one generated sample per
primary sample, trained with the primary loss through the primary head. It never changes θ,
model buffers or `.grad`; its parameters φ change only in the upper step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..tasks import INDEX_KEY, PRIMARY_STREAM, Task, TaskSet
from .base import LossTerms, SetupInfo
from .upper import UpperLevel
from .bilevel import UPPER_DATA, BilevelMethod, make_upper_optimizer, upper_context
from .guard import NOT_GIVEN, legacy_fallback
from .generators import (
    FeatureGenerator,
    LabelGenerator,
    label_bias,
    label_spec,
    label_vector,
    labelled,
    mean_pairwise_cosine,
    normalise_label,
    instance_regulariser,
    soft_target_loss,
)

__all__ = ["DTG", "Generated", "UPPER_DATA", "PAPER_CONFIG", "upper_context", "stream_kinds", "aligned_rows"]

#: Where the upper objective's primary loss is measured: D_dev (SPEC-NOTES default) or a fresh
#: batch of the primary training data (DTG Appendix 2, MAXL).

#: DTG-AuxL as published, where the paper says: Neumann n = 3 (Eq. 13) with no step size
#: (η = 1), the upper objective on the primary training set (App. 2), the label embedding size
#: m_n ∈ {32, 64} and MLP layers ∈ {2, 3, 4} (searched; the first values here), H = 10, α
#: initialised at 0.5, Eq. 14 as printed (a sum over pairs) added with weight 1 (Eq. 15).
#: Not given in the paper (kept at auxnb's defaults): φ's optimiser and rate, the interval N,
#: MLP widths and initialisations.
PAPER_CONFIG: dict[str, Any] = {
    "terms": 3, "hyper_lr": 1.0, "upper_data": "train", "embed_dim": 32, "mlp_layers": 2, "bins": 10,
    "instance_reg": 1.0, "reg_reduction": "sum", "init_weight": 1.0,
}


def stream_kinds(info: SetupInfo) -> dict[str, str]:
    """Each stream of ``info.tasks`` as ``"primary"``, ``"view"`` (derived from the primary batch,
    same sample ids, e.g. rotations) or ``"dataset"`` (a Different-Input dataset with its own ids).

    Read from the names of the bundle's auxiliary datasets the Trainer passes
    (``info.extra["aux_datasets"]``), else from the bundle description
    (``info.extra["bundle_info"]["sizes"]``, which a bundle made by hand may lack); without either (a
    hand-made set-up) every non-primary stream counts as a view.
    """
    if "aux_datasets" in info.extra:
        datasets = set(info.extra["aux_datasets"])
    else:
        sizes = (info.extra.get("bundle_info") or {}).get("sizes") or {}
        datasets = set(sizes.get("aux_train") or {})
    return {s: "primary" if s == PRIMARY_STREAM else ("dataset" if s in datasets else "view") for s in info.tasks.streams}


def aligned_rows(kind: str, anchor_ids: Tensor | None, stream_ids: Tensor | None, n_rows: int, batch: int,
                 generator: torch.Generator, stream: str) -> Tensor:
    """Row of stream `stream` paired with each of the `batch` primary samples.

    A view pairs a sample with one of its own rows (same sample id; one drawn uniformly when the
    view repeats it, e.g. one of four rotations). A Different-Input dataset stream pairs primary
    sample j with row ``j mod n_rows``: its batch is an independent shuffled draw, so this is a
    uniformly random pairing across the two datasets.
    """
    if kind == "dataset":
        return torch.arange(batch) % n_rows
    if anchor_ids is None or stream_ids is None:
        raise ValueError(
            f"Stream {stream!r} is a view of the primary batch but its targets carry no {INDEX_KEY!r} ids, so its "
            "rows cannot be paired with primary samples; keep the sample ids in the view's targets."
        )
    match = anchor_ids.reshape(-1, 1).cpu() == stream_ids.reshape(1, -1).cpu()
    if not bool(match.any(1).all()):
        raise ValueError(
            f"Stream {stream!r}: some primary samples have no row with the same id; a view must repeat every sample "
            "id of the primary batch (declare the stream as an aux_train dataset if it has its own samples)."
        )
    scores = torch.rand(match.shape, generator=generator)
    return torch.where(match, scores, torch.full_like(scores, -1.0)).argmax(1)


@dataclass
class Generated:
    """One generated batch: features f_g ``[B, d]``, parameterised labels y_g ``[B, m]`` (Eq. 8),
    norm(y_g), the final labels ŷ ``[B, m]`` (Eq. 9/10), the mask of usable samples, and the
    pairing used: stream -> one row tensor per record (anchor, then partner)."""

    features: Tensor
    raw: Tensor
    normalised: Tensor
    labels: Tensor
    mask: Tensor
    rows: dict[str, list[Tensor]]


class DTG(BilevelMethod):
    """DTG-AuxL: joint data-task generation for auxiliary learning (Chen et al., NeurIPS 2023).

    Lower objective (DTG Eq. 2), with the primary weight fixed to 1::

        L_t = L_p + Σ_i w_i L_ai + w_g · mean_j ℓ_p(head_p(f_g,j), ŷ_g,j)

    where ℓ_p is the primary per-sample loss (soft-label cross-entropy for classification,
    squared error for regression), f_g comes from the `FeatureGenerator` (Eq. 3–4) and ŷ_g from
    the `LabelGenerator` (Eq. 5–8) with the label bias (Eq. 9, or Eq. 10 with a partner).
    φ = generator parameters, α, β and the non-negative task weights w_i, w_g (projected to
    ≥ 0 after each upper step; they start at `init_weight`). The upper step is the shared
    implicit gradient of the primary loss (Eq. 11–13) plus the explicit gradient of the instance
    regulariser (Eq. 14–15) on the y_g of the same training batch.

    Sources. One generated sample per primary sample j ("anchor"). Its sources are, for each
    input stream of the task set, the backbone feature of the stream's row paired with j
    (`aligned_rows`: the same sample id for a view such as rotations, a random row for a
    Different-Input dataset), and the labels of every task on that row. With ``partner``
    (Share-Input, §3.2.3) a second primary sample j2 (a shuffled batch) adds its own features and
    labels; its labels share the anchor's embedding tables and the bias mixes the two primary
    labels with β (Eq. 10). ``partner="auto"`` is True unless some task reads a Different-Input
    dataset (the paper's two scenarios); for digits-rotation that gives the sources
    [anchor image, anchor rotated, partner image, partner rotated], for digits-mnist
    [digits image, MNIST image] (Different-Input, no β). A generated sample whose bias needs a
    missing primary label is left out of the loss.

    Choices the paper leaves open (documented in `FeatureGenerator`, `LabelGenerator`,
    `instance_regulariser`): mask, table and MLP initialisation; α = sigmoid(a) and β =
    sigmoid(b) with a = b = 0 (α starts at 0.5 as in the paper, β at 0.5); Eq. 14 averaged over
    pairs by default (``reg_reduction="sum"`` is as printed); the numeric form of Eq. 14 is the
    entropy of the batch softmax as printed (minimised: it pushes generated values apart).

    Ablations (DTG Table 4): ``feature_nonlinear=False`` (w/o F-nonlinear),
    ``label_nonlinear=False`` (w/o L-nonlinear), ``label_bias=False`` (w/o L-bias: ŷ = norm(y_g),
    α and β leave φ), ``instance_reg=0`` (w/o instance reg) and ``bilevel=False`` (w/o bi-level:
    no upper update at all, so φ stays at its initialisation — the literal reading of "remove the
    overall upper update"; training φ on the training loss instead would just drive w_g to 0 and
    the generated labels towards the model's own predictions, and D_dev then joins D_train).

    Issue 6's defaults (auxnb's; `DTG.paper` gives the published values): the Neumann step η was the
    lower learning rate (``hyper_lr="lower"``) because Eq. 13 as printed (η = 1) diverges — on digits
    with ConvNet4 we measured λ_max(J) between 10² and 10⁴; K = 3 as in the paper; an upper step
    every 5 lower steps and Adam(1e-2) on φ (the paper gives neither); the upper objective on
    D_dev (SPEC-NOTES). With that η the implicit gradient is 10–100× smaller than the gradient of
    Eq. 14 at weight 1 (measured on digits 5-shot), so `instance_reg` sets how much of φ's update
    keeps the labels apart; the printed sum over pairs weighs the regulariser even more. The
    defaults of today follow; since issue 22's cost round they take K = 2 Neumann terms (one
    Jᵀu product fewer per upper step, the costliest pass of the upper level: 3.4× Equal's CPU time
    per lower step instead of 3.9× at T = 10 on Fashion-MNIST, with the same accuracy at five shots).
    ``terms=1`` costs 0.74–0.89 of that; at five shots it was +0.1 points on digits and −0.5 on
    Fashion-MNIST's choosing seeds against K = 2, one hundredth of a point outside the rule the default
    is chosen by (`benchmarks/results/methods_learn.md` §13), so it is an option, not the default.

    Defaults: the paper's upper objective on the primary training data (``upper_data="train"``)
    with ``hyper_lr="auto"`` (η = 1/λ_max(J), re-estimated every 10 upper steps). The paper's
    η = 1 (`DTG.paper`) made the Neumann series blow up on digits 5-shot and wrecked training.
    The task weights w_i, w_g start at ``init_weight=0.01`` (the paper does not say; 1.0 let the
    auxiliary and generated losses swamp 50 labelled images at the start, and the smaller the
    start the closer DTG came to STL on digits 5-shot: it matches STL by starting nearly off);
    the measurement is in ``benchmarks/low_data.py`` and the chapter
    ``notebooks/06_when_auxiliary_learning_helps.ipynb``. At five shots DTG lands where its weights start
    (issue 22, ``benchmarks/results/methods_learn.md`` §10): ``aux_init_weight=1`` gives Equal's accuracy
    on digits and Fashion-MNIST, 0.01 STL's. The weights' hypergradient has a consistent sign per dataset
    (``weight_lr=0.05`` switches rotation off on every digits seed), but with 50 memorised training
    images as the upper objective that does not turn into accuracy; read ``weight/<task>`` in the trace.

    Args:
        partner: True (Share-Input), False (Different-Input) or ``"auto"``.
        feature_nonlinear, label_nonlinear, label_bias, bilevel: Table 4 switches.
        instance_reg: weight of Eq. 14 in the upper gradient (0: off).
        reg_reduction: ``"mean"`` or ``"sum"`` (see `instance_regulariser`).
        embed_dim: m_n, the nonlinear label embedding size.
        mlp_layers: layers of MLP_F and MLP_L.
        feature_hidden, label_hidden: MLP widths (default d and 2·m_n).
        bins: H, bins of a numeric label's embedding.
        init_std: initial scale of the label tables.
        init_weight: initial w_g (the generated samples' weight), and initial w_i unless `aux_init_weight` is given.
        aux_init_weight: initial w_i of the given auxiliary tasks (None: `init_weight`).
        weight_lr: learning rate of the task weights w_i, w_g in φ's optimiser (None: ``upper_lr``, as
            the rest of φ).
        fallback, fallback_margin: deprecated (one FutureWarning): the do-no-harm guard is a run-level
            option now (`auxnb.selection`; ``Trainer(..., guard=...)``, ``run(..., guard=...)``); given
            here they still ask for it (``fallback=None``: this method alone).
        upper_data: ``"train"`` (default; the paper's appendix: D_dev then joins D_train) or ``"dev"``.
        probe_size: generated labels of this many fixed probe samples (the first ones the lower
            steps see) are recorded in the trace (DTG Table 3).
        upper, upper_keywords: the `UpperLevel` (default `default_upper`) and its fields as keywords,
            which override ``upper``'s (see `BilevelMethod`).

    Example:
        >>> DTG(label_bias=False).config()["label_bias"], DTG().uses_dev, DTG(upper_data="dev").uses_dev
        (False, False, True)
    """

    name = "dtg"
    #: the constructor's upper level (see `BilevelMethod`; each field is also a keyword)
    #: K = 2 Neumann terms since issue 22's cost round (K = 3, the paper's, before: the same accuracy at five
    #: shots on seeds 0–9 for one Jᵀu product fewer per upper step; `methods_learn.md` §12)
    default_upper = UpperLevel(lower_steps=5, terms=2, hyper_lr="auto", upper_data="train",
                               upper_optimizer="adam", upper_lr=1e-2, upper_momentum=0.9, clip=10.0)

    def __init__(
        self,
        *,
        partner: bool | str = "auto",
        feature_nonlinear: bool = True,
        label_nonlinear: bool = True,
        label_bias: bool = True,
        bilevel: bool = True,
        instance_reg: float = 1.0,
        reg_reduction: str = "mean",
        embed_dim: int = 32,
        mlp_layers: int = 2,
        feature_hidden: int | None = None,
        label_hidden: int | None = None,
        bins: int = 10,
        init_std: float = 0.1,
        init_weight: float = 0.01,
        aux_init_weight: float | None = None,
        weight_lr: float | None = None,
        probe_size: int = 8,

        upper: UpperLevel | Mapping[str, Any] | None = None,
        fallback: Any = NOT_GIVEN,
        fallback_margin: Any = NOT_GIVEN,
        **upper_keywords: Any,
    ):
        super().__init__(upper=upper, **upper_keywords)
        legacy_fallback(self, fallback, fallback_margin)  # deprecated: the guard is run-level (auxnb.selection)
        if partner not in (True, False, "auto"):
            raise ValueError(f"partner must be True, False or 'auto', got {partner!r}.")
        if reg_reduction not in ("mean", "sum"):
            raise ValueError(f"reg_reduction must be 'mean' or 'sum', got {reg_reduction!r}.")
        if not instance_reg >= 0:
            raise ValueError(f"instance_reg must be >= 0 (0: off), got {instance_reg!r}.")
        for key, value in (("embed_dim", embed_dim), ("mlp_layers", mlp_layers), ("bins", bins)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}.")
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 0:
            raise ValueError(f"probe_size must be an int >= 0, got {probe_size!r}.")
        self.partner = partner
        self.feature_nonlinear = bool(feature_nonlinear)
        self.label_nonlinear = bool(label_nonlinear)
        self.label_bias = bool(label_bias)
        self.bilevel = bool(bilevel)
        self.instance_reg = float(instance_reg)
        self.reg_reduction = reg_reduction
        self.embed_dim = int(embed_dim)
        self.mlp_layers = int(mlp_layers)
        self.feature_hidden = feature_hidden
        self.label_hidden = label_hidden
        self.bins = int(bins)
        self.init_std = float(init_std)
        for key, value in (("init_weight", init_weight), ("aux_init_weight", aux_init_weight)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
                raise ValueError(f"{key} must be a number >= 0 (a task weight's starting value), got {value!r}.")
        self.init_weight = float(init_weight)
        self.aux_init_weight = None if aux_init_weight is None else float(aux_init_weight)
        if weight_lr is not None and (isinstance(weight_lr, bool) or not isinstance(weight_lr, (int, float)) or not weight_lr > 0):
            raise ValueError(f"weight_lr must be a number > 0 (the task weights' learning rate) or None (upper_lr), got {weight_lr!r}.")
        self.weight_lr = None if weight_lr is None else float(weight_lr)
        self.probe_size = int(probe_size)
        # w/o bi-level: no upper step (lower_steps reads None), so D_dev goes back to D_train
        # (the fair-comparison rule)
        self.upper = self.upper

    def _runs_upper(self) -> bool:
        return getattr(self, "bilevel", True)

    @classmethod
    def paper(cls, **overrides: Any) -> "DTG":
        """DTG with the values the paper gives (`PAPER_CONFIG`), plus `overrides`."""
        return cls(**{**PAPER_CONFIG, **overrides})

    # -- set-up ---------------------------------------------------------------------
    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        self._upper_opt = None
        tasks = info.tasks
        self._primary: Task = tasks.primary
        self._aux = [t.name for t in tasks.auxiliary]
        kinds = stream_kinds(info)
        self._kinds = kinds
        self._streams = list(tasks.streams)
        partner = self.partner
        if partner == "auto":
            partner = not any(k == "dataset" for k in kinds.values())
        self._partner = bool(partner)
        self._records = ["anchor", "partner"] if self._partner else ["anchor"]
        d = getattr(model, "out_features", None)
        if not callable(getattr(model, "head_forward", None)) or not isinstance(d, int) or d < 1:
            raise TypeError(
                f"DTG generates backbone features and runs the primary head on them, but {type(model).__name__} has no "
                "`head_forward` or no integer `out_features`; use a MultiHeadModel whose backbone declares out_features."
            )
        if self._primary.kind == "regression" and self._primary.label_range is None:
            # DTG Eq. 9 normalises y_g into the primary range (b − a)·sigmoid(y_g) + a; without a range
            # norm is the identity and the generated ratings are off scale (issue 12, defect 2)
            raise ValueError(
                f"DTG needs the range of the regression primary task {self._primary.name!r} to normalise generated "
                f"labels (DTG Eq. 9); give it as Task({self._primary.name!r}, 'regression', label_range=(low, high), ...)."
            )
        if self._primary.kind == "classification":
            m = self._primary.out_dim
        else:
            m = 1
        gen = info.generator if info.generator is not None else torch.Generator().manual_seed(info.seed + 11)
        param = next(model.parameters())
        self.source_names = [
            (s if rec == "anchor" else ("partner" if s == PRIMARY_STREAM else f"partner:{s}"))
            for rec in self._records for s in self._streams
        ]
        self.slot_names = [f"{rec}:{t.name}" for rec in self._records for t in tasks]
        self.feature_generator = FeatureGenerator(
            len(self.source_names), d, nonlinear=self.feature_nonlinear, hidden=self.feature_hidden,
            layers=self.mlp_layers, generator=gen,
        ).to(device=param.device, dtype=param.dtype)
        self.label_generator = LabelGenerator(
            [label_spec(t, self.bins) for t in tasks], [t.name for _ in self._records for t in tasks], m,
            nonlinear=self.label_nonlinear, embed_dim=self.embed_dim, hidden=self.label_hidden, layers=self.mlp_layers,
            init_std=self.init_std, generator=gen,
        ).to(device=param.device, dtype=param.dtype)
        self.alpha_logit = nn.Parameter(torch.zeros((), device=param.device, dtype=param.dtype))
        self.beta_logit = nn.Parameter(torch.zeros((), device=param.device, dtype=param.dtype))
        aux_start = self.init_weight if getattr(self, "aux_init_weight", None) is None else self.aux_init_weight
        start = [aux_start] * len(self._aux) + [self.init_weight]  # w_i of the given tasks, then w_g
        self.task_weights = nn.Parameter(torch.tensor(start, device=param.device, dtype=param.dtype))
        self._rng = torch.Generator().manual_seed(int(info.seed) * 1000003 + 8191)
        # the upper step's generated batches draw their pairings from a generator of their own (`upper_step`)
        self._rng_upper = torch.Generator().manual_seed(int(info.seed) * 1000003 + 8209)
        self._probe: dict[str, Any] | None = None
        self._probe_reported = False
        self._last_stats: dict[str, float] = {}
        self._cache: tuple[int, Tensor] | None = None

    def hparams(self) -> list[nn.Parameter]:
        params = list(self.feature_generator.parameters()) + list(self.label_generator.parameters())
        if self.label_bias:
            params.append(self.alpha_logit)
            if self._partner:
                params.append(self.beta_logit)
        params.append(self.task_weights)
        return params

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """φ's optimiser; with `weight_lr` the task weights w_i, w_g form a parameter group of their own."""
        if getattr(self, "weight_lr", None) is None:
            return super()._make_optimizer()
        u = self.upper
        rest = [p for p in self.hparams() if p is not self.task_weights]
        groups = [{"params": rest}, {"params": [self.task_weights], "lr": self.weight_lr}]
        return make_upper_optimizer(u.upper_optimizer, groups, u.upper_lr, u.upper_momentum, u.upper_weight_decay)

    def project(self) -> None:
        self.task_weights.clamp_(min=0.0)

    @property
    def alpha(self) -> Tensor:
        """α ∈ (0, 1) of the label bias (DTG Eq. 9)."""
        return torch.sigmoid(self.alpha_logit)

    @property
    def beta(self) -> Tensor:
        """The anchor's share β ∈ (0, 1) of the two primary labels in Share-Input mode (DTG Eq. 10)."""
        return torch.sigmoid(self.beta_logit)

    def weight_of(self, name: str) -> Tensor:
        """w_i of auxiliary task `name`, or w_g for ``"generated"``."""
        if name == "generated":
            return self.task_weights[-1]
        return self.task_weights[self._aux.index(name)]

    # -- generation -----------------------------------------------------------------
    def _pairing(self, terms: LossTerms) -> dict[str, list[Tensor]]:
        """Rows of each stream for each record (anchor, partner)."""
        feats = terms.features
        batch = feats[PRIMARY_STREAM].shape[0]
        anchor_ids = terms.index.get(PRIMARY_STREAM)
        anchor: dict[str, Tensor] = {}
        for s in self._streams:
            if s not in feats:
                raise KeyError(f"DTG needs stream {s!r} in every batch (its features are a generator source); the batch has {sorted(feats)}.")
            if s == PRIMARY_STREAM:
                anchor[s] = torch.arange(batch)
            else:
                anchor[s] = aligned_rows(self._kinds.get(s, "view"), anchor_ids, terms.index.get(s), feats[s].shape[0],
                                         batch, self._rng, s)
        rows = {s: [r] for s, r in anchor.items()}
        if self._partner:
            perm = self.permutation(batch)
            for s in self._streams:
                rows[s].append(anchor[s][perm])
        device = feats[PRIMARY_STREAM].device
        return {s: [r.to(device) for r in rs] for s, rs in rows.items()}

    def permutation(self, batch: int) -> Tensor:
        """The partner of each sample in Share-Input mode: a shuffled batch (§3.2.3)."""
        return torch.randperm(batch, generator=self._rng)

    def _labels(self, terms: LossTerms, rows: Mapping[str, Sequence[Tensor]]) -> list[Tensor]:
        out = []
        for r in range(len(self._records)):
            for t in self.tasks:
                out.append(terms.targets[t.stream][t.name][rows[t.stream][r]])
        return out

    def _label_from(self, labels: Sequence[Tensor], y_g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """norm(y_g), ŷ and the usable-sample mask from the slot labels and y_g."""
        primary = self._primary
        pos = self.tasks.names.index(primary.name)
        y_norm = normalise_label(primary, y_g)
        if not self.label_bias:
            return y_norm, y_norm, torch.ones(y_g.shape[0], dtype=torch.bool, device=y_g.device)
        y_a = labels[pos]
        target = label_vector(primary, y_a, y_g.dtype)
        mask = labelled(y_a)
        if self._partner:
            y_b = labels[len(self.tasks) + pos]
            target = self.beta * target + (1 - self.beta) * label_vector(primary, y_b, y_g.dtype)  # DTG Eq. 10
            mask = mask & labelled(y_b)
        return y_norm, label_bias(target, y_norm, self.alpha), mask.to(y_g.device)

    def generate(self, terms: LossTerms) -> Generated:
        """The generated batch for `terms` (a fresh pairing; graph to θ through the features and to φ)."""
        rows = self._pairing(terms)
        sources = torch.stack([
            terms.features[s][rows[s][r]] for r in range(len(self._records)) for s in self._streams
        ])
        # backbone features are half precision under amp; the generators (φ) stay in φ's precision
        features = self.feature_generator(sources.to(self.task_weights.dtype))
        labels = self._labels(terms, rows)
        raw = self.label_generator(labels)
        y_norm, y_hat, mask = self._label_from(labels, raw)
        return Generated(features, raw, y_norm, y_hat, mask, rows)

    def generated_loss(self, gen: Generated) -> Tensor:
        """mean_j ℓ_p(head_p(f_g,j), ŷ_g,j) over the usable generated samples."""
        primary = self._primary.name
        out = self._model.head_forward(gen.features, [primary])[primary]
        loss = soft_target_loss(self._primary, out, gen.labels.to(out.dtype))
        m = gen.mask.to(loss.dtype)
        return (loss * m).sum() / m.sum().clamp_min(1.0)

    # -- the protocol -----------------------------------------------------------------
    def upper_step(self, model: nn.Module, context: Any) -> dict[str, float]:
        """`BilevelMethod.upper_step`, its generated batches paired on the upper level's own generator: an
        upper step leaves the lower level's pairings (anchor rows of a view, Share-Input partners) where they
        were, so an upper step that moves no φ trains θ exactly as no upper step (common random numbers)."""
        with self.upper_generators("_rng"):
            return super().upper_step(model, context)

    def direction(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        """∇θ L_t (DTG Eq. 2); φ enters through w, f_g and ŷ_g (attached when ``create_graph``)."""
        gen = self.generate(terms)
        weights = self.task_weights if create_graph else self.task_weights.detach()
        loss = terms.mean(terms.primary)
        for name in terms.auxiliary:
            loss = loss + weights[self._aux.index(name)] * terms.mean(name)
        loss = loss + weights[-1] * self.generated_loss(gen)
        if create_graph and self.instance_reg > 0:
            self._cache = (id(terms), gen.raw)
        if not create_graph:
            self._record(terms, gen)
        grads = torch.autograd.grad(self.scaled(loss), list(params), create_graph=create_graph, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))

    def regulariser(self, terms: LossTerms) -> Tensor | None:
        """`instance_reg` · L_reg (DTG Eq. 14) on the y_g built for `terms` by the last `direction`."""
        if self.instance_reg == 0:
            return None
        cache, self._cache = self._cache, None
        raw = cache[1] if cache is not None and cache[0] == id(terms) else self.generate(terms).raw
        kind = "categorical" if self._primary.kind == "classification" else "numeric"
        return self.instance_reg * instance_regulariser(raw, kind, self.reg_reduction)

    # -- trace ------------------------------------------------------------------------
    @torch.no_grad()
    def _record(self, terms: LossTerms, gen: Generated) -> None:
        self._last_stats = {
            "generated/cosine": float(mean_pairwise_cosine(gen.raw)),
            "generated/cosine_norm": float(mean_pairwise_cosine(gen.normalised)),
        }
        if self._probe is None and self.probe_size > 0:
            p = min(self.probe_size, gen.raw.shape[0])
            labels = [y[:p].detach().clone() for y in self._labels(terms, gen.rows)]
            pos = self.tasks.names.index(self._primary.name)
            # the second image of DTG Table 3: the partner (Share-Input) or the paired auxiliary sample
            if self._partner:
                stream, rows, task = PRIMARY_STREAM, gen.rows[PRIMARY_STREAM][1], self._primary.name
            else:
                stream = next((s for s in self._streams if s != PRIMARY_STREAM), PRIMARY_STREAM)
                rows, task = gen.rows[stream][0], self.tasks.on_stream(stream)[0].name
            x, x2 = terms.inputs.get(PRIMARY_STREAM), terms.inputs.get(stream)
            self._probe = {
                "labels": labels,
                "primary_input": None if x is None else x[:p].detach().cpu().numpy().copy(),
                "partner_input": None if x2 is None else x2[rows[:p]].detach().cpu().numpy().copy(),
                "primary_label": labels[pos].cpu().numpy().copy(),
                "partner_label": terms.targets[stream][task][rows[:p]].detach().cpu().numpy().copy(),
                "partner_task": task,
                "primary_task": self._primary.name,
            }

    def probe_labels(self) -> dict[str, np.ndarray] | None:
        """Generated labels of the probe set now: ``{"generated": ŷ [P, m], "normalised": norm(y_g), "raw": y_g}``."""
        if self._probe is None:
            return None
        with torch.no_grad():
            raw = self.label_generator(self._probe["labels"])
            y_norm, y_hat, _ = self._label_from(self._probe["labels"], raw)
        return {"generated": y_hat.cpu().numpy(), "normalised": y_norm.cpu().numpy(), "raw": raw.cpu().numpy()}

    def trace(self) -> dict[str, Any]:
        out = dict(super().trace())
        with torch.no_grad():
            if self.label_bias:
                out["alpha"] = float(self.alpha)
                if self._partner:
                    out["beta"] = float(self.beta)
            for name in self._aux:
                out[f"weight/{name}"] = float(self.weight_of(name))
            out["weight/generated"] = float(self.weight_of("generated"))
            masks = self.feature_generator.normalised_masks()
            for name, row in zip(self.source_names, masks):
                out[f"mask/{name}"] = float(row.mean())
            out["mask/max"] = float(masks.max())
        out.update(self._last_stats)
        probe = self.probe_labels()
        if probe is not None:
            out["probe/generated"] = probe["generated"]
            out["probe/normalised"] = probe["normalised"]
            if not self._probe_reported:
                # the probe's inputs are recorded once (the first evaluation), not at every evaluation
                for key in ("primary_input", "partner_input", "primary_label", "partner_label", "partner_task", "primary_task"):
                    out[f"probe/{key}"] = self._probe[key]
                self._probe_reported = True
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["probe"] = self._probe
        # whether the probe's inputs were already traced (once per run): a resumed run must not repeat them
        state["probe_reported"] = self._probe_reported
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._probe = state.get("probe")
        self._probe_reported = bool(state.get("probe_reported", self._probe is not None))
